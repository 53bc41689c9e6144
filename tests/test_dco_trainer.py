"""DCOTrainer trains the tiny model in its three modes, matches per-sequence CE at N = 1, and handles GA and ε."""

import math
import re

import pytest
import torch
from datasets import Dataset

from align.losses.coverage import coverage_weight
from align.steps import step_segment_ids
from align.trainers.dco import (
    P_HAT_COLUMN,
    STEP_IDS_COLUMN,
    DCOConfig,
    DCOTrainer,
    check_pass_n,
    default_output_dir,
)


def _rows(count=16, p_hat=None):
    """Prompt/completion chat rows of different lengths: 2 or 3 blank-line separated steps."""
    rows = []
    for i in range(count):
        a, b = 10 + 3 * i, 7 + i
        steps = [f"We add {a} and {b}.", f"${a} + {b} = {a + b}$."]
        if i % 2:
            steps.insert(1, "First add the ones, then the tens.")
        steps.append(f"The answer is $\\boxed{{{a + b}}}$.")
        row = {
            "prompt": [{"role": "user", "content": f"What is ${a} + {b}$?"}],
            "completion": [{"role": "assistant", "content": "\n\n".join(steps)}],
        }
        if p_hat is not None:
            row[P_HAT_COLUMN] = p_hat(i)
        rows.append(row)
    return Dataset.from_list(rows)


def _config(cpu_args, **overrides):
    fields = dict(
        max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3, max_length=128, pass_n=4, **cpu_args
    )
    fields.update(overrides)
    return DCOConfig(**fields)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_trains(trainer, factor=0.8):
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(loss) for loss in losses)
    # Rows alternate between 3 and 4 steps, so compare averages over the first and last few steps.
    window = min(5, len(losses) // 2)
    assert sum(losses[-window:]) < factor * sum(losses[:window]), losses
    logged = trainer.state.log_history[0]
    for key in ("dco/weight_mean", "dco/weight_min", "dco/dropped_frac", "dco/seq_logp_mean", "dco/coverage"):
        assert key in logged, key
    assert "entropy" in logged and "mean_token_accuracy" in logged  # TRL's own metrics are kept
    return logged


def test_sequence_mode_trains(tiny_model_dir, cpu_args):
    trainer = DCOTrainer(model=tiny_model_dir, args=_config(cpu_args), train_dataset=_rows())
    logged = _assert_trains(trainer)
    assert 0 < logged["dco/weight_min"] <= logged["dco/weight_mean"] <= 1
    assert logged["dco/seq_logp_mean"] < 0 and logged["dco/dropped_frac"] == 0


def test_lora_trains(tiny_model_dir, cpu_args):
    from peft import LoraConfig

    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DCOTrainer(
        model=tiny_model_dir,
        args=_config(cpu_args, learning_rate=5e-2),
        train_dataset=_rows(),
        peft_config=peft_config,
    )
    assert trainer.model.peft_config
    # The frozen, randomly initialised LM head limits how far adapters alone can move the tiny model (about -5 %).
    _assert_trains(trainer, factor=0.97)
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the adapters did train


def test_pass_n_one_is_per_sequence_cross_entropy(tiny_model_dir, cpu_args):
    """N = 1: same loss and gradients as -Σ_b log p(completion_b) / B computed from full logits."""
    from trl import SFTConfig, SFTTrainer

    trainer = DCOTrainer(model=tiny_model_dir, args=_config(cpu_args, pass_n=1), train_dataset=_rows(8))
    model = trainer.model
    inputs = _first_batch(trainer)
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    dco_grads = _grads(model)
    model.zero_grad()

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    token_logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    token_logp = torch.where(labels != -100, token_logp, 0.0)
    lengths = (labels != -100).sum(-1)
    assert lengths.unique().numel() > 1  # sequences of different lengths, so the two normalizations differ
    manual = -token_logp.sum(-1).mean()
    manual.backward()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(dco_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()

    # TRL's SFT divides the same token sum by the number of tokens instead of the number of sequences.
    sft = SFTTrainer(
        model=model, args=SFTConfig(max_length=128, per_device_train_batch_size=4, **cpu_args), train_dataset=_rows(8)
    )
    sft_loss = sft.compute_loss(model, {k: v for k, v in inputs.items() if k != STEP_IDS_COLUMN})
    assert sft_loss.item() * lengths.sum().item() == pytest.approx(loss.item() * len(lengths), rel=1e-5)


def test_gradient_accumulation_matches_a_twice_larger_batch(tiny_model_dir, cpu_args):
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    common = dict(max_steps=3, learning_rate=1e-3, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        args = _config(cpu_args, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **common)
        trainer = DCOTrainer(model=tiny_model_dir, args=args, train_dataset=_rows())
        trainer.train()
        runs[accumulation] = (_losses(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (losses_big, params_big), (losses_acc, params_acc) = runs[1], runs[2]
    assert losses_big == pytest.approx(losses_acc, rel=1e-5)
    assert any(not torch.allclose(initial[n], p, atol=1e-4) for n, p in params_big.items())  # it did train
    for name, param in params_big.items():
        torch.testing.assert_close(params_acc[name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_step_segment_ids_split_on_blank_lines(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "We add 12 and 7.\n\n$12 + 7 = 19$.\n\nThe answer is $\\boxed{19}$.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [-100] * 3 + ids
    steps = step_segment_ids(labels, tokenizer, re.compile(r"\n\s*\n"))
    assert steps[:3] == [-1, -1, -1] and sorted(set(steps[3:])) == [0, 1, 2]
    assert steps[3:] == sorted(steps[3:])
    texts = [tokenizer.decode([t for t, s in zip(labels, steps) if s == k]) for k in range(3)]
    assert texts == ["We add 12 and 7.\n\n", "$12 + 7 = 19$.\n\n", "The answer is $\\boxed{19}$.<|im_end|>"]
    # A gap in the trained tokens (a second assistant turn) starts a new step even without a separator.
    two_turns = step_segment_ids([*ids[:5], -100, *ids[5:8]], tokenizer, re.compile("NEVER"))
    assert two_turns == [0] * 5 + [-1] + [1] * 3


def test_step_mode_trains_and_equals_sequence_mode_at_n_one(tiny_model_dir, cpu_args):
    args = _config(cpu_args, dco_mode="step", max_steps=10)
    trainer = DCOTrainer(model=tiny_model_dir, args=args, train_dataset=_rows())
    row = trainer.train_dataset[1]  # three steps, plus nothing outside the completion
    trained = [s for s, label in zip(row[STEP_IDS_COLUMN], row["labels"]) if label != -100]
    assert sorted(set(trained)) == [0, 1, 2, 3]
    _assert_trains(trainer, factor=0.9)

    losses = {}
    for mode in ("step", "sequence"):
        t = DCOTrainer(model=tiny_model_dir, args=_config(cpu_args, pass_n=1, dco_mode=mode), train_dataset=_rows(8))
        losses[mode] = t.compute_loss(t.model, _first_batch(t)).item()
    assert losses["step"] == pytest.approx(losses["sequence"], rel=1e-6)


def test_estimated_mode_trains_with_p_hat_column(tiny_model_dir, cpu_args):
    data = _rows(p_hat=lambda i: 0.25)
    args = _config(cpu_args, dco_mode="estimated", max_steps=10)
    trainer = DCOTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    assert _first_batch(trainer)[P_HAT_COLUMN].tolist() == [0.25] * 4
    logged = _assert_trains(trainer, factor=0.9)
    # The weight comes from the data, not from the model: F(4, 0.25) on every row.
    expected = coverage_weight(torch.tensor(math.log(0.25)), 4).item()
    assert logged["dco/weight_mean"] == pytest.approx(expected, rel=1e-6)
    assert logged["dco/weight_min"] == pytest.approx(expected, rel=1e-6)


def test_estimated_mode_requires_a_valid_p_hat_column(tiny_model_dir, cpu_args):
    args = _config(cpu_args, dco_mode="estimated")
    with pytest.raises(ValueError, match="align data coverage"):
        DCOTrainer(model=tiny_model_dir, args=args, train_dataset=_rows())
    bad = _rows(p_hat=lambda i: 1.5 if i == 3 else 0.5)
    with pytest.raises(ValueError, match=r"row 3: p_hat = 1.5 is not a probability"):
        DCOTrainer(model=tiny_model_dir, args=args, train_dataset=bad)


def test_threshold_drops_exactly_the_confident_rows(tiny_model_dir, cpu_args):
    # p̂ = 1 gives F = 0 < ε: those rows (the even ones, half the data) leave the loss; p̂ = 0 rows stay.
    data = _rows(p_hat=lambda i: 1.0 if i % 2 == 0 else 0.0)
    args = _config(cpu_args, dco_mode="estimated", dco_weight_threshold=0.01, max_steps=4)  # one epoch
    trainer = DCOTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    trainer.train()
    dropped = [entry["dco/dropped_frac"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(dropped) == 4 and sum(dropped) / 4 == pytest.approx(0.5)  # 8 of the 16 rows, batches of 4
    assert all(fraction * 4 == round(fraction * 4) for fraction in dropped)


def test_batch_with_every_row_dropped_gives_zero_loss_and_no_update(tiny_model_dir, cpu_args):
    data = _rows(p_hat=lambda i: 1.0)
    args = _config(cpu_args, dco_mode="estimated", dco_weight_threshold=0.5, max_steps=2)
    trainer = DCOTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for entry in trainer.state.log_history[:2]:
        assert entry["loss"] == 0.0 and entry["grad_norm"] == 0.0 and entry["dco/dropped_frac"] == 1.0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pass_n": 0.5}, "pass_n must be a number >= 1"),
        ({"pass_n": math.nan}, "pass_n must be a number >= 1"),
        ({"dco_mode": "tokens"}, "dco_mode must be one of"),
        ({"dco_weight_threshold": 1.5}, r"dco_weight_threshold \(ε\) must be in \[0, 1\]"),
        ({"dco_step_separator": "("}, "not a valid regular expression"),
        ({"dco_step_separator": r"\n*"}, "matches the empty string"),
        ({"packing": True}, "packing: false"),
        ({"padding_free": True}, "packing: false"),
        ({"loss_type": "dft"}, "loss_type must be 'nll'"),
    ],
)
def test_config_rejects_bad_values(cpu_args, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(cpu_args, **overrides)


def test_pass_n_check_and_default_output_dir_shared_with_pass_at_n():
    from types import SimpleNamespace

    from align.trainers.pass_n import PassAtNConfig

    assert check_pass_n(4, one_means="cross-entropy") == 4.0 and check_pass_n(1.5, one_means="log p") == 1.5
    for bad in (0.5, math.inf, "16", None):
        with pytest.raises(ValueError, match=r"pass_n must be a number >= 1 \(.*; 1 = log p\)"):
            check_pass_n(bad, one_means="log p")
    with pytest.raises(ValueError, match="1 = log p"):
        PassAtNConfig(output_dir="unused", pass_n=0, use_cpu=True, bf16=False, report_to="none")
    assert default_output_dir("org/SmolLM2-135M/", "DCO") == "SmolLM2-135M-DCO"
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/models/Qwen2.5-Math-1.5B"))
    assert default_output_dir(model, "pass_n") == "Qwen2.5-Math-1.5B-pass_n"


def test_trainer_requires_a_dco_config(tiny_model_dir, cpu_args):
    from trl import SFTConfig

    with pytest.raises(TypeError, match="needs a DCOConfig"):
        DCOTrainer(model=tiny_model_dir, args=SFTConfig(**cpu_args), train_dataset=_rows())


def test_align_train_dco_recipe_saves_an_adapter(tiny_model_dir, tmp_path):
    from align.commands.train import main

    recipe = tmp_path / "dco.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\nuse_peft: true\nlora_r: 4\nlora_target_modules: all-linear\n"
        "dataset_name: synthetic\nsynthetic_num_train: 16\ncompletion_target: answer\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 3\nper_device_train_batch_size: 4\nlearning_rate: 1.0e-3\n"
        "max_length: 128\npass_n: 8\ndco_weight_threshold: 1.0e-3\nsave_strategy: 'no'\nreport_to: none\n"
        "bf16: false\nuse_cpu: true\ngradient_checkpointing: false\nlogging_steps: 1\n"
    )
    assert main(["dco", "--config", str(recipe)]) == 0
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_recipe_trains_two_steps(smollm2_path, tmp_path):
    """The shipped CPU recipe parses and trains SmolLM2-135M-Instruct with LoRA (two steps, small batch)."""
    from align.commands.train import main

    output = tmp_path / "run"
    argv = ["dco", "--config", "recipes/smollm2-135m-instruct/dco.yaml", "--output_dir", str(output)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--synthetic_num_train", "8"]
    argv += ["--save_strategy", "no", "--logging_steps", "1"]
    assert main(argv) == 0
    assert (output / "adapter_model.safetensors").is_file()
