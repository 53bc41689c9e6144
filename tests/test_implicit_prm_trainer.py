"""The implicit PRM trainer: each objective trains from its closed-form initial loss, LoRA and frozen references,
precomputed reference log-probs, class balancing, clear errors, agreement with the scorer, and learning (AUC)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from align.data.synthetic import generate_problems
from align.data.training import outcome_rows, preference_rows
from align.prm import SETTINGS_FILE, ImplicitPRM
from align.trainers.implicit_prm import (
    ImplicitPRMConfig,
    ImplicitPRMTrainer,
    OutcomeImplicitPRMTrainer,
    PairwiseImplicitPRMTrainer,
)


def _outcome_dataset(count=8, negatives=1):
    return Dataset.from_list(outcome_rows(generate_problems(count, "train", levels=[1]), negatives=negatives))


def _pair_dataset(count=8):
    return Dataset.from_list(preference_rows(generate_problems(count, "train", levels=[1])))


def _config(cpu_args, **fields):
    defaults = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, max_length=256)
    return ImplicitPRMConfig(**{**cpu_args, **defaults, **fields})


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"objective": "kto"}, "objective must be one of"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"class_balance": "prompt"}, "class_balance must be one of"),
        ({"objective": "dpo", "class_balance": "dataset"}, "apply to objective 'ce'"),
        ({"desirable_weight": -1.0}, "must be >= 0"),
        ({"loss_type": ["ipo"]}, "loss_type=.* is a DPOTrainer loss option"),
        ({"label_smoothing": 0.1}, "label_smoothing=0.1 is a DPOTrainer loss option"),
        ({"step_pattern": "(unclosed"}, "not a valid regex"),
    ],
)
def test_config_rejects_bad_fields_by_name(cpu_args, fields, message):
    with pytest.raises(ValueError, match=message):
        _config(cpu_args, **fields)


def test_config_defaults_follow_the_paper(cpu_args):
    config = ImplicitPRMConfig(output_dir=cpu_args["output_dir"], use_cpu=True, bf16=False)
    assert (config.beta, config.learning_rate, config.objective) == (0.05, 5e-7, "ce")


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("objective", "initial_loss", "base"),
    [
        ("ce", math.log(2), OutcomeImplicitPRMTrainer),
        ("dpo", math.log(2), PairwiseImplicitPRMTrainer),
        ("nca", 2 * math.log(2), PairwiseImplicitPRMTrainer),
    ],
)
def test_each_objective_trains_from_its_closed_form_initial_loss(
    tiny_model_dir, cpu_args, objective, initial_loss, base
):
    data = _outcome_dataset() if objective == "ce" else _pair_dataset()
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=_config(cpu_args, objective=objective), train_dataset=data)
    assert isinstance(trainer, base) and isinstance(trainer, ImplicitPRMTrainer)
    assert trainer.ref_model is not None  # full fine-tuning: a frozen copy of the initial model
    trainer.train()
    losses = _losses(trainer)
    # policy == reference at step 0: every implicit reward is 0
    assert losses[0] == pytest.approx(initial_loss, abs=1e-5) and all(map(math.isfinite, losses))
    first = trainer.state.log_history[0]
    assert first["rewards/correct"] == 0 and first["rewards/incorrect"] == 0 and first["rewards/accuracies"] == 0
    assert trainer.state.log_history[1]["rewards/margins"] != 0  # the second step sees a trained policy


def test_ce_skips_kto_kl_estimate_and_samples_randomly(tiny_model_dir, cpu_args):
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=_config(cpu_args), train_dataset=_outcome_dataset())
    assert trainer.calculate_KL is False
    assert "KL_completion_ids" not in trainer.train_dataset.column_names
    assert trainer.args.train_sampling_strategy == "random"


def test_lora_prm_uses_the_adapter_disabled_base_and_is_scored_from_its_directory(tiny_model_dir, cpu_args):
    from align.models import build_lora_config

    args = _config(cpu_args, max_steps=3, learning_rate=1e-2, beta=0.5)
    peft = build_lora_config(lora_r=4, lora_dropout=0.0)
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=args, train_dataset=_outcome_dataset(), peft_config=peft)
    assert trainer.ref_model is None
    trainer.train()
    assert _losses(trainer)[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy == base
    trainer.save_model(args.output_dir)
    settings = json.loads(Path(args.output_dir, SETTINGS_FILE).read_text())
    assert settings["reference"] == "adapter-disabled base" and settings["beta"] == 0.5

    scorer = ImplicitPRM.from_pretrained(args.output_dir)
    assert scorer.beta == 0.5 and scorer.ref_model is None
    row = trainer.train_dataset[0]
    prompt = trainer.processing_class.decode(row["prompt_ids"])
    [result] = scorer.score([prompt], ["We add 10 and 20.\n\n$10 + 20 = 30$.\n\nThe answer is $\\boxed{30}$."])
    assert len(result.step_rewards) == 3 and any(r != 0 for r in result.token_rewards)


def test_precomputed_reference_log_probs_give_the_same_losses(tiny_model_dir, cpu_args):
    runs = {}
    for precompute in (False, True):
        args = _config(cpu_args, precompute_ref_log_probs=precompute, train_sampling_strategy="sequential")
        trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=args, train_dataset=_outcome_dataset())
        trainer.train()
        runs[precompute] = _losses(trainer)
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


@pytest.mark.parametrize(("mode", "expected_rows"), [("none", 24), ("dataset", 16), ("instruction", 16)])
def test_class_balance_subsamples_the_training_set(tiny_model_dir, cpu_args, mode, expected_rows):
    data = _outcome_dataset(count=8, negatives=2)  # 8 correct, 16 incorrect
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=_config(cpu_args, class_balance=mode), train_dataset=data)
    labels = trainer.train_dataset["label"]
    assert len(labels) == expected_rows
    if mode != "none":
        assert sum(labels) == len(labels) // 2


def test_wrong_dataset_shapes_fail_with_the_fix(tiny_model_dir, cpu_args):
    with pytest.raises(ValueError, match="objective 'dpo' trains on pairs"):
        ImplicitPRMTrainer(
            model=tiny_model_dir, args=_config(cpu_args, objective="dpo"), train_dataset=_outcome_dataset()
        )
    bad = Dataset.from_list([{"prompt": "What is 1 + 1?", "answer": "2"}] * 4)
    with pytest.raises(ValueError, match="objective 'ce' trains on outcome rows"):
        ImplicitPRMTrainer(model=tiny_model_dir, args=_config(cpu_args), train_dataset=bad)
    with pytest.raises(TypeError, match="ImplicitPRMConfig"):
        from trl import DPOConfig

        ImplicitPRMTrainer(model=tiny_model_dir, args=DPOConfig(**cpu_args), train_dataset=_pair_dataset())


def test_ce_trainer_accepts_pairs_by_unpairing_them(tiny_model_dir, cpu_args):
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=_config(cpu_args), train_dataset=_pair_dataset())
    assert sorted(set(trainer.train_dataset["label"])) == [False, True]
    trainer.train()


def test_the_scorer_reproduces_the_trainers_outcome_rewards(tiny_model_dir, cpu_args):
    """Training and scoring tokenize a (prompt, completion) the same way: the scorer's outcome reward equals
    β·(log π_θ(y) − log π_ref(y)) as the trainer computes it for the training rows."""
    args = _config(cpu_args, max_steps=2, beta=0.5, learning_rate=5e-3)
    data = _outcome_dataset(count=4)
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    trainer.train()
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    with torch.no_grad():
        logps, _ = trainer._completion_logps(
            trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        ref_logps = trainer._reference_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    expected = (args.beta * (logps - ref_logps)).tolist()
    tokenizer = trainer.processing_class
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in data]
    completions = [r["completion"][0]["content"] for r in data]
    scorer = ImplicitPRM(trainer.model, tokenizer, ref_model=trainer.ref_model, beta=args.beta)
    scored = [r.outcome_reward for r in scorer.score(prompts, completions, aggregate="sum")]
    assert any(abs(value) > 1e-3 for value in expected)
    assert scored == pytest.approx(expected, abs=1e-4)


def test_train_command_parses_the_cpu_recipe(capsys):
    from align.cli import main as align_main

    recipe = "recipes/smollm2-135m-instruct/implicit_prm.yaml"
    assert align_main(["train", "prm", "--config", recipe, "--dry_run"]) == 0
    assert "objective=ce" in capsys.readouterr().out


# ---------------------------------------------------------------- learning


def _operation_rows(count: int, held_out: bool, seed: int) -> list[dict]:
    """Outcome rows of a synthetic task the tiny model can learn in ~100 steps: "What is $a ± b$?" solved step by
    step; the incorrect solution uses the wrong operation in its first step (a consistent solution of the wrong
    problem, a classic reasoning slip). Spotting it means relating the completion to the prompt's operator, not
    memorizing: train and held-out problems are disjoint ((a, b) pairs split by a ≡ 0 mod 5)."""

    def solution(a: int, b: int, op: str) -> str:
        if op == "+":
            return f"We add {a} and {b}.\n\n${a} + {b} = {a + b}$.\n\nThe answer is $\\boxed{{{a + b}}}$."
        return f"We subtract {b} from {a}.\n\n${a} - {b} = {a - b}$.\n\nThe answer is $\\boxed{{{a - b}}}$."

    rng = random.Random(seed)
    rows = []
    while len(rows) < 2 * count:
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        if (a % 5 == 0) != held_out:
            continue
        op = rng.choice("+-")
        prompt = [{"role": "user", "content": f"What is ${a} {op} {b}$?"}]
        for used, label in ((op, True), ("-" if op == "+" else "+", False)):
            rows.append(
                {
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": solution(a, b, used)}],
                    "label": label,
                }
            )
    return rows


def _auc(scores, labels) -> float:
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_training_separates_correct_from_incorrect_held_out_completions(tiny_model_dir, cpu_args):
    """A few hundred training rows, 120 steps at the paper's β = 0.05: the implicit PRM ranks held-out correct
    solutions above incorrect ones (AUC >= 0.8 with the paper's min-step score and with the outcome reward), and the
    step that differs (the first) is where incorrect solutions lose reward."""
    args = _config(cpu_args, max_steps=120, per_device_train_batch_size=8, learning_rate=3e-3, beta=0.05)
    args.lr_scheduler_type, args.logging_steps = "constant", 20
    train = Dataset.from_list(_operation_rows(500, held_out=False, seed=0))
    trainer = ImplicitPRMTrainer(model=tiny_model_dir, args=args, train_dataset=train)
    scorer = ImplicitPRM(trainer.model, trainer.processing_class, ref_model=trainer.ref_model, beta=args.beta)
    test = _operation_rows(40, held_out=True, seed=1)
    tokenizer = trainer.processing_class
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in test]
    completions = [r["completion"][0]["content"] for r in test]
    labels = [r["label"] for r in test]
    before = [r.score for r in scorer.score(prompts, completions, aggregate="sum")]
    assert set(before) == {0.0}  # an untrained PRM (policy == reference) cannot tell them apart

    trainer.train()
    results = scorer.score(prompts, completions, aggregate="min")
    assert _auc([r.score for r in results], labels) >= 0.8
    assert _auc([r.outcome_reward for r in results], labels) >= 0.8
    first_step = {label: [r.step_rewards[0] for r, y in zip(results, labels) if y == label] for label in (True, False)}
    assert sum(first_step[False]) / len(first_step[False]) < sum(first_step[True]) / len(first_step[True])
