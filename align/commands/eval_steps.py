"""`align eval-steps`: how well an implicit PRM finds the earliest wrong step (ProcessBench's metric).

    align eval-steps --prm runs/prm --synthetic 400 --output-dir runs/eval-steps/prm
    align eval-steps --prm runs/prm --data processbench_math.jsonl --calibration processbench_gsm8k.jsonl ...

Rows are ProcessBench's (`problem`, `steps`, `label`: the earliest wrong step's index or −1), from a file or built
by `--synthetic N` (`align.data.step_errors`: held-out test-split problems with one error injected at a balanced known
step and carried forward; the calibration rows come from the train split). Prints and writes (summary.json) the
error accuracy, the correct accuracy and their harmonic mean F1 for the PRM's step rewards, the policy's own
per-step likelihood and a random flag, each at the best threshold on the rows and at the threshold chosen on the
calibration rows, with per-position accuracies.
"""

from __future__ import annotations

import argparse


HELP = "Step-error localization (ProcessBench F1) of an implicit PRM: --prm PATH --synthetic N | --data FILE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align eval-steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", required=True, help="PRM directory (from align train prm) or model.")
    parser.add_argument("--prm-ref", "--prm_ref", default=None, help="Reference model of a full-model PRM.")
    parser.add_argument("--prm-beta", "--prm_beta", type=float, default=None, help="β (default: the PRM's own).")
    rows = parser.add_mutually_exclusive_group(required=True)
    rows.add_argument("--data", help="ProcessBench-format rows (.jsonl, or a .json list).")
    rows.add_argument("--synthetic", type=int, metavar="N", help="Build N rows from held-out synthetic problems.")
    parser.add_argument("--calibration", help="Rows on which to choose the threshold (with --data).")
    parser.add_argument("--num-calibration", "--num_calibration", type=int, help="--synthetic: calibration rows (N).")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 5], help="--synthetic: levels (1-5).")
    parser.add_argument("--seed", type=int, default=0, help="Synthetic rows and the random baseline's seed.")
    parser.add_argument("--prompt-instruction", "--prompt_instruction", default=None, help="Default: align's own.")
    parser.add_argument("--prompt-style", "--prompt_style", default="chat", choices=["chat", "plain"])
    parser.add_argument("--batch-size", "--batch_size", type=int, default=16)
    parser.add_argument(
        "--no-likelihood", "--no_likelihood", action="store_true", help="Skip the likelihood baseline."
    )
    parser.add_argument("--output-dir", "--output_dir", required=True)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from align.data.prompts import DEFAULT_INSTRUCTION
    from align.evaluation.scoring import load_scorer
    from align.evaluation.step_scoring import (
        format_results,
        read_rows,
        run_step_benchmark,
        synthetic_rows,
        write_results,
    )

    if args.synthetic is not None:
        rows, calibration = synthetic_rows(args.synthetic, args.num_calibration, args.levels, args.seed)
    else:
        rows = read_rows(args.data)
        calibration = read_rows(args.calibration) if args.calibration else None
    prm = load_scorer(args.prm, args.prm_ref, args.prm_beta)
    instruction = args.prompt_instruction if args.prompt_instruction is not None else DEFAULT_INSTRUCTION
    results = run_step_benchmark(
        prm,
        rows,
        calibration,
        instruction=instruction,
        style=args.prompt_style,
        batch_size=args.batch_size,
        seed=args.seed,
        likelihood=not args.no_likelihood,
    )
    summary = write_results(args.output_dir, args.prm, results)
    print(format_results(results))
    print(f"summary: {summary}")
    return 0
