"""`align eval`: pass@k / maj@k (and bon@k with an implicit PRM) of a model on MATH-style problems.

    align eval --model M --dataset math500 --n 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 1024 \\
        --output-dir runs/x [--limit 50] [--backend auto|hf|vllm|openai] [--seed 0]
    align eval --config eval/math500.yaml --model runs/dco --output-dir runs/dco-eval
    align eval --samples runs/x/samples.jsonl [--prm runs/prm]      # re-grade / re-score, no generation
    align eval --model runs/dco --dataset synthetic --limit 256 --exact-coverage --temperature 1 --top-p 1 \\
        --prompt-instruction "Give only the final answer, as \\boxed{ANSWER}." --output-dir runs/x  # no sampling
    align eval --config eval/math500.yaml --backend vllm --backend_kwargs tensor_parallel_size=2,max_model_len=4096
    align eval --config eval/synthetic.yaml --model smollm2-135m-instruct --backend openai \\
        --base-url http://127.0.0.1:8000/v1 --served-model smollm2 --output-dir runs/x  # a `vllm serve` server
    accelerate launch --multi_gpu --num_processes 8 -m align.cli eval --config eval/math500.yaml ...

Writes samples.jsonl, summary.json and passk.png into the output directory (with --exact-coverage also
exact_coverage.jsonl and exact_coverage.png); rerunning resumes. See eval/README.md.
"""

from __future__ import annotations

import json
import logging
import sys


HELP = "Evaluate pass@k / maj@k (/ bon@k with --prm) on MATH-style problems: align eval --config eval/math500.yaml"


def parse(argv: list[str]):
    """The `EvalConfig` of `argv`; bad input raises `align.errors.InputError`. With `--samples`, the fields set that
    re-grading does not read (a task config's dataset, n, sampling) are named in one warning line."""
    from align.configs import ConfigParser
    from align.evaluation.config import EvalConfig

    parser = ConfigParser((EvalConfig,), prog="align eval", description=HELP)
    (config,) = parser.parse_args_and_config(argv)
    if config.samples:
        ignored = config.unused_with_samples(parser.supplied)
        if ignored:
            print(
                f"align eval: --samples re-grades existing generations and ignores {', '.join(ignored)} (they "
                "apply to generating samples)",
                file=sys.stderr,
            )
    return config


def format_metrics(summary: dict) -> str:
    """One line per metric family of the summary (`align.evaluation.report.METRIC_FAMILIES`; `pass_all` is pass^k,
    all k samples correct), each with its value at every reported k."""
    from align.evaluation.report import METRIC_FAMILIES

    metrics = summary["metrics"]
    lines = []
    for family in METRIC_FAMILIES:
        if all(f"{family}@{k}" in metrics for k in summary["ks"]):
            values = "  ".join(f"@{k}={metrics[f'{family}@{k}']:.4f}" for k in summary["ks"])
            lines.append(f"{family:>12}: {values}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from align.evaluation.harness import run_eval

    # Bad input (a config value, a model path, a dataset row, a samples file, a run directory holding another
    # configuration's samples) raises align.errors.InputError, which align.cli reports in one line.
    config = parse(argv)
    if not config.samples:
        from align.models import check_model_name

        check_model_name(config.model)  # before the run directory is written to
    if config.prm:
        from align.evaluation.scoring import check_scorer_paths

        check_scorer_paths(config.prm, config.prm_ref)  # now, not after the sampling and grading
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_eval(config)
    if summary is not None and summary["n"]:
        counts = json.dumps(summary["samples"])
        print(f"{summary['num_problems']} problems, n={summary['n']}; samples: {counts}\n{format_metrics(summary)}")
    if summary is not None and summary.get("exact_coverage"):
        from align.evaluation.exact_coverage import format_exact_coverage

        print(format_exact_coverage(summary["exact_coverage"]))
    return 0
