"""Real multi-process training on CPU (gloo): every trainer under DDP, ZeRO-2 and ZeRO-3 through `align train`.

For each method, a 2-process run with per-device batch 2 must reproduce the loss trajectory of a 1-process run with
batch 4 (same global batch, same seed) to 1e-5 (1e-6 relative for DCO's large losses), and every rank must end with
identical parameters (gathered under ZeRO-3; `ALIGN_VERIFY_SYNC=1` makes the run write them to sync_check.json).
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main


pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

# Case -> (method, recipe fields that differ from the shared tiny recipe). Each launch costs ~10-15 s.
CASES = {
    "sft": ("sft", {}),
    "dco": ("dco", {"pass_n": 4}),
    "margin_dpo": ("margin", {"margin_loss": "dpo", "entanglement_steps": 1, "entanglement_pairs": 1}),
    "implicit_prm": ("prm", {"objective": "ce", "beta": 0.5}),
    "sft_entropy": ("sft", {"attention_entropy_coef": 0.1, "attention_entropy_log_steps": 0}),
}
# The LoRA cases' recipe fields (every launcher's LoRA test trains these adapters).
LORA_FIELDS = {
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "learning_rate": 1.0e-2,
}
# The entanglement diagnostics need unsharded parameters, so under ZeRO-3 the margin run trains without them.
ZERO3_WITHOUT = {"margin_dpo": ("entanglement_steps", "entanglement_pairs")}


def case_fields(case: str, config: str | None = None) -> dict:
    fields = dict(CASES[case][1])
    if config == "cpu_zero3":
        for key in ZERO3_WITHOUT.get(case, ()):
            fields.pop(key)
    return fields


def write_recipe(path: Path, model_dir: str, output_dir: Path, fields: dict) -> Path:
    base = {
        "model_name_or_path": model_dir,
        "dataset_name": "synthetic",
        "synthetic_num_train": 64,
        "output_dir": str(output_dir),
        "max_steps": STEPS,
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
    }
    base.update(fields)
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in base.items()) + "\n")
    return path


def losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def launch(config: str, recipe: Path, method: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGN_VERIFY_SYNC": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "align.cli",
        "train",
        method,
        "--config",
        str(recipe),
        "--accelerate-config",
        config,
        "--num-processes",
        "2",
        *extra,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. A process-group kill is not enough: torchrun starts its workers in
    sessions of their own, so they would survive their launcher and go on training."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)


def assert_ranks_identical(output_dir: Path) -> None:
    check = json.loads((output_dir / "sync_check.json").read_text())
    assert check["world_size"] == 2
    first, second = check["fingerprints"]
    assert first == pytest.approx(second, rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def single_process_losses(tiny_model_dir, tmp_path_factory):
    """Reference trajectories: one process, batch 4 (= 2 processes x 2)."""
    cache = {}

    def get(case: str, config: str) -> list[float]:
        fields = case_fields(case, config)
        key = (case, tuple(sorted(fields)))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"single-{case}")
            recipe = write_recipe(
                out / "recipe.yaml", tiny_model_dir, out / "run", {**fields, "per_device_train_batch_size": 4}
            )
            assert align_main(["train", CASES[case][0], "--config", str(recipe)]) == 0
            cache[key] = losses(out / "run")
        return cache[key]

    return get


@pytest.mark.parametrize("config", ["cpu_ddp", "cpu_zero2", "cpu_zero3"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, config, tiny_model_dir, tmp_path, single_process_losses):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", case_fields(case, config))
    launch(config, recipe, CASES[case][0])
    distributed = losses(tmp_path / "run")
    assert len(distributed) == STEPS
    assert distributed == pytest.approx(single_process_losses(case, config), rel=1e-6, abs=1e-5)
    assert_ranks_identical(tmp_path / "run")


@pytest.mark.parametrize("config", ["cpu_ddp", "cpu_zero2"])
def test_lora_two_processes(config, tiny_model_dir, tmp_path, single_process_losses):
    lora = LORA_FIELDS
    single = tmp_path / "single"
    recipe = write_recipe(tmp_path / "single.yaml", tiny_model_dir, single, {**lora, "per_device_train_batch_size": 4})
    assert align_main(["train", "sft", "--config", str(recipe)]) == 0
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", lora)
    launch(config, recipe, "sft")
    assert losses(tmp_path / "run") == pytest.approx(losses(single), abs=1e-5)
    assert_ranks_identical(tmp_path / "run")
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_zero3_checkpoint_saves_full_model_that_reloads(tiny_model_dir, tmp_path):
    """ZeRO-3 shards the weights; the saved model must be the consolidated one and reload outside DeepSpeed."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", {"save_strategy": "steps", "save_steps": STEPS}
    )
    launch("cpu_zero3", recipe, "sft")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    saved = dict(model.named_parameters())
    assert all(p.numel() > 0 for p in saved.values())
    assert any(not torch.equal(p, saved[name]) for name, p in initial.named_parameters())  # it trained
    assert (tmp_path / "run" / f"checkpoint-{STEPS}").is_dir()


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """kill -9 a 2-process run (launcher and workers) after a checkpoint; rerunning the same command resumes and
    ends where an uninterrupted run ends."""
    fields = {"max_steps": 30, "save_strategy": "steps", "save_steps": 2, "synthetic_num_train": 128}
    reference = tmp_path / "reference"
    recipe = write_recipe(tmp_path / "reference.yaml", tiny_model_dir, reference, fields)
    launch("cpu_ddp", recipe, "sft")

    interrupted = tmp_path / "interrupted"
    recipe = write_recipe(tmp_path / "interrupted.yaml", tiny_model_dir, interrupted, fields)
    command = [
        sys.executable,
        "-m",
        "align.cli",
        "train",
        "sft",
        "--config",
        str(recipe),
        "--accelerate-config",
        "cpu_ddp",
        "--num-processes",
        "2",
    ]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both workers, as a node's crash would
    proc.wait()
    assert not (interrupted / "model.safetensors").exists(), "the kill came too late to test resuming"
    state = json.loads((interrupted / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] < fields["max_steps"]

    launch("cpu_ddp", recipe, "sft")  # same command: resumes from the last checkpoint
    final, expected = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
