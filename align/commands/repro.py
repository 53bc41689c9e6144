"""`align repro dco`: the DCO paper's central effect, re-measured at CPU scale.

Chen et al. 2025 (Table 1, Llama-3-8B on MATH direct answers): with more cross-entropy epochs pass@1 rises while
pass@256 and pass@4k fall, because the model grows over-confident in its greedy answer. This experiment trains
cross-entropy and DCO (N' = 16 and 64) LoRA adapters of SmolLM2-135M-Instruct on the synthetic task with direct
answers for up to E epochs, evaluates the checkpoints after epochs 1, 2, 4, 8 (pass@1..64, maj@64) and measures the
greedy-answer confidence of each, then writes a table (report.md, results.json) and a figure (repro-dco.png).
The full sweep takes about 3 hours on 2 CPU cores (`--quick`: a few minutes); every stage is resumable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from align.commands.demo import DIRECT_ANSWER_INSTRUCTION
from align.errors import InputError


HELP = "Reproduce a paper's effect at CPU scale: `align repro dco` (cross-entropy vs DCO over epochs)."


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


def _slug(method: str) -> str:
    """A directory name for a method label: "DCO N'=16" -> "dco_n16" (no quotes or spaces to escape in a shell)."""
    return re.sub(r"[^a-z0-9]+", "_", method.lower().replace("'=", "")).strip("_")


def _checkpoints_by_epoch(run_dir: Path) -> dict[int, Path]:
    """With save_strategy=epoch the k-th checkpoint (by step) is the end of epoch k."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return {epoch: path for epoch, path in enumerate(checkpoints, start=1)}


REPRO_CONFIG_FILE = "repro_config.json"


class ReproConfigMismatchError(InputError):
    """The output directory holds results of an experiment with another configuration."""


def _has_results(output_dir: Path) -> bool:
    """Any trained checkpoint or model, any recorded sample, any measured confidence under `output_dir`."""
    from align.checkpoints import is_complete
    from align.evaluation.records import read_jsonl
    from align.pipeline import is_trained

    runs = [path for path in (output_dir / "train").glob("*") if path.is_dir()]
    if any(is_trained(run) or any(map(is_complete, run.glob("checkpoint-*"))) for run in runs):
        return True
    if any(read_jsonl(path) for path in (output_dir / "eval").glob("*/samples*.jsonl")):
        return True
    return any((output_dir / "confidence").glob("*.json"))


def check_repro_config(output_dir: Path, config: dict) -> None:
    """Record the experiment's configuration in `repro_config.json`; refuse a different one once results exist.

    A directory whose earlier run produced nothing (it failed first, say on a misspelt --model) takes the new one.
    """
    path = output_dir / REPRO_CONFIG_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        differences = [
            f"{key}: {stored.get(key)!r} (existing) vs {config.get(key)!r} (now)"
            for key in sorted(set(stored) | set(config))
            if stored.get(key) != config.get(key)
        ]
        if differences and _has_results(output_dir):
            raise ReproConfigMismatchError(
                f"{output_dir} holds results of a different configuration ({'; '.join(differences)}); use another "
                f"--output-dir, or delete {output_dir} to start over"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))


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
    parser.add_argument("experiment", choices=["dco"], help="Which paper effect to reproduce.")
    parser.add_argument("--output-dir", "--output_dir", default="runs/repro-dco")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: checks the pipeline in a few minutes.")
    sizes = parser.add_argument_group("size overrides (default: the full sweep, about 3 hours on 2 CPU cores)")
    sizes.add_argument("--epochs", type=int, nargs="+", help="Evaluate after these epochs (trains max(epochs)).")
    sizes.add_argument("--pass-n", "--pass_n", dest="pass_ns", type=int, nargs="+", help="DCO budgets N' to train.")
    sizes.add_argument("--n", type=int, help="Samples per test problem (pass@1..n).")
    sizes.add_argument("--num-train", "--num_train", type=int, help="Synthetic training problems.")
    sizes.add_argument("--num-test", "--num_test", type=int, help="Held-out test problems.")
    sizes.add_argument("--levels", type=int, nargs="+", help="Synthetic difficulty levels (1-5).")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else ReproSize()
    overrides = {
        name: getattr(args, name)
        for name in ("epochs", "pass_ns", "n", "num_train", "num_test", "levels")
        if getattr(args, name) is not None
    }
    for name, value in overrides.items():
        values = value if isinstance(value, list) else [value]
        if any(v < 1 for v in values) or (name == "levels" and any(v > 5 for v in values)):
            parser.error(f"--{name.replace('_', '-')}: got {value}; sizes must be >= 1 and levels in 1..5")
    if "epochs" in overrides:
        overrides["epochs"] = sorted(set(overrides["epochs"]))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    run_dco_repro(Path(args.output_dir), replace(size, **overrides), args.model)
    return 0
