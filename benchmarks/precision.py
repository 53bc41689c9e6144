"""Training step in float32 vs `bf16: auto` (bf16 autocast, float32 master weights) on SmolLM2-135M-Instruct.

Two TRL `SFTTrainer`s are built from the same model path, data and config. A step is the Trainer's own
`training_step` (forward and backward) plus the AdamW update, on batches collated once and fed to both; the auto
variant runs it under `torch.autocast(cpu, bfloat16)` when `bf16: auto` resolves to True here, which is what
accelerate's bf16 mixed precision does on a CPU. (Both trainers are built with `bf16=False`: accelerate's state is a
process-wide singleton, so a second trainer with another mixed-precision setting would silently inherit the
first's — an earlier version of this benchmark measured float32 twice that way.)
Rounds alternate (fp32, auto, fp32, auto, ...; auto first in the second half); the
figure is the median over rounds of the auto step's time over the fp32 step's in the same round. Goal on a CPU with
native bf16: <= 0.55 (issue 15). Full fine-tuning and LoRA, batch 16 x 128 tokens, as the CPU recipes train.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, ratio


TARGET_RATIO = 0.55


def _trainer(model_path: str, output_dir: str, lora: bool, batch_size: int, max_length: int, data):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        learning_rate=1e-5,
        model_init_kwargs={"dtype": "float32"},  # master weights stay float32 in both; autocast computes in bf16
        **CPU_TRAINER_ARGS,
    )
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, peft_config=lora_config(lora))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which training_step runs inside
    trainer.model.train()
    return trainer


def _step_fn(trainer, batches, bf16: bool):
    import torch

    cycle = itertools.cycle(batches)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            trainer.training_step(trainer.model, dict(next(cycle)))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def measure(model_path: str, name: str, lora: bool, batch_size: int, max_length: int, repeats: int) -> dict:
    from datasets import Dataset

    from align.data.synthetic import generate_problems
    from align.data.training import sft_rows
    from align.precision import auto_mixed_precision

    auto_bf16 = auto_mixed_precision(use_cpu=True)
    num_batches = 3
    problems = generate_problems(num_batches * batch_size, "train", levels=(3, 4, 5), seed=0)
    data = Dataset.from_list(sft_rows(problems))
    with tempfile.TemporaryDirectory(prefix="align-bench-precision-") as output_dir:
        trainers = {
            "fp32": _trainer(model_path, output_dir, lora, batch_size, max_length, data),
            "auto": _trainer(model_path, output_dir, lora, batch_size, max_length, data),
        }
        loader = trainers["fp32"].get_train_dataloader()
        batches = [trainers["fp32"]._prepare_inputs(batch) for batch, _ in zip(loader, range(num_batches))]
        bf16 = {"fp32": False, "auto": auto_bf16}
        steps = {variant: _step_fn(trainer, batches, bf16[variant]) for variant, trainer in trainers.items()}
        halves = [
            interleaved(steps, repeats=repeats // 2),
            interleaved(dict(reversed(steps.items())), repeats=repeats - repeats // 2),
        ]
        times = {variant: [t for half in halves for t in half[variant]["times_s"]] for variant in steps}
        peaks = {variant: max(half[variant]["peak_rss_mib"] for half in halves) for variant in steps}
        paired = statistics.median(auto / fp32 for fp32, auto in zip(times["fp32"], times["auto"]))
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches)
        return emit(
            "precision",
            model=name,
            lora=lora,
            auto_resolves_to="bf16 autocast" if auto_bf16 else "float32",
            batch_size=batch_size,
            mean_tokens_per_batch=round(tokens),
            threads=cpu_threads(),
            fp32_step_s=round(statistics.median(times["fp32"]), 3),
            auto_step_s=round(statistics.median(times["auto"]), 3),
            time_ratio=round(paired, 3),
            peak_rss_mib=peaks,
            memory_ratio=ratio(peaks["auto"], peaks["fp32"]),
            target_ratio=TARGET_RATIO,
            meets_target=paired <= TARGET_RATIO,
            repeats=repeats,
            times_s=times,
        )


def main(repeats: int = 6) -> list[dict]:
    from align.models import DEFAULT_MODEL, resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(DEFAULT_MODEL)
    return [
        measure(path, DEFAULT_MODEL, lora=lora, batch_size=16, max_length=128, repeats=repeats)
        for lora in (False, True)
    ]


if __name__ == "__main__":
    main()
