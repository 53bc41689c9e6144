"""Step time and peak memory of MarginPreferenceTrainer vs TRL's DPOTrainer (sigmoid), side by side.

Same model (the embedded SmolLM2-135M-Instruct with LoRA r=16 on all linear layers, as in the CPU recipe), same
offline synthetic pairs, same batches and seed. Each variant is one `trainer.train()` of `STEPS` optimizer steps on
its own trainer, timed interleaved with the others (`benchmarks.common.interleaved`):

- `trl_dpo`: TRL's DPOTrainer, `loss_type=["sigmoid"]` (the baseline);
- `margin_dpo`: our trainer, `margin_loss: dpo`, diagnostics off (target: <= 1.03x the baseline);
- `margin_dpo_diagnostics`: plus `entanglement_steps: 10, entanglement_pairs: 4` over the LoRA weights, i.e. one
  diagnosed step per 10 (target: amortized <= 1.3x);
- `margin_dpo_normalized`: `normalize_pair_gradients: true`, which under LoRA takes the one-backward path (per-sequence
  gradients from the policy forward and one backward, `align.per_sample_grads`; target: <= 1.3x);
- `margin_dpo_normalized_per_sequence`: the same update by its exact fallback path, one extra forward and backward
  per sequence (`fast_normalized_update = False`; reported, no target).
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, ratio


STEPS = 10
PAIRS_PER_BATCH = 4
MAX_LENGTH = 160


def _trainers(model_path: str, output_root: str) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows
    from align.models import build_lora_config, load_tokenizer
    from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

    tokenizer = load_tokenizer(model_path)
    dataset = Dataset.from_list(preference_rows(generate_problems(STEPS * PAIRS_PER_BATCH, "train", [1], 0)))
    common = dict(
        **CPU_TRAINER_ARGS,
        logging_steps=STEPS,
        max_steps=STEPS,
        per_device_train_batch_size=PAIRS_PER_BATCH,
        max_length=MAX_LENGTH,
        learning_rate=5e-5,
        dataloader_num_workers=0,
    )
    variants = {
        "trl_dpo": (DPOTrainer, DPOConfig, {}),
        "margin_dpo": (MarginPreferenceTrainer, MarginPreferenceConfig, {"margin_loss": "dpo"}),
        "margin_dpo_diagnostics": (
            MarginPreferenceTrainer,
            MarginPreferenceConfig,
            {"margin_loss": "dpo", "entanglement_steps": 10, "entanglement_pairs": 4},
        ),
        "margin_dpo_normalized": (
            MarginPreferenceTrainer,
            MarginPreferenceConfig,
            {"margin_loss": "dpo", "normalize_pair_gradients": True},
        ),
        "margin_dpo_normalized_per_sequence": (
            MarginPreferenceTrainer,
            MarginPreferenceConfig,
            {"margin_loss": "dpo", "normalize_pair_gradients": True},
        ),
    }
    trainers = {}
    for name, (trainer_cls, config_cls, extra) in variants.items():
        args = config_cls(output_dir=os.path.join(output_root, name), **common, **extra)
        trainers[name] = trainer_cls(
            model=model_path,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=build_lora_config(lora_r=16, lora_alpha=32, lora_dropout=0.0),
        )
        # Keep stdout to the one JSON line of the result (the Trainer prints every log dict otherwise).
        trainers[name].remove_callback(PrinterCallback)
    trainers["margin_dpo_normalized_per_sequence"].fast_normalized_update = False
    return trainers


def _warm_up(trainer) -> None:
    """One step per trainer before timing: first-call costs (thread pools, allocator) are not the method's."""
    steps = trainer.args.max_steps
    trainer.args.max_steps = 1
    trainer.train()
    trainer.args.max_steps = steps


def main(repeats: int = 2) -> dict:
    import torch

    from align.models import DEFAULT_MODEL, resolve_model_path

    torch.manual_seed(0)
    model_path = resolve_model_path(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="align-bench-margin-") as root:
        trainers = _trainers(model_path, root)
        for trainer in trainers.values():
            _warm_up(trainer)
        timings = interleaved({name: t.train for name, t in trainers.items()}, repeats=repeats, warmup=0)
        paths = {
            name: t.normalized_update_path for name, t in trainers.items() if name.startswith("margin_dpo_normalized")
        }
    base = timings["trl_dpo"]["median_s"]
    ratios = {name: ratio(t["median_s"], base) for name, t in timings.items() if name != "trl_dpo"}
    return emit(
        "margin",
        model=f"{DEFAULT_MODEL} + LoRA r=16 (all-linear), fp32, CPU threads={cpu_threads()}",
        steps_per_run=STEPS,
        pairs_per_batch=PAIRS_PER_BATCH,
        max_length=MAX_LENGTH,
        repeats=repeats,
        median_run_s={name: t["median_s"] for name, t in timings.items()},
        ratio_vs_trl_dpo=ratios,
        targets={"margin_dpo": 1.03, "margin_dpo_diagnostics": 1.3, "margin_dpo_normalized": 1.3},
        meets_targets={
            "margin_dpo": ratios["margin_dpo"] <= 1.03,
            "margin_dpo_diagnostics": ratios["margin_dpo_diagnostics"] <= 1.3,
            "margin_dpo_normalized": ratios["margin_dpo_normalized"] <= 1.3,
        },
        normalized_update_path=paths,
        peak_rss_mib={name: t["peak_rss_mib"] for name, t in timings.items()},
        runs_s={name: t["times_s"] for name, t in timings.items()},
        note="one train() of steps_per_run optimizer steps per run; diagnostics: 1 diagnosed step per 10 (4 pairs)",
    )


if __name__ == "__main__":
    main()
