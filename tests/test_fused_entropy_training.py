"""Training with `attention_entropy_kernel: fused` equals the eager reference: 5 SFT steps, and 2-process DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer

from align.attention.fused import KERNELS
from align.data.synthetic import generate_problems
from align.data.training import sft_rows
from align.trainers.entropy import EntropySFTConfig, EntropySFTTrainer


REPO = Path(__file__).resolve().parents[1]
# Thresholds far above the tiny model's entropy and a narrow band: the penalty is active at every step.
FIELDS = dict(
    attention_entropy_coef=1.0,
    attention_entropy_threshold_init=0.95,
    attention_entropy_tolerance=0.02,
    attention_entropy_learnable_temperature=True,
    z_loss=True,
)


def train(kernel: str, path: str, cpu_args: dict, **extra):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    data = Dataset.from_list(sft_rows(generate_problems(20, "train", levels=[1], seed=0)))
    args = EntropySFTConfig(
        **{**cpu_args, "output_dir": f"{cpu_args['output_dir']}-{kernel}"},
        max_length=128,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        attention_entropy_kernel=kernel,
        **{**FIELDS, "max_steps": 5, **extra},
    )
    trainer = EntropySFTTrainer(model=path, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.model.config._attn_implementation == KERNELS[kernel]
    trainer.train()
    return trainer


def test_five_sft_steps_give_the_same_losses_and_parameters_on_fused_and_eager(tiny_model_dir, cpu_args):
    trainers = {kernel: train(kernel, tiny_model_dir, cpu_args) for kernel in ("fused", "eager")}
    logs = {kernel: [e for e in t.state.log_history if "loss" in e] for kernel, t in trainers.items()}
    assert len(logs["fused"]) == len(logs["eager"]) == 5
    for fused, eager in zip(logs["fused"], logs["eager"], strict=True):
        for key in ("loss", "attention_entropy/penalty", "z_loss", "attention_entropy/mean", "attention_logits/max"):
            assert fused[key] == pytest.approx(eager[key], abs=1e-5, rel=1e-5), key
    assert logs["fused"][0]["attention_entropy/penalty"] > 0
    parameters = {kernel: dict(t.model.named_parameters()) for kernel, t in trainers.items()}
    assert any(name.startswith("attention_entropy.") for name in parameters["fused"])  # thresholds, temperatures
    for name, value in parameters["eager"].items():
        torch.testing.assert_close(parameters["fused"][name], value, atol=1e-5, rtol=1e-5)


def test_max_logit_is_measured_on_logging_steps_only(tiny_model_dir, cpu_args):
    trainer = train("fused", tiny_model_dir, {**cpu_args, "logging_steps": 2}, max_steps=4)
    logged = [e for e in trainer.state.log_history if "attention_entropy/mean" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert all(math.isfinite(e["attention_logits/max"]) for e in logged)
    trainer.state.global_step = 2
    assert trainer._logs_this_step() is False  # step 3 neither logs nor writes a heatmap
    trainer.state.global_step = 3
    assert trainer._logs_this_step() is True


def write_recipe(path: Path, model_dir: str, output_dir: Path, kernel: str) -> Path:
    fields = {
        "model_name_or_path": model_dir,
        "dataset_name": "synthetic",
        "synthetic_num_train": 64,
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "max_length": 256,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "ddp_find_unused_parameters": False,
        "attention_entropy_coef": 0.1,
        "attention_entropy_kernel": kernel,
    }
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in fields.items()) + "\n")
    return path


@pytest.mark.distributed
def test_two_process_ddp_fused_equals_eager(tiny_model_dir, tmp_path):
    results = {}
    for kernel in ("fused", "eager"):
        recipe = write_recipe(tmp_path / f"{kernel}.yaml", tiny_model_dir, tmp_path / kernel, kernel)
        command = [sys.executable, "-m", "align.cli", "train", "sft", "--config", str(recipe)]
        command += ["--accelerate-config", "cpu_ddp", "--num-processes", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        history = json.loads((tmp_path / kernel / "trainer_state.json").read_text())["log_history"]
        results[kernel] = (
            [e["loss"] for e in history if "loss" in e],
            load_file(tmp_path / kernel / "model.safetensors"),
        )
    (fused_losses, fused_weights), (eager_losses, eager_weights) = results["fused"], results["eager"]
    assert len(fused_losses) == 3 and fused_losses == pytest.approx(eager_losses, abs=1e-5, rel=1e-5)
    for name, value in eager_weights.items():
        torch.testing.assert_close(fused_weights[name], value, atol=1e-5, rtol=1e-5, msg=name)
