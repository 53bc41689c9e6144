"""Generation throughput on SmolLM2-135M-Instruct: align's batched `hf` backend vs a one-sample-at-a-time loop,
and float32 at the old fixed batch of 16 vs the defaults (`dtype: auto`, `batch_size: auto`).

Baseline = the loop a script without align writes: `model.generate(do_sample=True)` on one prompt at a time, n times
per prompt (float32). Ours = `HFBackend.generate`: prompts x samples batched per call (left padding, KV cache,
per-sequence seeded nucleus sampling), once in float32 with 16 sequences per call (align's default before
`auto`), once with the defaults (bf16 weights and batch 64 on a CPU with native bf16). Same prompts, n,
temperature, top_p and max_new_tokens; the figure is generated tokens per second (variants sample different texts,
so their token counts differ). Goals: batched >= 4x the loop; auto >= 3.3x float32/16 and >= 450 tokens/s.
"""

from __future__ import annotations

import time

from benchmarks.common import emit, peak_rss, ratio


def main(num_prompts: int = 4, n: int = 16, max_new_tokens: int = 64, batch_size: int = 16, repeats: int = 2) -> dict:
    import torch

    from align.data.prompts import render_prompt
    from align.data.synthetic import generate_problems
    from align.evaluation.generation import SamplingConfig
    from align.evaluation.hf_backend import HFBackend
    from align.models import DEFAULT_MODEL

    backend = HFBackend(DEFAULT_MODEL, dtype="float32", batch_size=batch_size)
    auto_backend = HFBackend(DEFAULT_MODEL)  # dtype auto, batch_size auto
    model, tokenizer = backend.model, backend.tokenizer
    problems = generate_problems(num_prompts, "test", levels=(1, 2, 3, 4), seed=0)
    prompts = [render_prompt(p.problem, tokenizer) for p in problems]
    sampling = SamplingConfig(n=n, temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens, seed=0)

    def batched() -> int:
        return sum(c.num_tokens for row in backend.generate(prompts, sampling) for c in row)

    def auto() -> int:
        return sum(c.num_tokens for row in auto_backend.generate(prompts, sampling) for c in row)

    def one_at_a_time() -> int:
        tokens = 0
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            for _ in range(min(n, 4)):  # a rate: 4 samples per prompt measure it as well as n, in a quarter the time
                with torch.inference_mode():
                    output = model.generate(
                        **inputs,
                        do_sample=True,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=0,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                generated = output[0, inputs["input_ids"].shape[1] :].tolist()
                stop = next((i for i, t in enumerate(generated) if t in backend.eos_ids), None)
                tokens += len(generated) if stop is None else stop + 1
        return tokens

    torch.manual_seed(0)
    backend.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))  # one-time initialisation, untimed
    auto_backend.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))
    variants = {"batched": batched, "auto": auto, "one_at_a_time": one_at_a_time}
    rates = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            with peak_rss() as memory:
                began = time.perf_counter()
                tokens = fn()
                rates[name].append(tokens / (time.perf_counter() - began))
            peaks[name] = max(peaks[name], memory["peak_mib"])
    median = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    return emit(
        "generation",
        model=DEFAULT_MODEL,
        prompts=num_prompts,
        n=n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        threads=torch.get_num_threads(),
        batched_tokens_per_s=round(median["batched"], 1),
        one_at_a_time_tokens_per_s=round(median["one_at_a_time"], 1),
        speedup=ratio(median["batched"], median["one_at_a_time"]),
        target_speedup=4.0,
        meets_target=median["batched"] >= 4.0 * median["one_at_a_time"],
        auto=auto_backend.engine(),
        auto_tokens_per_s=round(median["auto"], 1),
        auto_vs_fp32_batch16=ratio(median["auto"], median["batched"]),
        auto_meets_target=median["auto"] >= 450 and median["auto"] >= 3.3 * median["batched"],
        tokens_per_s_all={name: [round(r, 1) for r in values] for name, values in rates.items()},
        peak_rss_mib=peaks,
        note="batched and one_at_a_time in float32; interleaved rounds, upper median reported",
    )


if __name__ == "__main__":
    main()
