"""PrimeGRPOTrainer on the tiny model: token advantages recomputed independently from the logged batch, the online
PRM update (its own optimizer, CE on the outcomes), filtering, LoRA for both models, checkpoint/resume of policy and
PRM, config errors and `align train prime`."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from align.data.synthetic import generate_problems
from align.data.training import prompt_rows
from align.losses.implicit_reward import implicit_ce_loss
from align.losses.prime import accuracy_band, batch_norm_process_rewards, prime_advantages
from align.trainers.prime import PrimeConfig, PrimeGRPOTrainer


K = 4


def _prompts(count=8) -> Dataset:
    return Dataset.from_list(prompt_rows(generate_problems(count, "train", levels=(1,), seed=0)))


def even_token_sum(completion_ids, **kwargs):
    """Splits random completions about evenly, so that most groups are mixed."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def _config(cpu_args, **overrides):
    fields = dict(
        max_steps=2,
        per_device_train_batch_size=2 * K,
        num_generations=K,
        max_completion_length=8,
        learning_rate=1e-3,
        prm_learning_rate=1e-2,
        accuracy_filter=False,
        **cpu_args,
    )
    fields.update(overrides)
    return PrimeConfig(**fields)


class RecordingPrime(PrimeGRPOTrainer):
    """Keeps what each generation batch handed to the loss, and the PRM's token rewards before its step."""

    def __init__(self, *args, **kwargs):
        self.records = []
        super().__init__(*args, **kwargs)

    def _score_and_update_prm(self, output, keep, outcome):
        before = {n: p.detach().clone() for n, p in self.prm.named_parameters() if p.requires_grad}
        rewards, stats = super()._score_and_update_prm(output, keep, outcome)
        after = {n: p.detach().clone() for n, p in self.prm.named_parameters() if p.requires_grad}
        self.records.append(
            {
                "rewards": rewards.clone(),
                "keep": keep.clone(),
                "outcome": outcome.clone(),
                "moved": max((after[n] - before[n]).abs().max().item() for n in before),
            }
        )
        return rewards, stats

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records[-1]["output"] = {key: value.clone() for key, value in output.items() if torch.is_tensor(value)}
        return output


def _trainer(tiny_model_dir, cpu_args, cls=RecordingPrime, **overrides):
    return cls(
        model=tiny_model_dir,
        reward_funcs=even_token_sum,
        args=_config(cpu_args, **overrides),
        train_dataset=_prompts(),
    )


def test_advantages_are_prime_of_the_logged_batch_and_the_prm_learns(tiny_model_dir, cpu_args):
    trainer = _trainer(tiny_model_dir, cpu_args)
    trainer.train()
    assert len(trainer.records) == 2
    first = trainer.records[0]
    # The PRM starts as the policy's start, so its first rewards are exactly 0, and it moved after each step.
    assert first["rewards"].abs().max().item() == 0.0
    assert all(record["moved"] > 0 for record in trainer.records)
    second = trainer.records[1]
    assert second["rewards"].abs().max().item() > 0
    for record in trainer.records:
        out = record["output"]
        mask = out["completion_mask"].bool()
        rewards = batch_norm_process_rewards(record["rewards"].double(), mask)
        expected = prime_advantages(rewards, mask, record["outcome"].double(), K, mode="verl")
        assert out["advantages"].shape == mask.shape
        torch.testing.assert_close(out["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
    history = trainer.state.log_history
    for name in (
        "prime/outcome_accuracy",
        "prime/prm_accuracy",
        "prime/prm_loss",
        "prime/process_reward_mean",
        "prime/filtered_frac",
        "prime/prm_grad_norm",
    ):
        assert any(name in entry for entry in history), name
    # The first PRM loss is the CE of σ(0) = ½ on every sample: log 2.
    assert history[0]["prime/prm_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_the_prm_step_is_one_adamw_step_on_the_ce_loss(tiny_model_dir, cpu_args):
    """Replays the first PRM update by hand: the gradient of the mean CE of σ(β·Σ log-ratio) against the outcomes,
    and AdamW's first step, which moves each parameter by -lr·g/(|g| + eps)."""
    lr = 1e-3
    trainer = _trainer(tiny_model_dir, cpu_args, max_steps=1, prm_learning_rate=lr, prm_max_grad_norm=1e9)
    start = {n: p.detach().clone() for n, p in trainer.prm.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.prm.named_parameters()}
    record = trainer.records[0]
    out = record["output"]
    with torch.no_grad():
        for name, p in trainer.prm.named_parameters():
            p.copy_(start[name])
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    scored = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1)
    trainer.prm.zero_grad()
    width = out["completion_ids"].shape[1]
    ratio = trainer._prm_log_ratios(ids, attention, scored, out["prompt_ids"].shape[1], width, grad=True)
    implicit_ce_loss(ratio.sum(-1), record["outcome"], 0.05).mean().backward()
    checked = 0
    for name, p in trainer.prm.named_parameters():
        if p.grad is None:
            continue
        expected = -lr * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(after[name] - start[name], expected, atol=2e-5, rtol=0)
        checked += int((p.grad.abs() > 1e-6).sum())
    assert checked > 100


def test_filter_drops_uniform_groups_from_the_advantages_and_the_prm(tiny_model_dir, cpu_args):
    trainer = _trainer(tiny_model_dir, cpu_args, accuracy_filter=True, max_steps=2)
    trainer.train()
    for record in trainer.records:
        keep = accuracy_band(record["outcome"], K).repeat_interleave(K)
        assert torch.equal(record["keep"], keep)
        advantages = record["output"]["advantages"]
        assert (advantages[~keep] == 0).all()
        assert (record["rewards"][~keep] == 0).all()
    fractions = [e["prime/filtered_frac"] for e in trainer.state.log_history if "prime/filtered_frac" in e]
    expected = [1 - accuracy_band(r["outcome"], K).double().mean().item() for r in trainer.records]
    assert fractions == pytest.approx(expected)


def test_lora_policy_and_lora_prm_and_resume_restores_both(tiny_model_dir, cpu_args, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    fields = dict(cpu_args, output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=1)
    full = RecordingPrime(
        model=tiny_model_dir,
        reward_funcs=even_token_sum,
        peft_config=lora,
        args=_config(fields, max_steps=2),
        train_dataset=_prompts(),
    )
    assert full.prm is not full.model and hasattr(full.prm, "disable_adapter")
    full.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "prm" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "prm" / "prm_optimizer.pt").is_file()
    final_prm = {n: p.detach().clone() for n, p in full.prm.named_parameters() if p.requires_grad}

    resumed = RecordingPrime(
        model=tiny_model_dir,
        reward_funcs=even_token_sum,
        peft_config=lora,
        args=_config(dict(fields, output_dir=str(tmp_path / "again")), max_steps=2),
        train_dataset=_prompts(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.records) == 1  # only step 2 ran
    # Step 2 saw the PRM of checkpoint 1: the same rewards as the uninterrupted run's step 2, and the same end.
    torch.testing.assert_close(resumed.records[0]["rewards"], full.records[1]["rewards"], atol=1e-6, rtol=1e-5)
    for name, p in resumed.prm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), final_prm[name], atol=1e-6, rtol=1e-5)


def test_config_rejects_bad_values(cpu_args):
    for overrides, message in (
        ({"prm_update": "sometimes"}, "prm_update must be one of"),
        ({"prime_mode": "eq5"}, "prime_mode must be one of"),
        ({"prm_beta": 0.0}, "prm_beta must be > 0"),
        ({"accuracy_low": 0.9}, "accuracy_low <= accuracy_high"),
        ({"prime_gamma": 1.5}, "prime_gamma"),
        ({"num_generations": 1, "per_device_train_batch_size": 2}, "at least 2 generations"),  # TRL's own check
    ):
        with pytest.raises(ValueError, match=message):
            _config(cpu_args, **overrides)


def test_align_train_prime_cli_saves_policy_and_prm(tiny_model_dir, tmp_path):
    from align.commands.train import main

    recipe = tmp_path / "prime.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        "dataset_name: synthetic\nsynthetic_num_train: 8\n"
        "num_generations: 4\nmax_completion_length: 8\naccuracy_filter: false\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 1\nper_device_train_batch_size: 8\n"
        "grader_workers: 1\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
        "bf16: false\nuse_cpu: true\ngradient_checkpointing: false\n"
    )
    assert main(["prime", "--config", str(recipe)]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "prm" / "model.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert "prime/outcome_accuracy" in history[0]
