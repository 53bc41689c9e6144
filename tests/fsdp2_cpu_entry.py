"""Test-only entry point: `align` (or a script) under accelerate's FSDP2 on CPU processes over gloo.

    python -m accelerate.commands.launch --config_file tests/fsdp2_cpu.yaml tests/fsdp2_cpu_entry.py \\
        train sft --config recipe.yaml          # recipe: use_cpu: false, ddp_backend: gloo, bf16: false
    python -m accelerate.commands.launch --config_file tests/fsdp2_cpu.yaml tests/fsdp2_cpu_entry.py \\
        tests/prime_distributed_run.py ARGS...  # a first argument ending in .py runs that script instead

accelerate 1.15 turns an `ACCELERATE_USE_FSDP=true` launch into FSDP only when the PartialState's distributed type is
MULTI_GPU (or another accelerator's). On CPU, TrainingArguments builds either `PartialState(backend="gloo")` (recipe
`use_cpu: false, ddp_backend: gloo`): the process group spans both ranks but the type stays NO, so the model is
left unwrapped and each rank trains its own copy; or `PartialState(cpu=True)` (`use_cpu: true`): type MULTI_CPU,
plain DDP, the FSDP config ignored (platform.md section 3; align's check_world refuses both). The workaround, applied
in each launched process before anything builds a state: after every `PartialState.__init__` that leaves a gloo world
of more than one process of type NO or MULTI_CPU under an FSDP launch, set the shared type to MULTI_GPU;
AcceleratorState then selects FSDP with the plugin from the launch config. It relies on accelerate internals and
belongs here, not in align: on GPUs the type is MULTI_GPU to begin with.

With `ALIGN_TEST_SHARD_REPORT=1`, each rank also writes `fsdp_shards-rank<R>.json` to the output directory when
training begins: per trainable parameter of the prepared model, its class, global shape and local shape.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def apply_cpu_fsdp_workaround() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState.__init__
    if getattr(original, "_align_cpu_fsdp", False):
        return

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        shared = PartialState._shared_state
        if (
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and shared.get("backend") == "gloo"
            and shared.get("num_processes", 1) > 1
            and shared.get("distributed_type") in (DistributedType.NO, DistributedType.MULTI_CPU)
        ):
            shared["distributed_type"] = DistributedType.MULTI_GPU

    patched._align_cpu_fsdp = True
    PartialState.__init__ = patched


def install_shard_report() -> None:
    """Wrap align's DistributedSanityCallback.on_train_begin to record how the prepared model is sharded."""
    from align.distributed import DistributedSanityCallback

    original = DistributedSanityCallback.on_train_begin

    def on_train_begin(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        report = {
            name: {"class": type(param).__name__, "shape": list(param.shape), "local": list(local_shape(param))}
            for name, param in self.trainer.model.named_parameters()
            if param.requires_grad
        }
        rank = self.trainer.accelerator.process_index
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"fsdp_shards-rank{rank}.json").write_text(json.dumps(report))
        return result

    DistributedSanityCallback.on_train_begin = on_train_begin


def local_shape(param):
    return param.to_local().shape if hasattr(param, "to_local") else param.shape


def main(argv: list[str]) -> int:
    apply_cpu_fsdp_workaround()
    if os.environ.get("ALIGN_TEST_SHARD_REPORT") == "1":
        install_shard_report()
    if argv and argv[0].endswith(".py"):
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")  # the script exits on its own (SystemExit)
        return 0
    from align.cli import exit_without_teardown
    from align.cli import main as align_main

    status = align_main(argv)
    if status == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown()  # as `python -m align.cli` does: gloo teardown can abort a finished rank
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
