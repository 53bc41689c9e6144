"""Building blocks for multi-stage experiments (`align demo`, `align repro dco`): train from a recipe, evaluate,
compare, plot. Every stage is resumable: a finished training run or evaluation is reused, an interrupted one resumes
(training from its last checkpoint, evaluation from its samples.jsonl).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def stage(name: str):
    """Print the stage's start and elapsed time (the demo's progress report between progress bars)."""
    start = time.perf_counter()
    print(f"\n=== {name} ===", flush=True)
    yield
    print(f"=== {name}: done in {time.perf_counter() - start:.0f} s ===", flush=True)


def _flag_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        values = value if isinstance(value, list | tuple) else [value]
        args += [f"--{key}", *(str(item) for item in values)]
    return args


def is_trained(output_dir: Path) -> bool:
    """A finished `align train` run: final weights (full model or adapter) and the final trainer state."""
    weights = (output_dir / "adapter_model.safetensors").exists() or (output_dir / "model.safetensors").exists()
    return weights and (output_dir / "trainer_state.json").exists()


def train_recipe(method: str, recipe: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Train `method` from `recipe` with field overrides into `output_dir`; reuse it if already finished."""
    from align import training

    output_dir = Path(output_dir)
    if is_trained(output_dir):
        print(f"reusing the finished run in {output_dir}", flush=True)
        return output_dir
    argv = ["--config", str(recipe), "--output_dir", str(output_dir), *_flag_args(overrides or {})]
    trainer = training.run(method, *training.parse_args(method, argv))
    del trainer
    gc.collect()
    return output_dir


def write_problems(problems: Iterable, path: Path) -> Path:
    """Freeze a problem set as jsonl (align's schema), so every evaluation of an experiment sees the same problems."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(problem.to_dict()) + "\n" for problem in problems))
    tmp.replace(path)
    return path


def evaluate(model: str | Path, problems_file: Path, output_dir: Path, **options) -> dict:
    """`align eval` on a frozen problem file; returns the summary (resumes/reuses what output_dir holds)."""
    from align.evaluation.config import EvalConfig
    from align.evaluation.harness import run_eval

    config = EvalConfig(model=str(model), dataset=str(problems_file), output_dir=str(output_dir), **options)
    summary = run_eval(config)
    gc.collect()
    return summary


def check_sane(name: str, summary: dict) -> None:
    """Metrics are probabilities and pass@k never decreases in k (the unbiased estimator guarantees it)."""
    metrics = summary["metrics"]
    for key, value in metrics.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise AssertionError(f"{name}: {key} = {value} is not a probability")
    passes = [metrics[f"pass@{k}"] for k in summary["ks"]]
    if any(later < earlier - 1e-12 for earlier, later in zip(passes, passes[1:])):
        raise AssertionError(f"{name}: pass@k decreases with k: {passes}")


def metrics_table(summaries: dict[str, dict], columns: list[str]) -> str:
    """A markdown table: one row per model, one column per metric (percent, one decimal)."""
    header = "| model | " + " | ".join(columns) + " |"
    rule = "| --- |" + " --- |" * len(columns)
    rows = []
    for name, summary in summaries.items():
        cells = []
        for column in columns:
            value = summary["metrics"].get(column)
            cells.append("-" if value is None else f"{100 * value:.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def plot_pass_curves(summaries: dict[str, dict], path: Path, title: str, family: str = "pass") -> Path:
    """One `family@k` curve per model against k (log-2 axis)."""
    from align.evaluation.plots import plot_family

    return plot_family(summaries, path, title=title, family=family)
