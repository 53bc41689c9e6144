"""Atomic checkpoints (align.checkpoints): a save killed midway never blocks the rerun, which resumes from the newest
complete checkpoint and ends where an uninterrupted run ends."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from align.attention.parameters import PARAMETERS_FILE
from align.checkpoints import is_complete, newest_complete_checkpoint, with_atomic_checkpoints
from align.cli import main as align_main
from align.prm import SETTINGS_FILE as PRM_SETTINGS_FILE
from align.training import METHODS, default_recipe


REPO = Path(__file__).resolve().parents[1]

# Installed as `sitecustomize` in every process of a run (the ranks of a launch too): with STALL_AT_STEP=N, the save of
# checkpoint N stops (forever) after its RNG state is written, i.e. after the weights and the optimizer and before
# trainer_state.json, and rank 0 announces where it stopped.
STALL_HOOK = """
import os, pathlib, time

if os.environ.get("STALL_AT_STEP"):
    import transformers

    save_rng_state = transformers.Trainer._save_rng_state

    def stalled(self, output_dir):
        save_rng_state(self, output_dir)
        if self.state.global_step == int(os.environ["STALL_AT_STEP"]):
            if self.args.process_index == 0:
                pathlib.Path(os.environ["STALL_MARKER"]).write_text(output_dir)
            time.sleep(600)

    transformers.Trainer._save_rng_state = stalled
"""


def write_recipe(path: Path, model: str, output_dir: Path, **fields) -> Path:
    recipe = {
        "model_name_or_path": model,
        "dataset_name": "synthetic",
        "synthetic_num_train": 16,
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "max_length": 128,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": 1,
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
        **fields,
    }
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in recipe.items()))
    return path


def train(recipe: Path, *launch: str, **env) -> subprocess.Popen:
    """`align train sft --config recipe [launch flags]`, with the stall hook importable."""
    hook = recipe.parent / "stall_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "align.cli", "train", "sft", "--config", str(recipe), *launch],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env},
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the run and the ranks it launched (torch's launcher starts each in its own session)."""
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return output


def test_newest_complete_checkpoint_skips_torn_ones_and_interrupted_saves(tmp_path, caplog):
    out = tmp_path / "run"
    for step in (2, 4, 5):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (out / "checkpoint-5" / "trainer_state.json").write_text('{"global_st')  # a disk that filled up mid-write
    (out / "tmp-checkpoint-6" / "checkpoint-6").mkdir(parents=True)
    (out / "checkpoint-7.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="align.train"):
        assert newest_complete_checkpoint(out) == str(out / "checkpoint-2")
    skipped = caplog.text
    assert f"skipping incomplete checkpoint {out / 'checkpoint-5'}" in skipped
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'}" in skipped
    assert f"skipping {out / 'tmp-checkpoint-6'}: a checkpoint save that was interrupted" in skipped
    assert newest_complete_checkpoint(tmp_path / "missing") is None
    # transformers' JIT checkpoint marks its save in progress with a sentinel file
    (out / "checkpoint-2" / "checkpoint-is-incomplete.txt").write_text("in progress")
    assert not is_complete(out / "checkpoint-2") and newest_complete_checkpoint(out) is None


def test_every_method_trainer_gets_atomic_checkpoints_once():
    import trl

    atomic = with_atomic_checkpoints(trl.SFTTrainer)
    assert atomic.__name__ == "SFTTrainer" and issubclass(atomic, trl.SFTTrainer)
    assert with_atomic_checkpoints(trl.SFTTrainer) is atomic and with_atomic_checkpoints(atomic) is atomic


def test_resume_skips_a_hand_made_torn_checkpoint(tiny_model_dir, tmp_path, caplog):
    """A checkpoint torn by a kill (config.json and model.safetensors only) is skipped, with a log line, instead of
    crashing the rerun on its missing trainer_state.json. The extra file entropy regularization saves next to the
    weights is part of every (atomic) checkpoint."""
    out = tmp_path / "run"
    fields = {"max_steps": 2, "attention_entropy_coef": 0.1, "attention_entropy_log_steps": 0}
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, out, **fields)
    assert align_main(["train", "sft", "--config", str(recipe)]) == 0
    assert sorted(path.name for path in out.iterdir() if "checkpoint" in path.name) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / PARAMETERS_FILE).is_file() and is_complete(out / "checkpoint-2")

    torn = out / "checkpoint-3"
    torn.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out / "checkpoint-2" / name, torn / name)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, out, **{**fields, "max_steps": 3})
    with caplog.at_level(logging.WARNING, logger="align.train"):
        assert align_main(["train", "sft", "--config", str(recipe)]) == 0
    assert f"skipping incomplete checkpoint {torn}" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert is_complete(torn) and (torn / "optimizer.pt").is_file() and (torn / PARAMETERS_FILE).is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert not list(out.glob("tmp-*"))


# What each method's default recipe needs to train one step of the tiny model quickly (GRPO samples per step).
ONE_STEP = ["--max_steps", "1", "--synthetic_num_train", "8", "--per_device_train_batch_size", "4"]
SAMPLING = ["--num_generations", "4", "--max_completion_length", "8"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_saves_complete_checkpoints_in_place(method, tiny_model_dir, tmp_path):
    """The staging reaches every trainer's save (TRL's extras and align's files included): checkpoint-1 is complete,
    loadable, and no staging directory is left."""
    out = tmp_path / "run"
    argv = ["train", method, "--config", str(default_recipe(method)), "--model_name_or_path", tiny_model_dir]
    argv += ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "1", *ONE_STEP]
    assert align_main([*argv, *(SAMPLING if method in ("pass_n", "grpo", "prime") else [])]) == 0
    checkpoint = out / "checkpoint-1"
    assert (
        is_complete(checkpoint)
        and (checkpoint / "optimizer.pt").is_file()
        and (checkpoint / "rng_state.pth").is_file()
    )
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the default recipes train LoRA adapters
    if method == "prm":  # written by the implicit PRM trainer's _save, next to the adapter
        assert (checkpoint / PRM_SETTINGS_FILE).is_file()
    assert not list(out.glob("tmp-*"))
    assert newest_complete_checkpoint(out) == str(checkpoint)


def kill_during_the_save_then_rerun(tmp_path: Path, model: str, *launch: str) -> None:
    """kill -9 a run while it saves checkpoint-2; the same command then resumes from checkpoint-1 and ends with the
    weights of an uninterrupted run."""
    reference = tmp_path / "reference"
    finish(train(write_recipe(tmp_path / "reference.yaml", model, reference), *launch))

    interrupted = tmp_path / "interrupted"
    recipe = write_recipe(tmp_path / "interrupted.yaml", model, interrupted)
    marker = tmp_path / "stalled"
    proc = train(recipe, *launch, STALL_AT_STEP="2", STALL_MARKER=str(marker))
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "the run never reached the save of checkpoint-2"
        time.sleep(0.05)
    being_written = Path(marker.read_text())
    assert being_written == interrupted / "tmp-checkpoint-2" / "checkpoint-2"  # staged, not in place
    assert not (interrupted / "checkpoint-2").exists()
    kill_tree(proc)

    output = finish(train(recipe, *launch))  # the same command: resumes from checkpoint-1
    assert f"skipping {interrupted / 'tmp-checkpoint-2'}: a checkpoint save that was interrupted" in output
    assert f"resuming from {interrupted / 'checkpoint-1'}" in output
    assert not list(interrupted.glob("tmp-*"))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (1, 2, 3, 4)]
    final, expected = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_kill_during_a_save_then_rerun_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    kill_during_the_save_then_rerun(tmp_path, tiny_model_dir)


@pytest.mark.distributed
def test_kill_during_a_zero3_save_then_rerun_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Under DeepSpeed every rank writes its shards of the checkpoint (global_stepN/) into the staging directory."""
    kill_during_the_save_then_rerun(
        tmp_path, tiny_model_dir, "--accelerate-config", "cpu_zero3", "--num-processes", "2"
    )
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert (checkpoint / "latest").read_text().strip() == "global_step2" and (checkpoint / "global_step2").is_dir()
