"""The margin proving ground (`align repro margin`): does the pairwise normalized update of Yuan et al. 2025
(arXiv 2410.13828, docs/margin.md) keep the chosen log-probs from falling without losing the margin?

Three arms per seed, from the same start (the model, with a fresh LoRA r=16 on all linear layers: the recipes'),
on the same pairs, with the same steps, batch, learning rate and seed:

- `dpo`: `margin_loss: dpo` (recipes/smollm2-135m-instruct/margin_dpo.yaml: β 0.1);
- `dpo_normalized`: the same with `normalize_pair_gradients: true`;
- `simpo`: margin_simpo.yaml's loss (β 2.0, γ 0.5).

Pairs: the recipes' offline synthetic pairs (level 1, one corruption per problem: reference solution vs one slip),
`num_train` train-split problems (generator and corruption seed 0) and, for reporting only, `num_test` test-split
problems (generator and corruption seed 1). Seed s sets the LoRA init and the data order, identical across arms.
Every arm: one epoch of `batch_size` pairs per step (128 / 4 = 32 steps), AdamW lr 5e-5 constant with 2 warm-up steps,
max_length 256, float32 (bf16 off: the measured changes are not rounding), entanglement diagnostics every 4 steps on
2 pairs (each run keeps its entanglement.jsonl). Measured: sequence log-probs of every pair under the start model
and each trained one (no-grad forwards, `margin_measure`), the claim's quantities with bootstrap intervals and paired
differences (`margin_stats`), CHES of the training pairs under the start model, the report (`margin_report`).
Every stage is cached in the output directory and reused on a rerun; a killed training run resumes from its last
checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from align.experiments.margin_stats import ARMS


RECIPES = {"dpo": "margin_dpo", "dpo_normalized": "margin_dpo", "simpo": "margin_simpo"}
TRAIN_SEED, TEST_SEED = 0, 1  # synthetic generator and corruption seeds of the two pair sets


@dataclass
class MarginReproSize:
    """Sizes of the proving ground (`QUICK` is a pipeline check)."""

    levels: tuple[int, ...] = (1,)
    num_train: int = 128
    num_test: int = 64
    batch_size: int = 4
    learning_rate: float = 5e-5
    warmup_steps: int = 2
    max_length: int = 256
    entanglement_steps: int = 4
    entanglement_pairs: int = 2
    score_batch_size: int = 8

    @property
    def steps(self) -> int:
        """One epoch: ceil(num_train / batch_size) optimizer steps."""
        return math.ceil(self.num_train / self.batch_size)


QUICK = MarginReproSize(num_train=8, num_test=4, learning_rate=5e-4, warmup_steps=0, entanglement_steps=1)


def loss_fields(arm: str) -> dict:
    """The arm's loss, read from its shipped recipe (plus the normalized update for `dpo_normalized`)."""
    import yaml

    from align.resources import recipe_path

    recipe = yaml.safe_load(recipe_path(f"smollm2-135m-instruct/{RECIPES[arm]}.yaml").read_text())
    fields = {"margin_loss": recipe["margin_loss"], "beta": recipe["beta"]}
    if recipe["margin_loss"] == "simpo":
        fields["simpo_gamma"] = recipe["simpo_gamma"]
    fields["normalize_pair_gradients"] = arm == "dpo_normalized"
    return fields


def arm_fields(arm: str, size: MarginReproSize, model: str, train_file: Path, seed: int) -> dict:
    """Recipe fields of one arm: everything but the loss is shared (LoRA fields stay the recipes' own)."""
    return {
        "model_name_or_path": model,
        "dataset_name": str(train_file),
        "dtype": "float32",
        "bf16": False,
        "per_device_train_batch_size": size.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": size.steps,
        "learning_rate": size.learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": size.warmup_steps,
        "max_length": size.max_length,
        "entanglement_steps": size.entanglement_steps,
        "entanglement_pairs": size.entanglement_pairs,
        "entanglement_params": "trainable",
        "save_strategy": "steps",
        "save_steps": max(size.steps // 4, 1),
        "save_total_limit": 1,
        "logging_steps": 1,
        "seed": seed,
        "report_to": "none",
        **loss_fields(arm),
    }


def build_pairs(size: MarginReproSize) -> dict[str, list[dict]]:
    """`{"train": rows, "test": rows}` of prompt/chosen/rejected pairs (test problems never seen in training)."""
    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows

    train = generate_problems(size.num_train, "train", size.levels, seed=TRAIN_SEED)
    test = generate_problems(size.num_test, "test", size.levels, seed=TEST_SEED)
    return {
        "train": preference_rows(train, negatives=1, seed=TRAIN_SEED),
        "test": preference_rows(test, negatives=1, seed=TEST_SEED),
    }


def write_pairs(output_dir: Path, pairs: dict[str, list[dict]]) -> dict[str, Path]:
    """The pair sets as jsonl (the training runs read `train.jsonl`); rewritten identically on a rerun."""
    paths = {}
    for split, rows in pairs.items():
        path = output_dir / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)
        paths[split] = path
    return paths


@contextmanager
def timed(timings: dict, name: str):
    """`stage(name)`'s progress lines, and the stage's seconds in `timings[name]`."""
    from align.pipeline import stage

    began = time.perf_counter()
    with stage(name):
        yield
    timings[name] = round(time.perf_counter() - began, 1)


def entanglement_records(run_dir: Path) -> list[dict]:
    from align.diagnostics.entanglement import ENTANGLEMENT_FILE, read_records

    path = run_dir / ENTANGLEMENT_FILE
    return read_records(str(path)) if path.exists() else []


def repro_config(size: MarginReproSize, model: str, seeds: list[int]) -> dict:
    return {
        "experiment": "margin",
        "model": model,
        "seeds": seeds,
        **asdict(size),
        "levels": list(size.levels),
        "steps": size.steps,
        "arms": {arm: loss_fields(arm) for arm in ARMS},
    }


def run_margin_repro(output_dir: Path, size: MarginReproSize, model: str, *, seeds: list[int]) -> dict:
    """Every stage of the module docstring for every seed, then the report; finished stages are reused."""
    from transformers import set_seed

    from align.experiments.margin_measure import ches_scores, measure
    from align.experiments.margin_report import write_outputs
    from align.experiments.prm import merged_timings
    from align.experiments.runs import check_repro_config
    from align.pipeline import train_recipe
    from align.resources import recipe_path

    output_dir = output_dir.resolve()
    config = repro_config(size, model, seeds)
    check_repro_config(output_dir, config)
    pairs = build_pairs(size)
    files = write_pairs(output_dir, pairs)
    scoring = {"max_length": size.max_length, "batch_size": size.score_batch_size}
    timings: dict[str, float] = {}
    with timed(timings, f"log-probs of the start: {size.num_train} train + {size.num_test} held-out pairs"):
        start = measure(output_dir / "measure" / "start.json", model, None, pairs, **scoring)
    with timed(timings, f"CHES of the {size.num_train} training pairs under the start"):
        ches = ches_scores(output_dir / "ches" / "train.json", model, pairs["train"], **scoring)
    if "skipped" in ches:
        print(f"CHES stage skipped: {ches['skipped']}", flush=True)
    after, entanglement = {}, {}
    for seed in seeds:
        for arm in ARMS:
            name = f"{arm}-s{seed}"
            with timed(timings, f"train {name}: {size.steps} steps of {size.batch_size} pairs"):
                set_seed(seed)
                recipe = recipe_path(f"smollm2-135m-instruct/{RECIPES[arm]}.yaml")
                fields = arm_fields(arm, size, model, files["train"], seed)
                run_dir = train_recipe("margin", recipe, output_dir / "train" / name, fields)
            for checkpoint in run_dir.glob("checkpoint-*"):  # the final adapter is kept; checkpoints only for resume
                shutil.rmtree(checkpoint, ignore_errors=True)
            with timed(timings, f"log-probs of {name}"):
                after[name] = measure(output_dir / "measure" / f"{name}.json", model, run_dir, pairs, **scoring)
            entanglement[name] = entanglement_records(run_dir)
    timings = merged_timings(output_dir / "timings.json", timings)
    results = write_outputs(
        output_dir, config=config, start=start, after=after, entanglement=entanglement, ches=ches, timings=timings
    )
    print((output_dir / "report.md").read_text())
    print("stage times (s): " + ", ".join(f"{name}: {seconds}" for name, seconds in timings.items()), flush=True)
    return results
