"""Launching under Accelerate/DeepSpeed, and guards against distributed setups that fail silently.

`accelerate launch` has traps that produce no error: `--cpu` starts ONE process whatever `--num_processes` says; a
torchrun launch without a process group on CPU makes every rank train its own independent copy; an FSDP config on
CPU can be ignored without a word (platform.md sections 1-3). `DistributedSanityCallback` checks, before the first
step, that the world the Trainer sees is the world that was launched, and after the first step, that the ranks'
parameters are actually identical; a mismatch stops the run with an error that says what to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path

from transformers import TrainerCallback

from align.resources import shipped_dir


logger = logging.getLogger("align.distributed")

EXPECTED_PROCESSES_ENV = "ALIGN_EXPECTED_PROCESSES"
# Debug switch (used by the distributed tests): at the end of training, gather every rank's parameter fingerprint
# (full parameters under ZeRO-3, which costs one gather of the model) and write them to sync_check.json.
VERIFY_SYNC_ENV = "ALIGN_VERIFY_SYNC"
# Scheduler variables read for multi-node defaults, in order of preference.
_ENV_DEFAULTS = {
    "num_machines": ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
    "machine_rank": ("NODE_RANK", "MACHINE_RANK", "SLURM_NODEID"),
    "main_process_ip": ("MASTER_ADDR",),
    "main_process_port": ("MASTER_PORT",),
}


class DistributedSetupError(RuntimeError):
    """The processes that were launched do not form the distributed run that was asked for."""


def accelerate_configs_dir() -> Path:
    """`accelerate_configs/` of the current directory if present (a project's own), else the ones align ships."""
    local = Path.cwd() / "accelerate_configs"
    return local if local.is_dir() else shipped_dir("accelerate_configs")


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A path to an accelerate YAML, or a name of one in `accelerate_configs/` (`zero3` -> zero3.yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    directory = accelerate_configs_dir()
    candidate = directory / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
    raise FileNotFoundError(
        f"No accelerate config {name_or_path!r}: not a file, and not one of {names} in {directory}."
    )


def _from_env(key: str) -> str | None:
    for variable in _ENV_DEFAULTS.get(key, ()):
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def launch_command(
    config: str,
    align_args: list[str],
    num_processes: int | None = None,
    num_machines: int | None = None,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
) -> list[str]:
    """The `accelerate launch ... -m align.cli <align_args>` command line; multi-node values default to the
    scheduler's environment (NNODES/SLURM_NNODES, NODE_RANK/SLURM_NODEID, MASTER_ADDR, MASTER_PORT)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(resolve_accelerate_config(config)),
    ]
    options = {
        "num_processes": num_processes,
        "num_machines": num_machines if num_machines is not None else _from_env("num_machines"),
        "machine_rank": machine_rank if machine_rank is not None else _from_env("machine_rank"),
        "main_process_ip": main_process_ip or _from_env("main_process_ip"),
        "main_process_port": main_process_port or _from_env("main_process_port"),
    }
    for key, value in options.items():
        if value is not None:
            command += [f"--{key}", str(value)]
    return [*command, "-m", "align.cli", *align_args]


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


def describe(trainer) -> str:
    """One line on the distributed setup as the Trainer sees it (logged by rank 0 at the start of training)."""
    import torch.distributed as dist

    state, args = trainer.accelerator.state, trainer.args
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    per_device = args.per_device_train_batch_size
    global_batch = per_device * args.gradient_accumulation_steps * state.num_processes
    return (
        f"distributed: type={state.distributed_type.value} world_size={state.num_processes} backend={backend} "
        f"device={state.device} per_device_batch={per_device} grad_accum={args.gradient_accumulation_steps} "
        f"global_batch={global_batch}"
    )


def check_world(trainer) -> None:
    """Raise `DistributedSetupError` if the launched world and the Trainer's world disagree."""
    state = trainer.accelerator.state
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    expected = os.environ.get(EXPECTED_PROCESSES_ENV)
    if expected is not None and int(expected) != launched:
        raise DistributedSetupError(
            f"{expected} processes were requested but {launched} were started. `accelerate launch --cpu` always "
            "starts a single process: for CPU runs use a config like accelerate_configs/cpu_ddp.yaml "
            "(distributed_type MULTI_GPU, use_cpu: false) and set `use_cpu: true` in the recipe instead."
        )
    if launched != state.num_processes:
        raise DistributedSetupError(
            f"{launched} processes were launched but the Trainer sees a world of {state.num_processes} "
            f"(distributed_type={state.distributed_type.value}): each rank would train its own copy. On CPU "
            "set `use_cpu: true` (DDP) or `ddp_backend: gloo` (DeepSpeed) in the recipe; on GPU check that CUDA is "
            "visible."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and state.distributed_type.value != "FSDP":
        raise DistributedSetupError(
            f"The accelerate config asks for FSDP but the run is {state.distributed_type.value}: the model would not "
            "be sharded. FSDP needs GPUs through accelerate; on CPU use the DeepSpeed configs (cpu_zero2/cpu_zero3)."
        )


def parameter_fingerprint(model):
    """A float64 (sum, sum of squares) over trainable parameters: equal on every rank iff (almost surely) in sync."""
    import torch

    total = torch.zeros(2, dtype=torch.float64)
    for param in model.parameters():
        if param.requires_grad and param.numel() > 0:
            data = param.detach().to(torch.float64)
            total += torch.stack([data.sum(), (data * data).sum()]).cpu()
    return total


class DistributedSanityCallback(TrainerCallback):
    """Logs the setup and fails fast when ranks are not one synchronized run (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.checked_sync = False

    def on_train_begin(self, args, state, control, **kwargs):
        check_world(self.trainer)
        if self.trainer.accelerator.is_main_process:
            logger.warning(describe(self.trainer))

    def on_train_end(self, args, state, control, **kwargs):
        if os.environ.get(VERIFY_SYNC_ENV, "0") != "1":
            return
        import json

        accelerator = self.trainer.accelerator
        model = accelerator.unwrap_model(self.trainer.model)
        if (
            accelerator.state.distributed_type.value == "DEEPSPEED"
            and accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                fingerprint = parameter_fingerprint(model)
        elif accelerator.state.distributed_type.value == "FSDP":
            import torch

            # FSDP2 parameters are DTensors holding one shard each: fingerprint the full tensors. full_tensor() is an
            # all-gather, so every rank calls it for the same parameters in the same (module) order.
            fingerprint = torch.zeros(2, dtype=torch.float64)
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        full = param.full_tensor() if hasattr(param, "full_tensor") else param
                        data = full.detach().to(torch.float64).cpu()
                        fingerprint += torch.stack([data.sum(), (data * data).sum()])
        else:
            fingerprint = parameter_fingerprint(model)
        gathered = accelerator.gather(fingerprint.to(accelerator.device).unsqueeze(0)).cpu().tolist()
        if accelerator.is_main_process:
            path = Path(args.output_dir) / "sync_check.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fingerprints": gathered, "world_size": accelerator.num_processes}))

    def on_step_end(self, args, state, control, **kwargs):
        if self.checked_sync:
            return
        self.checked_sync = True
        accelerator = self.trainer.accelerator
        # ZeRO-3 and FSDP shard parameters, so equal full copies are not expected there (DeepSpeed/FSDP keep them in
        # step); the check is for replicated-parameter setups, where independent training is the silent failure.
        kind = accelerator.state.distributed_type.value
        zero3 = kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3
        if accelerator.num_processes == 1 or zero3 or kind == "FSDP":
            return
        fingerprint = parameter_fingerprint(accelerator.unwrap_model(self.trainer.model)).to(accelerator.device)
        gathered = accelerator.gather(fingerprint.unsqueeze(0)).cpu()
        spread = (gathered - gathered[0]).abs().max().item()
        scale = gathered[0].abs().max().item() + 1e-12
        if spread / scale > 1e-6:
            raise DistributedSetupError(
                f"After the first optimizer step the ranks' parameters differ (relative spread {spread / scale:.2e}): "
                "gradients are not being synchronized. Check the launcher and the `use_cpu`/`ddp_backend` settings."
            )


def describe_node() -> str | None:
    """One line on what this node's launcher started (logged by each node's local rank 0), from torchrun's
    environment; None outside torchrun. On several machines it shows at a glance that every launcher started the
    processes it should (`--num-processes` counts the processes of ALL machines)."""
    if "LOCAL_WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    local, local_rank = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    first = int(os.environ["RANK"]) - local_rank
    return (
        f"node {os.environ.get('GROUP_RANK', '?')} of {os.environ.get('GROUP_WORLD_SIZE', '?')}: {local} "
        f"process(es) here, global ranks {first}-{first + local - 1} of {os.environ.get('WORLD_SIZE', '?')}"
    )


# What a collective or the rendezvous store raises when a peer process is gone: gloo's TCP transport ("Read error
# ...: Connection reset by peer" when the peer's sockets close, "Timed out waiting ...ms" when it vanishes without
# closing them), NCCL (DistBackendError), the TCPStore (DistNetworkError / DistStoreError).
_LOST_RANK_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Connection refused",
    "Broken pipe",
    "Socket closed",
    "Timed out waiting",
    "gloo/transport",
)


def is_lost_rank_error(error: BaseException) -> bool:
    """True if `error`, in a multi-process run, means that another rank stopped answering."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(error, RuntimeError):
        return False
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return any(marker in str(error) for marker in _LOST_RANK_MARKERS)


def lost_rank_message(error: BaseException) -> str:
    """The one line a surviving rank prints: what it saw (gloo's first line, without its source location) and
    what to do."""
    import re

    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", reason).split(". This is typically")[0]
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    return (
        f"align train: rank {rank} of {world} lost contact with another rank ({reason}): a node died or the network "
        "dropped; rerun the same command on every node to resume from the last checkpoint"
    )


@contextlib.contextmanager
def exit_on_lost_rank():
    """Turn a dead peer's error into one line on stderr and exit status 1, instead of a 40-line traceback that ends
    in gloo's "GLHF". Any other error (and this one under `--debug` / ALIGN_DEBUG=1) propagates unchanged.

    A peer whose processes die has its sockets closed by the kernel, so the survivors' next collective fails at once
    (Connection reset by peer). A peer that vanishes without closing them (power loss, a network partition) is
    noticed only when the collective times out: `ddp_timeout` in the recipe (seconds, default 1800) on GPU; with
    `use_cpu` transformers does not pass it on and gloo's default of 30 minutes applies. A peer lost before the
    process group is formed (during argument parsing, where TrainingArguments starts it) is not caught here."""
    try:
        yield
    except RuntimeError as error:
        # align.cli's --debug / ALIGN_DEBUG switch, read here (importing align.cli would be an import cycle)
        debug = os.environ.get("ALIGN_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
        if debug or not is_lost_rank_error(error):
            raise
        sys.stdout.flush()
        print(f"\n{lost_rank_message(error)}", file=sys.stderr, flush=True)  # \n: after a progress bar's \r
        # The process group is broken: tearing it down at interpreter exit can block on the dead peer, or abort.
        os._exit(1)
