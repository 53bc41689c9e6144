"""`align repro dco`: the DCO paper's central effect, re-measured at CPU scale.

Chen et al. 2025 (Table 1, Llama-3-8B on MATH direct answers): with more cross-entropy epochs pass@1 rises while
pass@256 and pass@4k fall, because the model grows over-confident in its greedy answer. This experiment trains
cross-entropy and DCO (N' = 16 and 64) LoRA adapters of SmolLM2-135M-Instruct on the synthetic task with direct
answers for up to E epochs, evaluates the checkpoints after epochs 1, 2, 4, 8 (pass@1..64, maj@64) and measures the
greedy-answer confidence of each, then writes a table (report.md, results.json) and a figure (repro-dco.png).
The full sweep takes about 3 hours on 2 CPU cores (`--quick`: a few minutes); every stage is resumable.

`align repro pass-k` is the pass@k proving ground (`align.experiments.pass_k`): every objective of `align train
pass_n --pass_k_objective`, and offline cross-entropy vs DCO, from one warm-up, scored by exact coverage with
paired-bootstrap intervals against GRPO (about 77 minutes on 2 free cores; `--quick`: a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from align.commands.demo import DIRECT_ANSWER_INSTRUCTION
from align.experiments.runs import check_repro_config
from align.experiments.runs import slug as _slug


HELP = (
    "Reproduce a paper's effect at CPU scale: `align repro dco` (cross-entropy vs DCO over epochs), `align repro "
    "pass-k` (every pass@k objective against GRPO)."
)


@dataclass
class ReproSize:
    levels: list[int] = field(default_factory=lambda: [1, 2])
    num_train: int = 256
    num_test: int = 40
    epochs: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 16
    learning_rate: float = 5e-4
    pass_ns: list[int] = field(default_factory=lambda: [16, 64])
    n: int = 64
    max_new_tokens: int = 24
    temperature: float = 1.0
    eval_batch_size: int = 64


QUICK = ReproSize(
    levels=[1],
    num_train=16,
    num_test=3,
    epochs=[1, 2],
    batch_size=8,
    pass_ns=[4],
    n=4,
    max_new_tokens=12,
    eval_batch_size=16,
)


def _checkpoints_by_epoch(run_dir: Path) -> dict[int, Path]:
    """With save_strategy=epoch the k-th checkpoint (by step) is the end of epoch k."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return {epoch: path for epoch, path in enumerate(checkpoints, start=1)}


def _confidence(model_path: Path | str, problems, size: ReproSize, cache: Path) -> dict:
    """Mean greedy-answer confidence p̂(ŷ_greedy|x) over the test problems, overall and on wrong greedy answers."""
    if cache.exists():
        return json.loads(cache.read_text())
    from align.data.prompts import render_prompt
    from align.diagnostics.confidence import greedy_confidence
    from align.grading import Grader
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_path))
    prompts = [render_prompt(p.problem, tokenizer, DIRECT_ANSWER_INSTRUCTION) for p in problems]
    greedy = greedy_confidence(model, tokenizer, prompts, max_new_tokens=size.max_new_tokens)
    with Grader() as grader:
        correct = [grader.grade(g["completion"], p.answer).correct for g, p in zip(greedy, problems)]
    wrong = [g["prob"] for g, ok in zip(greedy, correct) if not ok]
    result = {
        "greedy_confidence": statistics.fmean(g["prob"] for g in greedy),
        "greedy_confidence_when_wrong": statistics.fmean(wrong) if wrong else None,
        "greedy_accuracy": sum(correct) / len(correct),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def _plot(rows: list[dict], size: ReproSize, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["pass@1", f"pass@{size.n}", "greedy_confidence"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for axis, metric in zip(axes, metrics):
        for method in dict.fromkeys(row["method"] for row in rows if row["epoch"] > 0):
            points = [(row["epoch"], row[metric]) for row in rows if row["method"] == method and row["epoch"] > 0]
            axis.plot(*zip(*points), marker="o", label=method)
        base = next(row[metric] for row in rows if row["epoch"] == 0)
        axis.axhline(base, color="gray", linestyle=":", label="base model")
        axis.set_xscale("log", base=2)
        axis.set_xticks(size.epochs, [str(e) for e in size.epochs])
        axis.set_xlabel("epochs")
        axis.set_title(metric)
        axis.set_ylim(0, 1)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _report(rows: list[dict], size: ReproSize, model: str) -> str:
    columns = [
        "pass@1",
        "pass@4",
        "pass@16",
        f"pass@{size.n}",
        f"maj@{size.n}",
        "greedy_confidence",
        "greedy_confidence_when_wrong",
    ]
    columns = list(dict.fromkeys(c for c in columns if c in rows[0]))
    lines = [
        f"{model} + LoRA, synthetic levels {size.levels}, direct answers; {size.num_train} training problems, batch "
        f"{size.batch_size}, lr {size.learning_rate}; {size.num_test} held-out problems, n={size.n} samples at "
        f"temperature {size.temperature}. Numbers in percent.",
        "",
        "| method | epochs | " + " | ".join(columns) + " |",
        "| --- | --- |" + " --- |" * len(columns),
    ]
    for row in rows:
        cells = ["-" if row.get(c) is None else f"{100 * row[c]:.1f}" for c in columns]
        lines.append(f"| {row['method']} | {row['epoch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_dco_repro(output_dir: Path, size: ReproSize, model: str) -> list[dict]:
    from align.data.synthetic import generate_problems
    from align.pipeline import check_sane, evaluate, stage, train_recipe, write_problems
    from align.training import default_recipe

    check_repro_config(output_dir, {"model": model, **asdict(size)})
    problems = generate_problems(size.num_test, "test", size.levels)
    test_file = write_problems(problems, output_dir / "test.jsonl")
    eval_options = {
        "n": size.n,
        "temperature": size.temperature,
        "top_p": 1.0,
        "max_new_tokens": size.max_new_tokens,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": DIRECT_ANSWER_INSTRUCTION,
        "seed": 0,
    }

    def measure(method: str, epoch: int, model_path) -> dict:
        name = f"{_slug(method)}-e{epoch}"
        summary = evaluate(model_path, test_file, output_dir / "eval" / name, **eval_options)
        check_sane(name, summary)
        confidence = _confidence(model_path, problems, size, output_dir / "confidence" / f"{name}.json")
        return {"method": method, "epoch": epoch, **summary["metrics"], **confidence}

    rows = []
    with stage("base model"):
        rows.append(measure("base", 0, model))
    runs = {"cross-entropy": ("sft", {})}
    runs.update({f"DCO N'={pass_n}": ("dco", {"pass_n": pass_n}) for pass_n in size.pass_ns})
    common = {
        "model_name_or_path": model,
        "synthetic_levels": size.levels,
        "synthetic_num_train": size.num_train,
        "completion_target": "answer",
        "prompt_instruction": DIRECT_ANSWER_INSTRUCTION,
        "num_train_epochs": max(size.epochs),
        "max_steps": -1,
        "per_device_train_batch_size": size.batch_size,
        "learning_rate": size.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "save_strategy": "epoch",
        "save_total_limit": None,
        "logging_steps": 5,
        "max_length": 128,
    }
    for method, (recipe, extra) in runs.items():
        with stage(f"train {method} for {max(size.epochs)} epochs"):
            run_dir = train_recipe(
                recipe, default_recipe(recipe), output_dir / "train" / _slug(method), {**common, **extra}
            )
        checkpoints = _checkpoints_by_epoch(run_dir)
        for epoch in size.epochs:
            with stage(f"evaluate {method} after {epoch} epochs"):
                rows.append(measure(method, epoch, checkpoints[epoch]))
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, size, output_dir / "repro-dco.png")
    report = _report(rows, size, model)
    (output_dir / "report.md").write_text(report)
    print(report)
    print(f"results: {output_dir / 'results.json'}\nfigure:  {output_dir / 'repro-dco.png'}")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="align repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=["dco", "pass-k"], help="Which paper effect to reproduce.")
    parser.add_argument("--output-dir", "--output_dir", help="Default: runs/repro-<experiment>.")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: checks the pipeline in a few minutes.")
    sizes = parser.add_argument_group("size overrides (default: the full sweep, about 3 hours on 2 CPU cores)")
    sizes.add_argument("--epochs", type=int, nargs="+", help="Evaluate after these epochs (trains max(epochs)).")
    sizes.add_argument("--pass-n", "--pass_n", dest="pass_ns", type=int, nargs="+", help="DCO budgets N' to train.")
    sizes.add_argument("--n", type=int, help="Samples per test problem (pass@1..n).")
    sizes.add_argument("--num-train", "--num_train", type=int, help="Synthetic training problems.")
    sizes.add_argument("--num-test", "--num_test", type=int, help="Held-out test problems.")
    sizes.add_argument("--levels", type=int, nargs="+", help="Synthetic difficulty levels (1-5).")
    pass_k = parser.add_argument_group("pass-k (align.experiments.pass_k)")
    pass_k.add_argument("--seeds", type=int, nargs="+", help="Training seeds of every arm (default 0 1; --quick: 0).")
    pass_k.add_argument("--objectives", nargs="+", help="Arms to train (default all; must include grpo).")
    pass_k.add_argument(
        "--tune-lr",
        type=float,
        nargs="+",
        metavar="LR",
        help="Instead of the sweep: train GRPO at each learning rate on the tuning seed and score it on validation "
        "problems of the train split (tune/report.md); then run the sweep with the chosen --learning-rate.",
    )
    pass_k.add_argument("--learning-rate", type=float, help="Learning rate of every arm (default: the tuned 1e-4).")
    pass_k.add_argument(
        "--steps", type=int, help="Optimizer steps of every arm (also takes --num-train/-test, --levels)."
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.experiment == "pass-k":
        return _pass_k(parser, args)
    if any(getattr(args, name) is not None for name in ("seeds", "objectives", "steps", "tune_lr", "learning_rate")):
        parser.error("--seeds, --objectives, --steps, --tune-lr and --learning-rate belong to `align repro pass-k`")
    size = QUICK if args.quick else ReproSize()
    overrides = _size_overrides(parser, args, ("epochs", "pass_ns", "n", "num_train", "num_test", "levels"))
    if "epochs" in overrides:
        overrides["epochs"] = sorted(set(overrides["epochs"]))
    run_dco_repro(Path(args.output_dir or "runs/repro-dco"), replace(size, **overrides), args.model)
    return 0


def _size_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name, value in overrides.items():
        values = value if isinstance(value, list) else [value]
        if any(v < 1 for v in values) or (name == "levels" and any(v > 5 for v in values)):
            parser.error(f"--{name.replace('_', '-')}: got {value}; sizes must be >= 1 and levels in 1..5")
    return overrides


def _pass_k(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import pass_k

    if any(getattr(args, name) is not None for name in ("epochs", "pass_ns", "n")):
        parser.error("--epochs/--pass-n/--n belong to `align repro dco`")
    arms = args.objectives or list(pass_k.ARMS)
    unknown = [arm for arm in arms if arm not in pass_k.ARMS]
    if unknown or pass_k.BASELINE not in arms:
        parser.error(f"--objectives: got {arms}; choose from {' '.join(pass_k.ARMS)}, including {pass_k.BASELINE}")
    seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1]
    output_dir = Path(args.output_dir or ("runs/repro-pass-k-quick" if args.quick else "runs/repro-pass-k"))
    size = pass_k.QUICK if args.quick else pass_k.ProvingGroundSize()
    size = replace(size, **_size_overrides(parser, args, ("num_train", "num_test", "levels", "steps")))
    rates = [rate for rate in [args.learning_rate, *(args.tune_lr or [])] if rate is not None]
    if any(not 0 < rate < 1 for rate in rates):
        parser.error(f"--learning-rate/--tune-lr: got {rates}; learning rates lie in (0, 1), e.g. 1e-4")
    if args.learning_rate is not None:
        size = replace(size, learning_rate=args.learning_rate)
    if args.tune_lr:
        pass_k.tune_learning_rate(
            output_dir, size, args.model, instruction=DIRECT_ANSWER_INSTRUCTION, learning_rates=args.tune_lr
        )
        return 0
    pass_k.run_pass_k_proving_ground(
        output_dir, size, args.model, instruction=DIRECT_ANSWER_INSTRUCTION, seeds=seeds, arms=arms
    )
    return 0
