"""Step time and peak memory of PrimeGRPOTrainer vs TRL's GRPOTrainer with the same sampling and batch.

A step is what the trainer does per optimizer step: sample `num_generations` completions per prompt (transformers
generation), grade them (one shared `VerifierReward`, so grading costs the same in both), turn the rewards into
advantages, forward/backward, AdamW. GRPO's advantages are the group-normalized outcomes; PRIME's also need the
implicit PRM, scored and updated inside the step (`_score_and_update_prm`): a reference forward without grad, a PRM
forward with grad, its backward and its own AdamW step. With LoRA the PRM is a LoRA adapter on a second copy of the
base (its reference is that base with the adapter disabled); without LoRA it is a full second model and the
reference a frozen third copy. The PRM runs with `prm_update: after` (the default: one PRM forward per step) and
`accuracy_filter: false`, so every sample is scored and learned from (with the filter on, the PRM would see only the
groups in the accuracy band, and its cost would depend on what the policy happened to sample).

To make both do identical work, the learning rates of the policy and of the PRM are 0 (the AdamW updates are
computed but move nothing, so the policies stay equal and the PRM stays at its start) and the torch seed is reset
to the same value before each step: both sample the same completions. Both checks are reported: `same_completions`
(every timed step's completion ids equal in the two trainers) and `weights_unchanged` (every trainable parameter of
both policies and of the PRM equal to its value before the first step). Both use the same `loss_type` (`dapo`), so
the policy losses differ only in the advantages. Steps are interleaved (GRPO, PRIME, GRPO, ...) so machine noise
hits both alike. Two settings: the tiny test Llama and SmolLM2-135M-Instruct with LoRA.

There is no ratio target: PRIME does more work by design. The PRM's forward and backward cost about one more policy
forward/backward (plus a reference forward), so PRIME's step is expected at about 1.5-2x GRPO's; the measured
ratio is reported, not checked. `prm_share` is the median time inside `_score_and_update_prm` over the median PRIME
step (timed per step by a wrapper on the trainer instance), `prime_without_prm_ratio` is PRIME's step less its PRM
time over GRPO's (PRIME's other extra work: the token advantages). The per-step peak RSS leaves out memory held
before the step, so the PRM's (and reference's) weights are reported apart as `prm_weights_mib`.

`python -m benchmarks prime` (or `make bench BENCH=prime`) runs both settings; `python -m benchmarks.prime --tiny`
runs the tiny model alone.
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, ratio, sampling_step_fn


LOSS_TYPE = "dapo"  # the same aggregation in both, so the policy losses differ only in the advantages


def _trainers(model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora, reward):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import prompt_rows
    from align.trainers.prime import PrimeConfig, PrimeGRPOTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=1.0,
        loss_type=LOSS_TYPE,
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
    prime = PrimeGRPOTrainer(
        model=model_path,
        reward_funcs=reward,
        args=PrimeConfig(prm_learning_rate=0.0, prm_update="after", accuracy_filter=False, **common),
        train_dataset=data,
        peft_config=lora_config(lora),
    )
    for trainer in (grpo, prime):
        trainer.create_optimizer()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return grpo, prime


class _Timed:
    """Wraps a bound method; `elapsed` accumulates the perf_counter seconds spent inside it."""

    def __init__(self, method):
        self.method = method
        self.elapsed = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.method(*args, **kwargs)
        finally:
            self.elapsed += time.perf_counter() - start


def _record_completions(trainer) -> list:
    """Wrap `_generate_and_score_completions` on the instance to keep each step's completion ids."""
    completions = []
    method = trainer._generate_and_score_completions

    def generate_and_score(inputs):
        output = method(inputs)
        completions.append(output["completion_ids"].detach().clone())
        return output

    trainer._generate_and_score_completions = generate_and_score
    return completions


def _trainable(*models) -> list:
    return [p.detach().clone() for model in models for p in model.parameters() if p.requires_grad]


def _mib(*models) -> float:
    seen, total = set(), 0
    for model in models:
        for p in model.parameters():
            if p.data_ptr() not in seen:  # tied weights once; the adapter-disabled reference is the PRM itself
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return round(total / 2**20, 1)


def measure(name, model_path, lora, prompts_per_step, num_generations, max_completion_length, repeats) -> dict:
    import statistics

    import torch

    from align.rewards import VerifierReward

    with tempfile.TemporaryDirectory(prefix="align-bench-prime-") as output_dir, VerifierReward() as reward:
        grpo, prime = _trainers(
            model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora, reward
        )
        loader = prime.get_train_dataloader()
        batches = [batch for batch, _ in zip(loader, range(4))]
        prm_models = [m for m in (prime.prm, prime.prm_reference) if m is not None]
        before = _trainable(grpo.model, prime.model, prime.prm)
        completions = {"grpo": _record_completions(grpo), "prime": _record_completions(prime)}
        prm_timer = _Timed(prime._score_and_update_prm)
        prime._score_and_update_prm = prm_timer
        prime_step = sampling_step_fn(prime, batches)
        prm_times = []

        def timed_prime_step():
            prm_timer.elapsed = 0.0
            prime_step()
            prm_times.append(prm_timer.elapsed)

        results = interleaved({"grpo": sampling_step_fn(grpo, batches), "prime": timed_prime_step}, repeats)
        after = _trainable(grpo.model, prime.model, prime.prm)
        same_completions = len(completions["grpo"]) == len(completions["prime"]) and all(
            torch.equal(a, b) for a, b in zip(completions["grpo"], completions["prime"])
        )
        unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        prime_s, grpo_s = results["prime"]["median_s"], results["grpo"]["median_s"]
        prm_s = round(statistics.median(prm_times[-repeats:]), 4)  # the timed rounds, not the warm-up
        return emit(
            "prime",
            model=name,
            lora=lora,
            prompts_per_step=prompts_per_step,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            loss_type=LOSS_TYPE,
            threads=cpu_threads(),
            grpo_step_s=grpo_s,
            prime_step_s=prime_s,
            prm_s=prm_s,
            time_ratio=ratio(prime_s, grpo_s),
            prm_share=ratio(prm_s, prime_s),
            prime_without_prm_ratio=ratio(prime_s - prm_s, grpo_s),
            peak_rss_mib={"grpo": results["grpo"]["peak_rss_mib"], "prime": results["prime"]["peak_rss_mib"]},
            memory_ratio=ratio(results["prime"]["peak_rss_mib"], results["grpo"]["peak_rss_mib"]),
            prm_weights_mib=_mib(*prm_models),
            expected_ratio="1.5-2 (not checked)",
            same_completions=same_completions,
            weights_unchanged=unchanged,
            repeats=repeats,
        )


def main(tiny_only: bool = False) -> list[dict]:
    import os

    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    records = []
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records.append(measure("tiny-llama", tiny, False, 4, 8, 32, repeats=20))
    if not tiny_only:
        smollm2 = resolve_model_path(DEFAULT_MODEL)
        records.append(measure(DEFAULT_MODEL, smollm2, True, 2, 8, 64, repeats=3))
    return records


if __name__ == "__main__":
    main(tiny_only="--tiny" in sys.argv[1:])
