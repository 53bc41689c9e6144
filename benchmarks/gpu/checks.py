"""The GPU kit's runner: every check in order, each within a time budget, one JSON line each (docs/gpu.md).

    python -m benchmarks.gpu.checks --device cuda --out OUTDIR          # what run.sh OUTDIR runs
    python -m benchmarks.gpu.checks --tiny --device cpu --out OUTDIR   # the tiny CPU run (CI)

A check that raises is recorded as failed (its error's last line, the traceback on stderr) and the next one runs;
a check over its budget is stopped by an alarm and recorded as skipped with that reason, and so is every check that
finds less than its minimum left of the whole run's budget. Checks run in order of importance, so a short lease
loses the least important ones. `--checks a,b` (or GPU_KIT_CHECKS) runs a subset, in the same order, and
`--budget-s S` (or GPU_KIT_BUDGET_S) sets the whole run's budget;
GPU_KIT_FAIL_CHECK=1 adds a check that raises, which the tests use to show the others still run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from benchmarks.gpu import deepspeed_checks, sampling_checks, training_checks
from benchmarks.gpu.kit import Kit, SkipCheck


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Kit], dict]
    budget_s: float  # on the GPU; a check over it is stopped
    min_s: float = 15.0  # skipped when less than this is left of the whole run's budget


# In order of importance (a run short of time skips from the end). Budgets are wall seconds on one H200, model
# building and loading included; the first check also pays the imports of TRL and the Qwen2 model's creation.
CHECKS = [
    Check("sft_vs_dco_full", partial(training_checks.sft_vs_dco, lora=False), 60),
    Check("sft_vs_dco_lora", partial(training_checks.sft_vs_dco, lora=True), 35),
    Check("dpo_vs_margin", training_checks.dpo_vs_margin, 45),
    Check("prm_training", training_checks.prm_training, 45),
    Check("prm_scoring", sampling_checks.prm_scoring, 20, min_s=10),
    Check(
        "attention_entropy_short", lambda kit: training_checks.attention_entropy(kit, kit.sizes.long_lengths[0]), 40
    ),
    Check("attention_entropy_long", lambda kit: training_checks.attention_entropy(kit, kit.sizes.long_lengths[1]), 50),
    Check("grpo_vs_pass_n", sampling_checks.grpo_vs_pass_n, 45),
    Check("hf_generation", sampling_checks.hf_generation, 30),
    Check("deepspeed_zero2", partial(deepspeed_checks.zero, stage=2), 75, min_s=40),
    Check("deepspeed_zero3", partial(deepspeed_checks.zero, stage=3), 45, min_s=25),
    Check("sft_vs_dco_llama8b", training_checks.sft_vs_dco_llama, 45, min_s=25),
]
TOTAL_BUDGET_S = 420  # run.sh's 8 minutes, less installing the wheels and importing torch
TINY_BUDGET_S, TINY_CHECK_BUDGET_S = 240, 90  # a shared 2-core CPU
FAIL_ENV, SUBSET_ENV, BUDGET_ENV = "GPU_KIT_FAIL_CHECK", "GPU_KIT_CHECKS", "GPU_KIT_BUDGET_S"


def _deliberate_failure(kit: Kit) -> dict:
    raise RuntimeError(f"deliberate failure ({FAIL_ENV}=1): the kit must record it and run the other checks")


class BudgetSpent(BaseException):
    """Raised by the alarm in the middle of a check; a BaseException, so that no `except Exception` swallows it."""


def _alarm(signum, frame):
    raise BudgetSpent


def run_check(kit: Kit, check: Check, budget: float) -> dict:
    """Run one check with a hard `budget` (seconds): its record, with status ok, failed or skipped."""
    began = time.monotonic()
    kit.soft_deadline = began + 0.6 * budget  # timed loops stop adding rounds here, leaving time to finish
    record = {"check": check.name}
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        record |= {"status": "ok", **check.run(kit)}
    except BudgetSpent:
        record |= {"status": "skipped", "reason": f"its budget of {budget:.0f} s was spent before it finished"}
    except SkipCheck as skip:
        record |= {"status": "skipped", "reason": str(skip)}
    except Exception as error:  # a failed check is a finding: record it and go on
        traceback.print_exc()
        message = str(error).strip().splitlines()
        record |= {"status": "failed", "error": f"{type(error).__name__}: {message[-1] if message else ''}"[:500]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    record["wall_s"] = round(time.monotonic() - began, 1)
    kit.release()
    return record


def selected(names: str | None) -> list[Check]:
    checks = (
        [Check("deliberate_failure", _deliberate_failure, 10, min_s=0)] if os.environ.get(FAIL_ENV) else []
    ) + CHECKS
    if not names:
        return checks
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {check.name for check in checks})
    if unknown:
        raise SystemExit(f"--checks: unknown check(s) {unknown}; known: {[check.name for check in checks]}")
    return [check for check in checks if check.name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.checks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu.jsonl and gpu.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU run in CI)")
    parser.add_argument("--checks", default=os.environ.get(SUBSET_ENV), help="comma-separated subset of the checks")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ[BUDGET_ENV]) if os.environ.get(BUDGET_ENV) else None,
        help=f"the whole run's budget in seconds (default 420, 240 with --tiny; or {BUDGET_ENV})",
    )
    args = parser.parse_args(argv)
    checks = selected(args.checks)

    from benchmarks.gpu import environment
    from benchmarks.gpu.report import Report

    total = args.budget_s or (TINY_BUDGET_S if args.tiny else TOTAL_BUDGET_S)
    deadline = time.monotonic() + total
    described = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), **environment.describe()}
    mode = f"{'tiny models' if args.tiny else 'Qwen2-1.5B-shaped'} on {args.device}"
    report = Report(args.out, described, mode)
    print(f"[gpu-kit] {mode}: {len(checks)} checks, budget {total:.0f} s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="align-gpu-kit-") as workdir:
        kit = Kit(args.device, args.tiny, workdir)
        for check in checks:
            left = deadline - time.monotonic()
            budget = min(TINY_CHECK_BUDGET_S if args.tiny else check.budget_s, left)
            if left < check.min_s:
                record = {"check": check.name, "status": "skipped", "wall_s": 0.0}
                record["reason"] = f"the run's budget is spent: {max(left, 0):.0f} s left, it needs {check.min_s:.0f}"
            else:
                print(f"[gpu-kit] {check.name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
                record = run_check(kit, check, budget)
            report.add(record)
            detail = record.get("ratios") or record.get("reason") or record.get("error") or ""
            print(f"[gpu-kit] {check.name}: {record['status']} in {record['wall_s']} s {detail}", file=sys.stderr)
    print(f"[gpu-kit] wrote {report.jsonl} and {report.out_dir / 'gpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
