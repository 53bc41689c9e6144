"""Implicit PRM: scoring throughput (batched vs one completion at a time) and training step time vs TRL.

1. `prm_scoring`: `ImplicitPRM.score` on the same model (SmolLM2-135M-Instruct with a LoRA adapter, the reference
   being its adapter-disabled base; and the tiny test Llama with a separate reference) and the same completions
   (synthetic solutions, correct and corrupted), in padded batches vs one completion per call. Target: >= 3x
   completions/s.
2. `prm_training_step`: one optimizer step (loss, backward, AdamW update) of `ImplicitPRMTrainer` vs the TRL trainer
   it builds on, on the same batch collated once and fed to both, interleaved: objective `ce` vs `KTOTrainer`
   (`kto`, whose KL estimate costs two extra forwards, and `apo_zero_unpaired`, which has none), objectives `dpo` /
   `nca` vs `DPOTrainer` (`sigmoid` / `nca_pair`). Target: ours / TRL <= 1.05.
"""

from __future__ import annotations

import os
import random
import tempfile

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, optimizer_step_fn, ratio


SCORING_TARGET = 3.0
STEP_TARGET = 1.05


def _completions(tokenizer, count: int):
    from align.data.prompts import render_prompt
    from align.data.synthetic import corrupt_solution, generate_problems

    rng = random.Random(0)
    problems = generate_problems(count, "test", levels=(1, 2, 3, 4, 5))
    prompts = [render_prompt(p.problem, tokenizer) for p in problems]
    completions = [p.solution if i % 2 else corrupt_solution(p, rng)[0] for i, p in enumerate(problems)]
    return prompts, completions


def measure_scoring(name: str, model_path: str, lora: bool, count: int, batch_size: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.prm import ImplicitPRM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    reference = None
    if lora:
        from peft import get_peft_model

        from align.models import build_lora_config

        policy = get_peft_model(policy, build_lora_config(lora_dropout=0.0))
        with torch.no_grad():  # a trained adapter: non-zero B, so the rewards are not all 0
            for parameter_name, parameter in policy.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    else:
        reference = AutoModelForCausalLM.from_pretrained(model_path)
    prompts, completions = _completions(tokenizer, count)
    batched = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=batch_size)
    single = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=1)
    together = batched.score(prompts, completions)
    alone = [single.score([p], [c])[0] for p, c in zip(prompts, completions)]
    max_diff = max(abs(a.score - b.score) for a, b in zip(together, alone))
    results = interleaved(
        {
            "one_at_a_time": lambda: [single.score([p], [c]) for p, c in zip(prompts, completions)],
            "batched": lambda: batched.score(prompts, completions),
        },
        repeats=repeats,
        warmup=0,
    )
    speedup = ratio(results["one_at_a_time"]["median_s"], results["batched"]["median_s"])
    tokens = [len(tokenizer(p + c)["input_ids"]) for p, c in zip(prompts, completions)]
    return emit(
        "prm_scoring",
        model=name,
        reference="adapter-disabled base" if lora else "separate model",
        completions=count,
        batch_size=batch_size,
        mean_tokens=round(sum(tokens) / len(tokens)),
        threads=cpu_threads(),
        batched_completions_per_s=round(count / results["batched"]["median_s"], 2),
        one_at_a_time_completions_per_s=round(count / results["one_at_a_time"]["median_s"], 2),
        speedup=speedup,
        max_score_diff_batched_vs_single=float(f"{max_diff:.2e}"),
        peak_rss_mib={k: v["peak_rss_mib"] for k, v in results.items()},
        target_speedup=SCORING_TARGET,
        meets_target=speedup >= SCORING_TARGET,
        repeats=repeats,
    )


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
        records.append(measure_scoring("tiny-llama", tiny, lora=False, count=64, batch_size=16, repeats=5))
        records += measure_training_step("tiny-llama", tiny, lora=False, batch_size=8, repeats=20)
    records.append(measure_scoring(DEFAULT_MODEL, smollm2, lora=True, count=32, batch_size=16, repeats=2))
    records += measure_training_step(DEFAULT_MODEL, smollm2, lora=True, batch_size=4, repeats=3)
    return records


if __name__ == "__main__":
    main()
