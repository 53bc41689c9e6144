"""Implicit PRM: training step time vs TRL (scoring throughput: `benchmarks/prm_scoring.py`).

`prm_training_step`: one optimizer step (loss, backward, AdamW update) of `ImplicitPRMTrainer` vs the TRL trainer it
builds on, on the same batch collated once and fed to both, interleaved: objective `ce` vs `KTOTrainer` (`kto`, whose
KL estimate costs two extra forwards, and `apo_zero_unpaired`, which has none), objectives `dpo` / `nca`
vs `DPOTrainer` (`sigmoid` / `nca_pair`). Target: ours / TRL <= 1.05.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, optimizer_step_fn, ratio


STEP_TARGET = 1.05


def _datasets(num_rows: int):
    from datasets import Dataset

    from align.data.synthetic import generate_problems
    from align.data.training import outcome_rows, preference_rows

    problems = generate_problems(num_rows, "train", levels=(1, 2, 3), seed=0)
    # One correct and one incorrect row per problem, interleaved, so every batch holds both labels.
    return Dataset.from_list(outcome_rows(problems)), Dataset.from_list(preference_rows(problems))


def _batches(trainer, batch_size: int, count: int):
    rows = [trainer.train_dataset[i] for i in range(batch_size * count)]
    return [
        trainer._prepare_inputs(trainer.data_collator(rows[i : i + batch_size]))
        for i in range(0, len(rows), batch_size)
    ]


def measure_training_step(name: str, model_path: str, lora: bool, batch_size: int, repeats: int) -> list[dict]:
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from align.trainers.implicit_prm import ImplicitPRMConfig, ImplicitPRMTrainer

    outcome, pairs = _datasets(4 * batch_size)
    records = []
    with tempfile.TemporaryDirectory(prefix="align-bench-prm-") as output_dir:
        common = dict(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            max_length=256,
            learning_rate=1e-4,
            beta=0.05,
            **CPU_TRAINER_ARGS,
        )

        def build(trainer_cls, config, data):
            trainer = trainer_cls(model=model_path, args=config, train_dataset=data, peft_config=lora_config(lora))
            trainer.create_optimizer()
            trainer.model.train()
            return trainer

        comparisons = [
            (
                "ce",
                build(ImplicitPRMTrainer, ImplicitPRMConfig(objective="ce", **common), outcome),
                {
                    "kto": build(KTOTrainer, KTOConfig(loss_type="kto", **common), outcome),
                    "kto_apo_zero_unpaired": build(
                        KTOTrainer, KTOConfig(loss_type="apo_zero_unpaired", **common), outcome
                    ),
                },
            ),
            (
                "dpo",
                build(ImplicitPRMTrainer, ImplicitPRMConfig(objective="dpo", **common), pairs),
                {"dpo_sigmoid": build(DPOTrainer, DPOConfig(loss_type=["sigmoid"], **common), pairs)},
            ),
            (
                "nca",
                build(ImplicitPRMTrainer, ImplicitPRMConfig(objective="nca", **common), pairs),
                {"dpo_nca_pair": build(DPOTrainer, DPOConfig(loss_type=["nca_pair"], **common), pairs)},
            ),
        ]
        for objective, ours, baselines in comparisons:
            for baseline_name, baseline in baselines.items():
                # The same rows collated by each trainer's own collator (KTO's adds its KL completions).
                variants = {
                    baseline_name: optimizer_step_fn(baseline, _batches(baseline, batch_size, 2)),
                    "implicit_prm": optimizer_step_fn(ours, _batches(ours, batch_size, 2)),
                }
                results = interleaved(variants, repeats=repeats)
                step_ratio = ratio(results["implicit_prm"]["median_s"], results[baseline_name]["median_s"])
                records.append(
                    emit(
                        "prm_training_step",
                        model=name,
                        lora=lora,
                        objective=objective,
                        baseline=baseline_name,
                        batch_size=batch_size,
                        threads=cpu_threads(),
                        implicit_prm_step_s=results["implicit_prm"]["median_s"],
                        baseline_step_s=results[baseline_name]["median_s"],
                        time_ratio=step_ratio,
                        peak_rss_mib={k: v["peak_rss_mib"] for k, v in results.items()},
                        target_ratio=STEP_TARGET,
                        meets_target=step_ratio <= STEP_TARGET,
                        repeats=repeats,
                    )
                )
    return records


def main() -> list[dict]:
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = []
    smollm2 = resolve_model_path(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records += measure_training_step("tiny-llama", tiny, lora=False, batch_size=8, repeats=20)
    records += measure_training_step(DEFAULT_MODEL, smollm2, lora=True, batch_size=4, repeats=3)
    return records


if __name__ == "__main__":
    main()
