"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate, one process: `align train sft` as a user launches it.

Three runs of the same recipe (4 layers of the Qwen2-1.5B shape, random weights; synthetic rows, a few steps, seed 0),
each its own process: plain (`align train sft --config R`), and `--accelerate-config zero2|zero3 --num-processes 1`
(the shipped accelerate_configs; cpu_zero2/cpu_zero3 on a CPU). The check passes when every step's loss matches the
plain run's to bf16 tolerance (relative 2e-2: bf16 keeps 8 bits of mantissa, 2^-8 = 0.4 %, and DeepSpeed's bf16 mode
holds the weights themselves in bf16 where the plain run autocasts float32 weights). The ratio is the Trainer's own
timing of `train()` (`train_runtime`) against the plain run's; each launch's wall time is recorded too.

On a CPU DeepSpeed runs too (gloo, `GPU_KIT_DEEPSPEED_ON_CPU=1`: both checks pass, losses equal), but its three
launches each import TRL and DeepSpeed: 2 minutes on the shared 2-core machine (2026-12-02), more than the rest
of the tiny run. `--tiny --device cpu` therefore skips them with that reason; tests/test_distributed.py runs ZeRO-2
and ZeRO-3 on CPU with two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu.kit import QWEN2_1_5B_4_LAYERS, Kit, SkipCheck


LOSS_TOLERANCE = 2e-2
ON_CPU_ENV = "GPU_KIT_DEEPSPEED_ON_CPU"
REPO = Path(__file__).resolve().parents[2]


def _recipe(kit: Kit, output_dir: Path) -> Path:
    sizes = kit.sizes
    fields = {
        "model_name_or_path": kit.model(QWEN2_1_5B_4_LAYERS),
        "dtype": "float32",
        "dataset_name": "synthetic",
        "synthetic_num_train": 64,
        "output_dir": str(output_dir),
        "max_steps": sizes.deepspeed_steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1.0e-5,
        "max_length": 256,
        "bf16": kit.cuda,
        "use_cpu": not kit.cuda,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "recipe.yaml"
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in fields.items()) + "\n")
    return path


def _run(kit: Kit, name: str, accelerate_config: str | None) -> dict:
    output_dir = kit.workdir / "deepspeed" / name
    command = [sys.executable, "-m", "align.cli", "train", "sft", "--config", str(_recipe(kit, output_dir / "run"))]
    if accelerate_config is not None:
        command += ["--accelerate-config", accelerate_config, "--num-processes", "1"]
    timeout = max(1.0, kit.soft_deadline - time.monotonic() + 30)
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=dict(os.environ))
    wall = time.perf_counter() - began
    (output_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    history = json.loads((output_dir / "run" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    runtime = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    return {"losses": losses, "train_runtime_s": runtime, "wall_s": round(wall, 1)}


def zero(kit: Kit, stage: int) -> dict:
    if not kit.cuda and os.environ.get(ON_CPU_ENV) != "1":
        raise SkipCheck(
            "DeepSpeed on CPU: its three launches cost ~2 min here, more than the rest of the tiny run; "
            f"tests/test_distributed.py covers ZeRO-2/3 on CPU ({ON_CPU_ENV}=1 runs it here anyway)"
        )
    if "deepspeed_plain" not in kit.cache:
        kit.cache["deepspeed_plain"] = _run(kit, "plain", None)
    plain = kit.cache["deepspeed_plain"]
    config = f"{'' if kit.cuda else 'cpu_'}zero{stage}"
    run = _run(kit, config, config)
    if len(run["losses"]) != len(plain["losses"]):
        raise RuntimeError(f"{config} logged {len(run['losses'])} losses, the plain run {len(plain['losses'])}")
    differences = [abs(a - b) / max(abs(b), 1e-8) for a, b in zip(run["losses"], plain["losses"])]
    if max(differences) > LOSS_TOLERANCE:
        raise RuntimeError(
            f"{config} losses {run['losses']} differ from the plain run's {plain['losses']} by up to "
            f"{max(differences):.2%} (tolerance {LOSS_TOLERANCE:.0%})"
        )
    return {
        "model": kit.describe_model(QWEN2_1_5B_4_LAYERS),
        "setting": f"accelerate_configs/{config}.yaml, 1 process, {kit.sizes.deepspeed_steps} steps, batch 4 x 256",
        "baseline": "plain align train sft",
        "ratios": {config: round(run["train_runtime_s"] / plain["train_runtime_s"], 3)},
        "losses": {"plain": plain["losses"], config: run["losses"]},
        "max_relative_loss_difference": round(max(differences), 5),
        "train_runtime_s": {"plain": plain["train_runtime_s"], config: run["train_runtime_s"]},
        "wall_s_per_launch": {"plain": plain["wall_s"], config: run["wall_s"]},
    }
