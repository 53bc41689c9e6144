"""Does bf16 sampling change what a model scores? float32 vs bfloat16 `align eval` on the same problems, paired.

For each model (the base SmolLM2 and the demo's fine-tuned adapters, when a demo run directory is given), the same
frozen synthetic problems are sampled twice with identical seeds, n, temperature and budget: once with float32
weights, once with bfloat16 weights (`dtype: auto` on a CPU with native bf16). The per-problem pass@1 and pass@n
differences get paired-bootstrap 95 % intervals (`align.evaluation.paired`); "agree" means the interval holds 0.
The bf16 run's sampling speed relative to the float32 run's is reported beside it (same problems, same machine).

With `--fp32-demo-dir` (a demo run under `ALIGN_PRECISION=fp32`: identical data, steps and seed), the two demos'
fine-tunes are compared too: their training-loss curves (plotted to OUTPUT/loss-curves.png), final losses (mean of
the last quarter of logged steps) and whether DCO minus cross-entropy at pass@16 keeps its sign.

A heavy experiment (about 25 minutes on 2 cores for three models), so `python -m benchmarks` without names skips
it: `python -m benchmarks precision_agreement` or `python benchmarks/precision_agreement.py --demo-dir runs/demo`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit


DIRECT_ANSWER_INSTRUCTION = "Give only the final answer, as \\boxed{ANSWER}."
HEAVY = True  # skipped by `python -m benchmarks` unless named


def _eval(model: str, problems: Path, output_dir: Path, dtype: str, n: int, batch_size: int) -> float:
    """Run `align eval` (resumable); returns its wall time in seconds (0 when it was already complete)."""
    if (output_dir / "summary.json").is_file():
        return json.loads((output_dir / "summary.json").read_text()).get("timing", {}).get("generate_s", 0.0)
    command = [
        sys.executable, "-m", "align.cli", "eval", "--model", model, "--dataset", str(problems),
        "--output-dir", str(output_dir), "--n", str(n), "--temperature", "1.0", "--top_p", "1.0",
        "--max_new_tokens", "16", "--batch_size", str(batch_size), "--dtype", dtype, "--seed", "0",
        "--prompt_instruction", DIRECT_ANSWER_INSTRUCTION,
    ]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - began


def main(
    demo_dir: str | None = "runs/demo",
    fp32_demo_dir: str | None = None,
    methods: tuple[str, ...] = ("sft", "dco"),
    output_dir: str = "runs/precision-agreement",
    limit: int = 200,
    n: int = 16,
    batch_size: int = 64,
) -> dict:
    from align.data.synthetic import generate_problems
    from align.evaluation.paired import compare_runs
    from align.models import DEFAULT_MODEL
    from align.pipeline import write_problems

    root = Path(output_dir)
    problems = write_problems(generate_problems(limit, "test", (1, 2), 0), root / "problems.jsonl")
    models = {"base": DEFAULT_MODEL}
    if demo_dir is not None:
        for name in methods:
            adapter = Path(demo_dir) / "train" / name
            if (adapter / "adapter_config.json").is_file():
                models[name] = str(adapter)
    rows = {}
    for name, model in models.items():
        seconds = {}
        for dtype in ("float32", "bfloat16"):
            seconds[dtype] = _eval(model, problems, root / name / dtype, dtype, n, batch_size)
        comparison = compare_runs(
            root / name / "float32" / "samples.jsonl",
            root / name / "bfloat16" / "samples.jsonl",
            metrics=("pass@1", f"pass@{n}"),
        )
        rows[name] = {
            "model": model,
            **{metric: {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}
               for metric, result in comparison.items()},
            "agree": all(not result["shown"] for result in comparison.values()),
            "eval_seconds": {dtype: round(value, 1) for dtype, value in seconds.items()},
        }  # fmt: skip
    training = compare_training(Path(demo_dir), Path(fp32_demo_dir), root) if demo_dir and fp32_demo_dir else None
    return emit("precision_agreement", problems=limit, n=n, batch_size=batch_size, models=rows, training=training)


def _losses(run: Path) -> list[tuple[int, float]]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def compare_training(auto_demo: Path, fp32_demo: Path, output_dir: Path) -> dict:
    """Loss curves, final losses and the CE-vs-DCO direction of an auto-precision demo and a float32 demo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result, figure = {}, plt.figure(figsize=(7, 4))
    for method, color in (("sft", "tab:blue"), ("dco", "tab:orange")):
        for demo, label, style in ((fp32_demo, "float32", "-"), (auto_demo, "bf16 autocast", "--")):
            curve = _losses(demo / "train" / method)
            plt.plot(*zip(*curve), style, color=color, label=f"{method} ({label})")
            tail = [loss for _, loss in curve[-max(1, len(curve) // 4) :]]
            result.setdefault(method, {})[label] = round(sum(tail) / len(tail), 4)
    plt.xlabel("step")
    plt.ylabel("training loss")
    plt.title("demo fine-tunes: float32 vs bf16 autocast (same data, steps, seed)")
    plt.legend()
    figure.savefig(output_dir / "loss-curves.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    for demo, label in ((fp32_demo, "float32"), (auto_demo, "bf16 autocast")):
        summaries = [demo / "eval" / m / "summary.json" for m in ("sft", "dco")]
        if all(path.is_file() for path in summaries):  # a demo stopped after training has curves but no evaluations
            ce, dco = (json.loads(path.read_text())["metrics"]["pass@16"] for path in summaries)
            result.setdefault("dco_minus_ce_pass@16", {})[label] = round(dco - ce, 4)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="runs/demo", help="A finished `align demo` directory (its adapters).")
    parser.add_argument("--fp32-demo-dir", default=None, help="The same demo run with ALIGN_PRECISION=fp32.")
    parser.add_argument("--output-dir", default="runs/precision-agreement")
    parser.add_argument("--methods", nargs="+", default=["sft", "dco"], help="Which demo fine-tunes to sample.")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    main(args.demo_dir, args.fp32_demo_dir, tuple(args.methods), args.output_dir, args.limit, args.n, args.batch_size)
