"""Implicit PRM scoring throughput.

`prm_scoring`: completion tokens scored per second by `ImplicitPRM.score` (SmolLM2-135M-Instruct with a LoRA
adapter, the reference being its adapter-disabled base; and the tiny test Llama with a separate reference) on N
completions per prompt, as a sampler gives them (synthetic solutions, right and with an error at some step), against
the compute floor measured in the same run: plain forward passes of the policy and the reference over exactly the
completion tokens, packed into rows of the mean completion length (no padding, no prompt). Target: >= 0.8x the
floor. Also against one completion per call (the loop a caller would write) and against batching without the
shared prompt cache (`share_prompt=False`: what the scorer did before), for the attribution.
"""

from __future__ import annotations

import os
import random
import tempfile

from benchmarks.common import cpu_threads, emit, interleaved, ratio


FLOOR_TARGET = 0.8  # tokens/s of ImplicitPRM.score / tokens/s of the floor


def _completions(tokenizer, num_prompts: int, per_prompt: int):
    """`per_prompt` completions of each of `num_prompts` synthetic problems: the solution, and versions with one
    error injected at a varying step (later steps follow from it, so lengths and texts differ as samples do)."""
    from align.data.prompts import render_prompt
    from align.data.step_errors import computation_steps, correct_steps, inject_error
    from align.data.synthetic import generate_problems

    rng = random.Random(0)
    problems = generate_problems(num_prompts, "test", levels=(2, 3, 4, 5))
    prompts, completions = [], []
    for problem in problems:
        right = correct_steps(problem)
        for j in range(per_prompt):
            steps = right if j % 4 == 0 else inject_error(problem, rng.randrange(computation_steps(problem)), rng)[0]
            prompts.append(render_prompt(problem.problem, tokenizer))
            completions.append("\n\n".join(steps))
    return prompts, completions


def _floor_fn(policy, reference, scorer, prompts, completions, batch_size: int):
    """Plain forwards of both models over exactly the scored tokens (completion + end of turn), packed into rows of
    the mean completion length: the compute floor of scoring, with no prompt and no padding."""
    import torch

    encoded = [scorer._segment(p, c, None, i) for i, (p, c) in enumerate(zip(prompts, completions))]
    stream = [token for item in encoded for token in item.input_ids[item.completion_start :]]
    width = round(len(stream) / len(encoded))
    rows = [stream[i : i + width] for i in range(0, len(stream), width)]
    full = [row for row in rows if len(row) == width]
    batches = [torch.tensor(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [torch.tensor([row]) for row in rows if len(row) != width]  # the shorter last row, alone: no padding
    total = sum(batch.numel() for batch in batches)
    assert total == len(stream), (total, len(stream))

    @torch.inference_mode()
    def run():
        for batch in batches:
            policy(input_ids=batch)
            if reference is not None:
                reference(input_ids=batch)
            else:
                with policy.disable_adapter():
                    policy(input_ids=batch)

    return run, len(stream)


def measure_scoring(
    name: str, model_path: str, lora: bool, num_prompts: int, per_prompt: int, batch_size: int, repeats: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.precision import resolve_inference_dtype
    from align.prm import ImplicitPRM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = resolve_inference_dtype("auto", "cpu")  # what `align eval --prm` scores in
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    reference = None
    if lora:
        from peft import get_peft_model

        from align.models import build_lora_config

        policy = get_peft_model(policy, build_lora_config(lora_dropout=0.0))
        with torch.no_grad():  # a trained adapter: non-zero B, so the rewards are not all 0
            for parameter_name, parameter in policy.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    else:
        reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    policy.eval()
    prompts, completions = _completions(tokenizer, num_prompts, per_prompt)
    ours = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=batch_size)
    unshared = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=batch_size, share_prompt=False)
    single = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=1, share_prompt=False)
    floor, scored_tokens = _floor_fn(policy, reference, ours, prompts, completions, batch_size)
    together = ours.score(prompts, completions)
    alone = [single.score([p], [c])[0] for p, c in zip(prompts, completions)]
    max_diff = max(abs(a.score - b.score) for a, b in zip(together, alone))
    assert sum(len(r.token_rewards) for r in together) == scored_tokens
    results = interleaved(
        {
            "floor": floor,
            "ours": lambda: ours.score(prompts, completions),
            "batched_without_prompt_cache": lambda: unshared.score(prompts, completions),
            "one_at_a_time": lambda: [single.score([p], [c]) for p, c in zip(prompts, completions)],
        },
        repeats=repeats,
        warmup=1,
    )
    tokens_per_s = {key: round(scored_tokens / value["median_s"], 1) for key, value in results.items()}
    of_floor = ratio(results["floor"]["median_s"], results["ours"]["median_s"])
    prompt_tokens = [ours._segment(p, c, None, 0).completion_start for p, c in zip(prompts, completions)]
    return emit(
        "prm_scoring",
        model=name,
        dtype=str(dtype).removeprefix("torch."),
        reference="adapter-disabled base" if lora else "separate model",
        prompts=num_prompts,
        completions_per_prompt=per_prompt,
        batch_size=batch_size,
        mean_prompt_tokens=round(sum(prompt_tokens) / len(prompt_tokens)),
        mean_completion_tokens=round(scored_tokens / len(completions)),
        threads=cpu_threads(),
        completion_tokens_per_s=tokens_per_s,
        ours_over_floor=of_floor,
        ours_over_one_at_a_time=ratio(results["one_at_a_time"]["median_s"], results["ours"]["median_s"]),
        ours_over_batched_without_prompt_cache=ratio(
            results["batched_without_prompt_cache"]["median_s"], results["ours"]["median_s"]
        ),
        max_score_diff_vs_one_at_a_time=float(f"{max_diff:.2e}"),
        peak_rss_mib={k: v["peak_rss_mib"] for k, v in results.items()},
        target_over_floor=FLOOR_TARGET,
        meets_target=of_floor >= FLOOR_TARGET,
        repeats=repeats,
    )


def main() -> list[dict]:
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = []
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records.append(
            measure_scoring("tiny-llama", tiny, False, num_prompts=8, per_prompt=16, batch_size=16, repeats=3)
        )
    smollm2 = resolve_model_path(DEFAULT_MODEL)
    records.append(
        measure_scoring(DEFAULT_MODEL, smollm2, True, num_prompts=4, per_prompt=16, batch_size=16, repeats=2)
    )
    return records
