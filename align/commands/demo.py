"""`align demo`: what align is for, in one command on a CPU.

A model fine-tuned for pass@N (DCO, N' = 16) is compared with one fine-tuned with cross-entropy on identical data,
steps and seed, starting from the embedded SmolLM2-135M-Instruct, on the offline synthetic task with direct answers.
Base, cross-entropy and DCO are evaluated by exact coverage on 256 held-out problems (pass@N for N = 1..10^4 from
one forward pass per problem, a lower bound with no sampling noise) and, as a cross-check, by sampling n=16
completions on the first 16 of them. Writes DIR/report.md (exact pass@1/16/256/4096 with 95 % intervals, DCO minus
cross-entropy paired by problem, the sampled cross-check), DIR/results.json and DIR/exact_coverage.png (the exact
pass@N curves); the experiment itself is `align.demo`.

Every stage is resumable: rerunning reuses finished stages and resumes interrupted ones. `--quick` runs the same
stages at toy sizes (CI uses it) and checks that the numbers are sane; `--dry-run` prints what would run (sizes,
recipes, evaluation, output directory) and stops before loading a model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from align.demo import FULL, QUICK, describe_plan, run_demo


__all__ = ["HELP", "main"]

HELP = "End-to-end demo on CPU: base vs cross-entropy vs DCO fine-tuning, exact pass@N curves and a report."


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="align demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", "--output_dir", default="runs/demo", help="Where everything goes.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes (about 3 minutes): checks the pipeline.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Base model (alias, path or Hub id).")
    parser.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="Print the plan (sizes, recipes, output) and stop."
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    size = QUICK if args.quick else FULL
    output_dir = Path(args.output_dir)
    if args.quick and args.output_dir == "runs/demo":
        output_dir = Path("runs/demo-quick")
    if args.dry_run:
        print(describe_plan(output_dir, size, args.model))
        return 0
    run_demo(output_dir, size, args.model)
    return 0
