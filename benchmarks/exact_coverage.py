"""Exact coverage vs sampling: problems per second of the pass@N lower bound (one teacher-forced forward pass per
problem, `align.evaluation.exact_coverage.completion_log_probs`) against drawing n = 64 samples per problem with the
`hf` backend (`HFBackend.generate`, batched, seeded), on the same model, problems, prompts and distribution
(temperature 1, top-p 1). Sampling is timed without grading, which only flatters it. Goal: exact >= 20x sampling.

What sampling costs depends on how long the model talks: a model fine-tuned to answer directly (the demo's
`runs/demo/train/dco`) stops after ~8 tokens, the base model runs to `--max-new-tokens`; the mean tokens per sample
is reported with the ratio. Variants are timed interleaved in one process (benchmarks.common.interleaved).

    python -m benchmarks.exact_coverage --model runs/demo/train/dco --problems 32      # the full measurement
    python -m benchmarks.exact_coverage --tiny                                         # tiny model, seconds
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import cpu_threads, emit, interleaved, ratio


DIRECT = "Give only the final answer, as \\boxed{ANSWER}."
TARGET = 20.0
HEAVY = True  # thousands of sampled sequences on SmolLM2: `python -m benchmarks` runs it only when named


def main(
    model: str | None = None,
    num_problems: int = 32,
    n: int = 64,
    max_new_tokens: int = 16,
    repeats: int = 1,
    tiny: bool = False,
) -> dict:
    from align.data.prompts import render_prompt
    from align.data.synthetic import generate_problems
    from align.evaluation.exact_coverage import canonical_completion, completion_log_probs
    from align.evaluation.generation import SamplingConfig
    from align.evaluation.hf_backend import HFBackend
    from align.models import DEFAULT_MODEL

    with tempfile.TemporaryDirectory() as scratch:
        if tiny:
            from align.testing import build_tiny_model

            model = build_tiny_model(scratch)
        model = model or DEFAULT_MODEL
        backend = HFBackend(model, batch_size=64)
        problems = generate_problems(num_problems, "test", levels=(1, 2), seed=0)
        prompts = [render_prompt(p.problem, backend.tokenizer, DIRECT) for p in problems]
        completions = [canonical_completion(p.answer) for p in problems]
        sampling = SamplingConfig(n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
        generated = []

        def exact():
            list(completion_log_probs(backend.model, backend.tokenizer, prompts, completions, eos_ids=backend.eos_ids))

        def sample():
            rows = backend.generate(prompts, sampling)
            generated.append(sum(c.num_tokens for row in rows for c in row) / (len(prompts) * n))

        # one-time kernel set-up of both paths, untimed
        list(
            completion_log_probs(
                backend.model, backend.tokenizer, prompts[:1], completions[:1], eos_ids=backend.eos_ids
            )
        )
        backend.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))
        timings = interleaved({"exact": exact, "sampling": sample}, repeats=repeats, warmup=0)
    exact_s, sampling_s = timings["exact"]["median_s"], timings["sampling"]["median_s"]
    return emit(
        "exact_coverage",
        model="tiny" if tiny else model,
        dtype=backend.dtype,
        problems=num_problems,
        n=n,
        max_new_tokens=max_new_tokens,
        threads=cpu_threads(),
        exact_problems_per_s=round(num_problems / exact_s, 3),
        sampling_problems_per_s=round(num_problems / sampling_s, 3),
        speedup=ratio(sampling_s, exact_s),
        target_speedup=TARGET,
        meets_target=sampling_s >= TARGET * exact_s,
        mean_tokens_per_sample=round(sum(generated) / len(generated), 2),
        timings=timings,
        note="interleaved after an untimed one-prompt call of each; sampling is timed without grading",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model or adapter directory (default: the embedded SmolLM2).")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="The tiny test model, 8 problems: checks the benchmark.")
    args = parser.parse_args()
    main(
        args.model,
        num_problems=8 if args.tiny else args.problems,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        tiny=args.tiny,
    )
