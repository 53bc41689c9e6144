"""Static KV cache + torch.compile for the `hf` backend on CPU: worth it after its compile time?

The same 640 samples (40 synthetic prompts x 16, 64 new tokens, SmolLM2-135M-Instruct in bf16, batch 64) are drawn
twice with align's `hf` backend: with transformers' default dynamic KV cache (eager decoding), and with a static KV
cache whose decoding step transformers compiles with `torch.compile` (`CompileConfig`; on a CPU compilation has to be
asked for explicitly). The compiled run's time includes its compilation (and recompilations when the batch's
prompt width changes), because that is what a user pays on a 640-sample evaluation. align adopts the static cache
only if it reaches `TARGET` times the dynamic run's tokens/s; the figures are reported either way (docs/precision.md).
"""

from __future__ import annotations

import time

from benchmarks.common import emit, ratio


TARGET = 1.3
HEAVY = True  # ~10 minutes with compilation: `python -m benchmarks generation_compile`


def main(num_prompts: int = 40, n: int = 16, max_new_tokens: int = 64, batch_size: int = 64) -> dict:
    import torch
    from transformers import CompileConfig

    from align.data.prompts import render_prompt
    from align.data.synthetic import generate_problems
    from align.evaluation.generation import SamplingConfig
    from align.evaluation.hf_backend import HFBackend
    from align.models import DEFAULT_MODEL

    backend = HFBackend(DEFAULT_MODEL, dtype="bfloat16", batch_size=batch_size)
    problems = generate_problems(num_prompts, "test", levels=(1, 2, 3, 4), seed=0)
    prompts = [render_prompt(p.problem, backend.tokenizer) for p in problems]
    sampling = SamplingConfig(n=n, temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens, seed=0)
    backend.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))  # one-time initialisation, untimed

    def run() -> tuple[float, int, list[list[str]]]:
        began = time.perf_counter()
        rows = backend.generate(prompts, sampling)
        return time.perf_counter() - began, sum(c.num_tokens for row in rows for c in row), rows

    dynamic_s, dynamic_tokens, dynamic_rows = run()
    compile_config = CompileConfig(fullgraph=False, dynamic=None)
    compile_config._compile_all_devices = (
        True  # transformers compiles only on accelerators unless told (a private flag)
    )
    backend.generation_overrides = {"cache_implementation": "static", "compile_config": compile_config}
    static_s, static_tokens, static_rows = run()
    same = sum(a.text == b.text for ra, rb in zip(dynamic_rows, static_rows) for a, b in zip(ra, rb))
    dynamic_rate, static_rate = dynamic_tokens / dynamic_s, static_tokens / static_s
    return emit(
        "generation_compile",
        model=DEFAULT_MODEL,
        samples=num_prompts * n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype="bfloat16",
        threads=torch.get_num_threads(),
        dynamic_cache_s=round(dynamic_s, 1),
        static_compiled_s=round(static_s, 1),
        dynamic_tokens_per_s=round(dynamic_rate, 1),
        static_compiled_tokens_per_s=round(static_rate, 1),
        speedup=ratio(static_rate, dynamic_rate),
        target_speedup=TARGET,
        adopt=static_rate >= TARGET * dynamic_rate,
        identical_samples=f"{same}/{num_prompts * n}",
        note="static run includes torch.compile time (first call and recompiles per prompt width)",
    )


if __name__ == "__main__":
    main()
