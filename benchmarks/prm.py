"""Implicit PRM: scoring throughput (batched vs one completion at a time) and training step time vs TRL.

1. `prm_scoring`: completion tokens scored per second by `ImplicitPRM.score` (SmolLM2-135M-Instruct with a LoRA
   adapter, the reference being its adapter-disabled base; and the tiny test Llama with a separate reference) on N
   completions per prompt, as a sampler gives them (synthetic solutions, right and with an error at some step), against
   the compute floor measured in the same run: plain forward passes of the policy and the reference over exactly the
   completion tokens, packed into rows of the mean completion length (no padding, no prompt). Target: >= 0.8x the
   floor. Also against one completion per call (the loop a caller would write) and against batching without the
   shared prompt cache (`share_prompt=False`: what the scorer did before), for the attribution.
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


FLOOR_TARGET = 0.8  # tokens/s of ImplicitPRM.score / tokens/s of the floor
STEP_TARGET = 1.05


def _completions(tokenizer, num_prompts: int, per_prompt: int):
    """`per_prompt` completions of each of `num_prompts` synthetic problems: the solution, and versions with one
    error injected at a varying step (later steps follow from it, so lengths and texts differ as samples do)."""
    from align.data.prompts import render_prompt
    from align.data.step_errors import computation_steps, correct_steps, inject_error
    from align.data.synthetic import generate_problems

    rng = random.Random(0)
    problems = generate_problems(num_prompts, "test", levels=(2, 3, 4, 5))
    prompts, completions = [], []
    for problem in problems:
        right = correct_steps(problem)
        for j in range(per_prompt):
            steps = right if j % 4 == 0 else inject_error(problem, rng.randrange(computation_steps(problem)), rng)[0]
            prompts.append(render_prompt(problem.problem, tokenizer))
            completions.append("\n\n".join(steps))
    return prompts, completions


def _floor_fn(policy, reference, scorer, prompts, completions, batch_size: int):
    """Plain forwards of both models over exactly the scored tokens (completion + end of turn), packed into rows of
    the mean completion length: the compute floor of scoring, with no prompt and no padding."""
    import torch

    encoded = [scorer._segment(p, c, None, i) for i, (p, c) in enumerate(zip(prompts, completions))]
    stream = [token for item in encoded for token in item.input_ids[item.completion_start :]]
    width = round(len(stream) / len(encoded))
    rows = [stream[i : i + width] for i in range(0, len(stream), width)]
    full = [row for row in rows if len(row) == width]
    batches = [torch.tensor(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [torch.tensor([row]) for row in rows if len(row) != width]  # the shorter last row, alone: no padding
    total = sum(batch.numel() for batch in batches)
    assert total == len(stream), (total, len(stream))

    @torch.inference_mode()
    def run():
        for batch in batches:
            policy(input_ids=batch)
            if reference is not None:
                reference(input_ids=batch)
            else:
                with policy.disable_adapter():
                    policy(input_ids=batch)

    return run, len(stream)


def measure_scoring(
    name: str, model_path: str, lora: bool, num_prompts: int, per_prompt: int, batch_size: int, repeats: int
) -> dict:
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
    policy.eval()
    prompts, completions = _completions(tokenizer, num_prompts, per_prompt)
    ours = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=batch_size)
    unshared = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=batch_size, share_prompt=False)
    single = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=1, share_prompt=False)
    floor, scored_tokens = _floor_fn(policy, reference, ours, prompts, completions, batch_size)
    together = ours.score(prompts, completions)
    alone = [single.score([p], [c])[0] for p, c in zip(prompts, completions)]
    max_diff = max(abs(a.score - b.score) for a, b in zip(together, alone))
    assert sum(len(r.token_rewards) for r in together) == scored_tokens
    results = interleaved(
        {
            "floor": floor,
            "ours": lambda: ours.score(prompts, completions),
            "batched_without_prompt_cache": lambda: unshared.score(prompts, completions),
            "one_at_a_time": lambda: [single.score([p], [c]) for p, c in zip(prompts, completions)],
        },
        repeats=repeats,
        warmup=1,
    )
    tokens_per_s = {key: round(scored_tokens / value["median_s"], 1) for key, value in results.items()}
    of_floor = ratio(results["floor"]["median_s"], results["ours"]["median_s"])
    prompt_tokens = [ours._segment(p, c, None, 0).completion_start for p, c in zip(prompts, completions)]
    return emit(
        "prm_scoring",
        model=name,
        reference="adapter-disabled base" if lora else "separate model",
        prompts=num_prompts,
        completions_per_prompt=per_prompt,
        batch_size=batch_size,
        mean_prompt_tokens=round(sum(prompt_tokens) / len(prompt_tokens)),
        mean_completion_tokens=round(scored_tokens / len(completions)),
        threads=cpu_threads(),
        completion_tokens_per_s=tokens_per_s,
        ours_over_floor=of_floor,
        ours_over_one_at_a_time=ratio(results["one_at_a_time"]["median_s"], results["ours"]["median_s"]),
        ours_over_batched_without_prompt_cache=ratio(
            results["batched_without_prompt_cache"]["median_s"], results["ours"]["median_s"]
        ),
        max_score_diff_vs_one_at_a_time=float(f"{max_diff:.2e}"),
        peak_rss_mib={k: v["peak_rss_mib"] for k, v in results.items()},
        target_over_floor=FLOOR_TARGET,
        meets_target=of_floor >= FLOOR_TARGET,
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
        records.append(
            measure_scoring("tiny-llama", tiny, False, num_prompts=8, per_prompt=16, batch_size=16, repeats=5)
        )
        records += measure_training_step("tiny-llama", tiny, lora=False, batch_size=8, repeats=20)
    records.append(
        measure_scoring(DEFAULT_MODEL, smollm2, True, num_prompts=8, per_prompt=16, batch_size=16, repeats=3)
    )
    records += measure_training_step(DEFAULT_MODEL, smollm2, lora=True, batch_size=4, repeats=3)
    return records


if __name__ == "__main__":
    main()
