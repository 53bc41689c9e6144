"""The PRIME proving ground (`align repro prime`): dense implicit process rewards against outcome-only RL, from the
same warmed-up policy, on the same prompts with the same sample budget.

Cui et al. 2025 (arXiv 2502.01456) claim that PRIME reaches the reward of outcome-only RLOO with 2.5x fewer samples
(Fig. 3) and beats it on held-out problems. At CPU scale, three arms per seed:

- `prime`: `align train prime` (recipes/smollm2-135m-instruct/prime.yaml): a LoRA PRM over the start, updated online;
- `rloo`: the same trainer with `use_process_rewards: false`: outcome advantages only (RLOO, K/(K−1)(r − mean)),
  the same accuracy filter and whitening: PRIME's own baseline, only the process reward differs;
- `grpo`: `align train grpo` with the same loss aggregation (TRL's (r − mean)/std advantages).

Every arm: the PRM proving ground's warm-up as the start (`start/`; `--start` reuses an existing one), the synthetic
train split (levels 1-2) drawn with the run's seed, `steps` optimizer steps of `prompts_per_step` x K = 8 samples at
temperature 1, policy LoRA lr 2e-4 and (prime) PRM lr 2e-4, β = 0.05, all fixed before the first run (the recipes'
and the PRM proving ground's values); seed s drives the problems, sampling and LoRA init, identical across arms.
Held out: `num_test` test-split problems x n = 8 samples at temperature 1 from each final policy and from the start;
pass@1 and pass@8 per arm, each difference with a paired-bootstrap 95 % interval over problems; the training reward
per sampled completion (the sample-efficiency curve) from each run's log.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from align.data.prompts import DEFAULT_INSTRUCTION


ARMS = ("prime", "rloo", "grpo")
METHOD = {"prime": "prime", "rloo": "prime", "grpo": "grpo"}


@dataclass
class PrimeReproSize:
    """Sizes of the proving ground (`QUICK` is a pipeline check)."""

    levels: tuple[int, ...] = (1, 2)
    num_train: int = 512
    steps: int = 16
    prompts_per_step: int = 2
    k: int = 8
    learning_rate: float = 2e-4
    prm_learning_rate: float = 2e-4
    beta: float = 0.05
    max_new_tokens: int = 160
    temperature: float = 1.0
    num_test: int = 100
    n: int = 8
    eval_batch_size: int = 32


QUICK = PrimeReproSize(
    levels=(1,), num_train=8, steps=2, prompts_per_step=2, k=4, max_new_tokens=16, num_test=4, n=4, eval_batch_size=8
)


def arm_fields(arm: str, size: PrimeReproSize, start: Path, seed: int) -> dict:
    """Recipe fields of one arm; everything but the advantages is shared."""
    fields = {
        "model_name_or_path": str(start),
        "synthetic_levels": list(size.levels),
        "synthetic_num_train": size.num_train,
        "prompt_instruction": DEFAULT_INSTRUCTION,
        "num_generations": size.k,
        "per_device_train_batch_size": size.prompts_per_step * size.k,
        "max_steps": size.steps,
        "learning_rate": size.learning_rate,
        "temperature": size.temperature,
        "max_completion_length": size.max_new_tokens,
        "loss_type": "dapo",
        "beta": 0.0,
        "save_steps": max(size.steps // 4, 1),
        "logging_steps": 1,
        "seed": seed,
        "report_to": "none",
    }
    if arm == "prime":
        fields.update(prm_learning_rate=size.prm_learning_rate, prm_beta=size.beta)
    elif arm == "rloo":
        fields["use_process_rewards"] = False
    return fields


def sampling_options(size: PrimeReproSize) -> dict:
    return {
        "temperature": size.temperature,
        "top_p": 1.0,
        "max_new_tokens": size.max_new_tokens,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": DEFAULT_INSTRUCTION,
        "seed": 0,
    }


def training_curve(run_dir: Path, samples_per_step: int) -> list[dict]:
    """Per optimizer step: samples drawn so far and the mean verifier reward of that step's samples (plus PRIME's
    PRM accuracy and filtered share when logged)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    curve = []
    for entry in history:
        if "reward" not in entry or "step" not in entry:
            continue
        point = {"step": entry["step"], "samples": entry["step"] * samples_per_step, "reward": entry["reward"]}
        for key in ("prime/prm_accuracy", "prime/filtered_frac", "prime/process_reward_mean", "step_time"):
            if key in entry:
                point[key.removeprefix("prime/")] = entry[key]
        curve.append(point)
    return curve


def resolve_start(output_dir: Path, start: Path | None, model: str) -> Path:
    """`--start` (a merged warm-up, e.g. runs/repro-prm/start), else the PRM proving ground's warm-up run here."""
    if start is not None:
        if not (Path(start) / "config.json").is_file():
            from align.errors import InputError

            raise InputError(f"--start {start}: no model there (config.json missing); run `align repro prm` first")
        return Path(start).resolve()
    from align.experiments.prm import PRMReproSize, warm_start

    return warm_start(output_dir, PRMReproSize(), model)


def run_prime_repro(
    output_dir: Path, size: PrimeReproSize, model: str, *, seeds: list[int], start: Path | None = None
) -> dict:
    """Every arm for every seed, the held-out evaluations, the report; each finished stage is reused on a rerun."""
    from transformers import set_seed

    from align.data.synthetic import generate_problems
    from align.experiments.prime_report import write_outputs
    from align.experiments.prm import merged_timings
    from align.experiments.runs import check_repro_config
    from align.pipeline import evaluate, stage, train_recipe, write_problems
    from align.training import default_recipe

    output_dir = output_dir.resolve()
    config = {"experiment": "prime", "model": model, "seeds": seeds, **asdict(size), "levels": list(size.levels)}
    check_repro_config(output_dir, config)
    start = resolve_start(output_dir, start, model)
    timings: dict[str, float] = {}
    test_file = write_problems(generate_problems(size.num_test, "test", size.levels), output_dir / "test.jsonl")
    began = time.perf_counter()
    with stage(f"held-out samples of the start: {size.num_test} problems x {size.n}"):
        summaries = {
            "start": evaluate(start, test_file, output_dir / "eval" / "start", n=size.n, **sampling_options(size))
        }
    timings["eval start"] = round(time.perf_counter() - began, 1)
    curves = {}
    for seed in seeds:
        for arm in ARMS:
            name = f"{arm}-s{seed}"
            began = time.perf_counter()
            with stage(f"train {name}: {size.steps} steps of {size.prompts_per_step} x {size.k} samples"):
                set_seed(seed)
                recipe = default_recipe(METHOD[arm])
                run_dir = train_recipe(
                    METHOD[arm], recipe, output_dir / "train" / name, arm_fields(arm, size, start, seed)
                )
            timings[f"train {name}"] = round(time.perf_counter() - began, 1)
            curves[name] = training_curve(run_dir, size.prompts_per_step * size.k)
            for checkpoint in run_dir.glob("checkpoint-*"):  # the final model is kept; checkpoints only for resume
                shutil.rmtree(checkpoint, ignore_errors=True)
            began = time.perf_counter()
            with stage(f"held-out samples of {name}"):
                summaries[name] = evaluate(
                    run_dir, test_file, output_dir / "eval" / name, n=size.n, **sampling_options(size)
                )
            timings[f"eval {name}"] = round(time.perf_counter() - began, 1)
    timings = merged_timings(output_dir / "timings.json", timings)
    results = write_outputs(output_dir, summaries=summaries, curves=curves, size=size, seeds=seeds, timings=timings)
    print((output_dir / "report.md").read_text())
    return results
