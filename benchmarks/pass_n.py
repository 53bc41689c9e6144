"""Step time and peak memory of PassAtNGRPOTrainer vs TRL's GRPOTrainer with the same sampling and batch.

A step is what the trainer does per optimizer step: sample `num_generations` completions per prompt (transformers
generation), grade them (one shared `VerifierReward`, so grading costs the same in both), turn the rewards into
advantages (GRPO) or pass@N weights (ours), forward/backward, AdamW. The two differ only in the advantages, so the
target is a ratio <= 1.05. To make both do identical work, the learning rate is 0 (the AdamW update is computed
but moves nothing, so the two models stay equal) and the torch seed is reset to the same value before each
step: both sample the same completions. Steps are interleaved (GRPO, pass@N, GRPO, ...) so machine noise hits both
alike. Two settings: the tiny test Llama and SmolLM2-135M-Instruct with LoRA.
"""

from __future__ import annotations

import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, ratio, sampling_step_fn


TARGET_RATIO = 1.05


def _trainers(model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora, reward):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import prompt_rows
    from align.trainers.pass_n import PassAtNConfig, PassAtNGRPOTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=1.0,
        loss_type="dr_grpo",  # the same aggregation in both, so only the advantages differ
        learning_rate=0.0,
        **CPU_TRAINER_ARGS,
    )
    data = Dataset.from_list(prompt_rows(generate_problems(8 * prompts_per_step, "train", levels=(1,), seed=0)))

    grpo = GRPOTrainer(
        model=model_path,
        reward_funcs=reward,
        args=GRPOConfig(**common),
        train_dataset=data,
        peft_config=lora_config(lora),
    )
    pass_n = PassAtNGRPOTrainer(
        model=model_path,
        reward_funcs=reward,
        args=PassAtNConfig(pass_n=16, **common),
        train_dataset=data,
        peft_config=lora_config(lora),
    )
    for trainer in (grpo, pass_n):
        trainer.create_optimizer()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return grpo, pass_n


def measure(name, model_path, lora, prompts_per_step, num_generations, max_completion_length, repeats) -> dict:
    from align.rewards import VerifierReward

    with tempfile.TemporaryDirectory(prefix="align-bench-pass-n-") as output_dir, VerifierReward() as reward:
        grpo, pass_n = _trainers(
            model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora, reward
        )
        loader = pass_n.get_train_dataloader()
        batches = [batch for batch, _ in zip(loader, range(4))]
        results = interleaved(
            {"grpo": sampling_step_fn(grpo, batches), "pass_n": sampling_step_fn(pass_n, batches)}, repeats
        )
        time_ratio = ratio(results["pass_n"]["median_s"], results["grpo"]["median_s"])
        return emit(
            "pass_n",
            model=name,
            lora=lora,
            prompts_per_step=prompts_per_step,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            threads=cpu_threads(),
            grpo_step_s=results["grpo"]["median_s"],
            pass_n_step_s=results["pass_n"]["median_s"],
            time_ratio=time_ratio,
            peak_rss_mib={"grpo": results["grpo"]["peak_rss_mib"], "pass_n": results["pass_n"]["peak_rss_mib"]},
            memory_ratio=ratio(results["pass_n"]["peak_rss_mib"], results["grpo"]["peak_rss_mib"]),
            target_ratio=TARGET_RATIO,
            meets_target=time_ratio <= TARGET_RATIO,
            repeats=repeats,
        )


def main() -> list[dict]:
    import os

    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    records = []
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records.append(measure("tiny-llama", tiny, False, 4, 8, 32, repeats=20))
    smollm2 = resolve_model_path(DEFAULT_MODEL)
    records.append(measure(DEFAULT_MODEL, smollm2, True, 2, 8, 64, repeats=3))
    return records


if __name__ == "__main__":
    main()
