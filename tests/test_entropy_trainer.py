"""Entropy regularization composed with TRL trainers: trains, records once per layer, scales, saves and resumes."""

import pickle

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from align.attention.fused import ATTENTION_IMPLEMENTATION
from align.attention.parameters import MODULE_NAME, PARAMETERS_FILE
from align.data.synthetic import generate_problems
from align.data.training import preference_rows, sft_rows
from align.trainers.entropy import (
    EntropyDPOConfig,
    EntropyDPOTrainer,
    EntropyRegularizationArguments,
    EntropySFTConfig,
    EntropySFTTrainer,
    with_entropy_regularization,
)


NUM_LAYERS = 2
# Thresholds far above the tiny model's entropy and a narrow band: the penalty is active from the first step.
ACTIVE_PENALTY = dict(
    attention_entropy_coef=1.0, attention_entropy_threshold_init=0.95, attention_entropy_tolerance=0.02
)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(12, "train", levels=[1], seed=0)


@pytest.fixture(scope="module")
def sft_data(problems):
    return Dataset.from_list(sft_rows(problems))


@pytest.fixture(scope="module")
def dpo_data(problems):
    return Dataset.from_list(preference_rows(problems))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Capture(TrainerCallback):
    """Copies of theta when training starts and of its gradient before each optimizer step."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.start, self.grads = trainer_ref, None, []

    def parameters(self):
        return self.trainer_ref[0].attention_entropy_parameters

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.parameters().threshold_logits.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(self.parameters().threshold_logits.grad.detach().clone())


def sft_trainer(path, tokenizer, data, cpu_args, **fields):
    args = EntropySFTConfig(**{**cpu_args, "max_length": 128, "learning_rate": 5e-2, **fields})
    holder = []
    trainer = EntropySFTTrainer(model=path, args=args, train_dataset=data, processing_class=tokenizer)
    holder.append(trainer)
    if (
        trainer.attention_entropy_parameters is not None
        and trainer.attention_entropy_parameters.threshold_logits is not None
    ):
        trainer.capture = Capture(holder)
        trainer.add_callback(trainer.capture)
    return trainer


def test_sft_trains_with_checkpointing_and_accumulation_then_saves_and_resumes(
    tiny_model_dir, tokenizer, sft_data, cpu_args, tmp_path
):
    cpu_args = {**cpu_args, "gradient_checkpointing": True, "save_strategy": "steps", "save_steps": 3}
    fields = dict(
        ACTIVE_PENALTY,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        weight_decay=0.1,
        attention_entropy_log_steps=3,
        z_loss=True,
    )
    trainer = sft_trainer(tiny_model_dir, tokenizer, sft_data, cpu_args, **fields)
    assert trainer.model.config._attn_implementation == ATTENTION_IMPLEMENTATION
    trainer.train()

    # exactly one record per layer for every micro-batch, despite checkpoint recomputation in the backward
    assert trainer.attention_entropy_record_counts == [NUM_LAYERS] * 6
    parameters = trainer.attention_entropy_parameters
    assert not torch.equal(parameters.threshold_logits.detach(), trainer.capture.start)
    logs = [entry for entry in trainer.state.log_history if "attention_entropy/penalty" in entry]
    assert len(logs) == 3
    for key in (
        "attention_entropy/layer_1",
        "attention_entropy/normalized_mean",
        "attention_entropy/collapsed_frac",
        "attention_entropy/overloaded_frac",
        "attention_entropy/threshold_mean",
        "attention_logits/layer_0_max",
        "lm_head/log_z_mean",
    ):
        assert key in logs[0]
    assert logs[0]["attention_entropy/penalty"] > 0
    assert logs[0]["z_loss"] >= logs[0]["lm_head/log_z_mean"] ** 2 - 1e-4  # mean of squares >= square of mean

    # theta gets no weight decay; ordinary weights do
    groups = trainer.optimizer.param_groups
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(parameters.threshold_logits) not in decay
    assert id(trainer.model.model.layers[0].self_attn.q_proj.weight) in decay

    # checkpoint: thresholds in their own file, the model's weights stay a plain transformers checkpoint
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / PARAMETERS_FILE).is_file()
    assert (tmp_path / "out" / "attention_entropy" / "step_0000003.png").is_file()
    assert (tmp_path / "out" / "attention_entropy" / "step_0000003.json").is_file()
    _, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys"))
    assert not any(MODULE_NAME in key for key in trainer.model.state_dict())
    saved = parameters.threshold_logits.detach().clone()

    resumed = sft_trainer(tiny_model_dir, tokenizer, sft_data, cpu_args, **{**fields, "max_steps": 4})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.capture.start, saved)
    assert resumed.attention_entropy_record_counts == [NUM_LAYERS] * 2


def test_penalty_is_averaged_over_gradient_accumulation(tiny_model_dir, tokenizer, sft_data, cpu_args):
    """theta's gradient from one batch of 4 equals the one from 2 accumulated micro-batches of 2 (paper convention)."""
    common = dict(ACTIVE_PENALTY, max_steps=1, max_grad_norm=1e9)
    whole = sft_trainer(tiny_model_dir, tokenizer, sft_data, cpu_args, per_device_train_batch_size=4, **common)
    whole.train()
    split = sft_trainer(
        tiny_model_dir,
        tokenizer,
        sft_data,
        cpu_args,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **common,
    )
    split.train()
    assert whole.capture.grads[0].abs().max() > 0
    torch.testing.assert_close(split.capture.grads[0], whole.capture.grads[0], atol=1e-7, rtol=1e-5)


def test_lora_dpo_records_only_the_policy_forward(tiny_model_dir, tokenizer, dpo_data, cpu_args):
    from peft import LoraConfig

    args = EntropyDPOConfig(
        **{**cpu_args, "gradient_checkpointing": True},
        **ACTIVE_PENALTY,
        max_length=128,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-2,
    )
    trainer = EntropyDPOTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=dpo_data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # the reference is the same model with the adapter disabled
    start = trainer.attention_entropy_parameters.threshold_logits.detach().clone()
    trainer.train()
    # the reference forwards (no grad, adapter off) and checkpoint recomputation are not recorded
    assert trainer.attention_entropy_record_counts == [NUM_LAYERS] * 4
    assert not torch.equal(trainer.attention_entropy_parameters.threshold_logits.detach(), start)
    assert any("attention_entropy/regularizer" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "module, trainer_name, config_name, data_name, extra",
    [
        ("align.trainers.dco", "DCOTrainer", "DCOConfig", "sft_data", {"pass_n": 4}),
        (
            "align.trainers.margin",
            "MarginPreferenceTrainer",
            "MarginPreferenceConfig",
            "dpo_data",
            {"margin_loss": "ipo"},
        ),
    ],
)
def test_composes_with_align_trainers(
    tiny_model_dir, tokenizer, cpu_args, request, module, trainer_name, config_name, data_name, extra
):
    trainers = pytest.importorskip(module)
    trainer_cls, config_cls = with_entropy_regularization(
        getattr(trainers, trainer_name), getattr(trainers, config_name)
    )
    args = config_cls(
        **cpu_args,
        **ACTIVE_PENALTY,
        **extra,
        max_length=128,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
    )
    trainer = trainer_cls(
        model=tiny_model_dir, args=args, train_dataset=request.getfixturevalue(data_name), processing_class=tokenizer
    )
    start = trainer.attention_entropy_parameters.threshold_logits.detach().clone()
    trainer.train()
    assert trainer.attention_entropy_record_counts == [NUM_LAYERS] * 2
    assert not torch.equal(trainer.attention_entropy_parameters.threshold_logits.detach(), start)


def test_learnable_temperature_trains_and_the_final_save_folds_it(
    tiny_model_dir, tokenizer, sft_data, cpu_args, tmp_path
):
    trainer = sft_trainer(
        tiny_model_dir,
        tokenizer,
        sft_data,
        cpu_args,
        max_steps=2,
        per_device_train_batch_size=2,
        attention_entropy_learnable_temperature=True,
    )
    trainer.train()
    log_temperature = trainer.attention_entropy_parameters.log_temperature
    assert log_temperature.detach().abs().max() > 0
    batch = tokenizer(["What is 12 + 7? First add the tens."], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(**batch).logits
    trainer.save_model(str(tmp_path / "final"))
    assert log_temperature.detach().abs().max() == 0  # folded into the query projections
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, trained, atol=1e-5, rtol=1e-5)


def test_learnable_temperature_with_lora_is_refused(tiny_model_dir, tokenizer, sft_data, cpu_args):
    from peft import LoraConfig

    args = EntropySFTConfig(**cpu_args, max_steps=1, attention_entropy_learnable_temperature=True)
    with pytest.raises(ValueError, match="full fine-tuning"):
        EntropySFTTrainer(
            model=tiny_model_dir,
            args=args,
            train_dataset=sft_data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        )


def test_composition_is_one_mechanism_and_off_by_default(tiny_model_dir, tokenizer, sft_data, cpu_args):
    trainer_cls, config_cls = with_entropy_regularization(SFTTrainer, SFTConfig)
    assert (trainer_cls, config_cls) == (EntropySFTTrainer, EntropySFTConfig)
    assert with_entropy_regularization(trainer_cls, config_cls) == (trainer_cls, config_cls)
    assert with_entropy_regularization(DPOTrainer, DPOConfig) == (EntropyDPOTrainer, EntropyDPOConfig)
    args = config_cls(**cpu_args, max_steps=1)
    assert pickle.loads(pickle.dumps(args)).attention_entropy_coef == 0  # Trainer pickles its args on save
    trainer = trainer_cls(model=tiny_model_dir, args=args, train_dataset=sft_data, processing_class=tokenizer)
    model = trainer.model
    assert model.config._attn_implementation != ATTENTION_IMPLEMENTATION
    assert trainer.attention_entropy_parameters is None and not hasattr(model, MODULE_NAME)
    assert not model._forward_hooks and not model.model._forward_hooks
    trainer.train()
    assert trainer.attention_entropy_record_counts == []
    assert not any("attention_entropy/mean" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention_entropy_coef", -1.0, "attention_entropy_coef=-1.0"),
        ("attention_entropy_threshold_init", 1.0, "strictly between 0 and 1"),
        ("attention_entropy_convention", "rows", "one of ('paper', 'code')"),
        ("attention_entropy_normalization", "keys", "one of ('context', 'visible')"),
        ("attention_entropy_log_steps", -5, "attention_entropy_log_steps=-5"),
        ("attention_entropy_kernel", "flash", "one of ('fused', 'eager')"),
    ],
)
def test_config_errors_name_the_field(cpu_args, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EntropySFTConfig(**cpu_args, **{field: value})


def test_reentrant_checkpointing_is_refused_for_the_penalty(cpu_args):
    with pytest.raises(ValueError, match="use_reentrant"):
        EntropyDPOConfig(
            **{**cpu_args, "gradient_checkpointing": True},
            gradient_checkpointing_kwargs={"use_reentrant": True},
            attention_entropy_coef=1e-3,
        )
    assert EntropyRegularizationArguments().records_attention is False


def test_align_train_accepts_the_fields_for_every_method(tiny_model_dir, tmp_path):
    from align.cli import main

    out = tmp_path / "run"
    recipe = tmp_path / "sft_entropy.yaml"
    recipe.write_text(
        f"""
model_name_or_path: {tiny_model_dir}
dataset_name: synthetic
synthetic_num_train: 8
output_dir: {out}
max_steps: 2
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_length: 128
bf16: false
use_cpu: true
gradient_checkpointing: false
report_to: none
save_strategy: "no"
attention_entropy_coef: 1.0e-2
attention_entropy_log_steps: 2
"""
    )
    assert main(["train", "sft", "--config", str(recipe)]) == 0
    assert (out / PARAMETERS_FILE).is_file()
    assert (out / "attention_entropy" / "step_0000002.png").is_file()


@pytest.mark.slow
def test_smollm2_lora_sft_step_with_the_regularizer(smollm2_path, cpu_args, tmp_path):
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    data = Dataset.from_list(sft_rows(generate_problems(2, "train", levels=[1], seed=0)))
    args = EntropySFTConfig(
        **cpu_args,
        max_steps=1,
        max_length=128,
        per_device_train_batch_size=2,
        attention_entropy_coef=1e-2,
        z_loss=True,
    )
    trainer = EntropySFTTrainer(
        model=smollm2_path,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert trainer.attention_entropy_record_counts == [30]
    log = next(entry for entry in trainer.state.log_history if "attention_entropy/penalty" in entry)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in log.items() if isinstance(v, float))
    assert 0 <= log["attention_entropy/collapsed_frac"] <= 1 and log["lm_head/log_z_mean"] > 0
