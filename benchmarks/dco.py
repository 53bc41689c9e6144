"""Step time and peak memory of DCOTrainer vs TRL's SFTTrainer on the same batches.

Both trainers are built from the same model path, config values and data. A step is one optimizer step
(`compute_loss`, backward, AdamW update) on batches collated once from the DCO trainer's dataloader and fed to both.
The variants alternate (SFT, DCO, SFT, DCO, ...; DCO first in the second half of the rounds) so machine noise hits
both alike; the reported ratio is the median over rounds of DCO's step time over SFT's in the same round. DCO
differs from SFT only in its loss: a per-sequence sum of the fused head's log-probabilities and a few scalar ops
per sequence, so the target is a ratio <= 1.03. Two settings: the tiny test Llama (full fine-tuning) and
SmolLM2-135M-Instruct with LoRA.
"""

from __future__ import annotations

import os
import statistics
import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, optimizer_step_fn, ratio


TARGET_RATIO = 1.03


def _dataset(num_rows: int):
    from datasets import Dataset

    from align.data.synthetic import generate_problems
    from align.data.training import sft_rows

    return Dataset.from_list(sft_rows(generate_problems(num_rows, "train", levels=(1, 2, 3), seed=0)))


def _trainers(model_path: str, output_dir: str, batch_size: int, max_length: int, lora: bool, num_rows: int):
    from trl import SFTConfig, SFTTrainer

    from align.trainers.dco import DCOConfig, DCOTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        learning_rate=1e-4,
        **CPU_TRAINER_ARGS,
    )
    data = _dataset(num_rows)

    sft = SFTTrainer(model=model_path, args=SFTConfig(**common), train_dataset=data, peft_config=lora_config(lora))
    dco = DCOTrainer(
        model=model_path, args=DCOConfig(pass_n=16, **common), train_dataset=data, peft_config=lora_config(lora)
    )
    for trainer in (sft, dco):
        trainer.create_optimizer()
        trainer.model.train()
    return sft, dco


def measure(name: str, model_path: str, lora: bool, batch_size: int, max_length: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="align-bench-dco-") as output_dir:
        num_batches = 4
        sft, dco = _trainers(model_path, output_dir, batch_size, max_length, lora, num_batches * batch_size)
        loader = dco.get_train_dataloader()
        batches = [dco._prepare_inputs(batch) for batch, _ in zip(loader, range(num_batches))]
        steps = {"sft": optimizer_step_fn(sft, batches), "dco": optimizer_step_fn(dco, batches)}
        # Half the rounds run SFT first, half DCO first, so neither pays for going first (allocator, caches).
        halves = [
            interleaved(steps, repeats=repeats // 2),
            interleaved(dict(reversed(steps.items())), repeats=repeats - repeats // 2),
        ]
        times = {name: [t for half in halves for t in half[name]["times_s"]] for name in steps}
        medians = {name: statistics.median(values) for name, values in times.items()}
        # The ratio of the two steps of each round, then the median: a slow spell of the shared machine slows
        # both steps of a round, so pairing cancels it where the ratio of overall medians would not.
        paired = statistics.median(dco / sft for sft, dco in zip(times["sft"], times["dco"]))
        peaks = {name: max(half[name]["peak_rss_mib"] for half in halves) for name in steps}
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches)
        return emit(
            "dco",
            model=name,
            lora=lora,
            batch_size=batch_size,
            mean_tokens_per_batch=round(tokens),
            threads=cpu_threads(),
            sft_step_s=round(medians["sft"], 4),
            dco_step_s=round(medians["dco"], 4),
            time_ratio=round(paired, 3),
            ratio_of_medians=ratio(medians["dco"], medians["sft"]),
            peak_rss_mib=peaks,
            memory_ratio=ratio(peaks["dco"], peaks["sft"]),
            target_ratio=TARGET_RATIO,
            meets_target=paired <= TARGET_RATIO,
            repeats=repeats,
            times_s=times,
        )


def main() -> list[dict]:
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = []
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records.append(measure("tiny-llama", tiny, lora=False, batch_size=8, max_length=256, repeats=200))
    smollm2 = resolve_model_path(DEFAULT_MODEL)
    records.append(measure(DEFAULT_MODEL, smollm2, lora=True, batch_size=4, max_length=256, repeats=16))
    return records


if __name__ == "__main__":
    main()
