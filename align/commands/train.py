"""`align train <method> --config recipe.yaml [--key value ...]`: one training script for every method.

The methods, the flow of a run and resuming are `align.training`'s; this module parses the command line. With
`--accelerate-config NAME|PATH` it re-runs itself under `accelerate launch` (one process per device); it also runs
under `accelerate launch -m align.cli train ...` directly. `--dry_run` prints the parsed configs (and, with
`--accelerate-config`, the launch command) and trains nothing; it validates the configs without requiring the
hardware the recipe is for (a bf16 GPU recipe dry-runs on a CPU) and says which checks it left out. Bad input
(`align.errors.InputError`, e.g. a mistyped recipe field) is reported by `align.cli` as one line.
"""

from __future__ import annotations

import argparse
import logging
import sys


HELP = "Train with a recipe: align train <method> --config recipes/<model>/<method>.yaml"

LAUNCH_FLAGS = (
    "accelerate-config",
    "num-processes",
    "num-machines",
    "machine-rank",
    "main-process-ip",
    "main-process-port",
)


def usage() -> str:
    from align.training import METHODS

    width = max(map(len, METHODS))
    rows = "\n".join(f"  {name.ljust(width)}  {method.description}" for name, method in METHODS.items())
    return (
        "usage: align train <method> --config RECIPE.yaml [--dry_run] [--any_config_field VALUE ...]\n"
        "                   [--accelerate-config NAME|PATH [--num-processes N] [--num-machines M] [--machine-rank R]\n"
        "                    [--main-process-ip IP] [--main-process-port PORT]]\n\n"
        f"methods:\n{rows}\n\nFields come from the recipe; command-line flags override them. With\n"
        "--accelerate-config, align starts `accelerate launch` itself with a config from accelerate_configs/\n"
        "(e.g. zero3, cpu_ddp)."
    )


def main(argv: list[str]) -> int:
    from align import training

    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    method_name, rest = argv[0].replace("-", "_"), argv[1:]
    if method_name not in training.METHODS:
        print(f"align train: unknown method {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dry_run", "--dry-run", action="store_true")
    for flag in LAUNCH_FLAGS:
        pre.add_argument(f"--{flag}", f"--{flag.replace('-', '_')}", dest=flag.replace("-", "_"))
    known, rest = pre.parse_known_args(rest)
    if known.accelerate_config:
        import subprocess

        from align.distributed import format_command

        options = {name: getattr(known, name) for name in vars(known) if name not in ("dry_run", "accelerate_config")}
        command, env = training.launch_command(method_name, rest, known.accelerate_config, **options)
        print(f"align train: {format_command(command)}", file=sys.stderr, flush=True)
        if not known.dry_run:
            return subprocess.run(command, env=env).returncode
        rest = training.rank_argv(known.accelerate_config, rest)  # a dry run parses what every process would
    if known.dry_run:
        (data_args, training_args, model_args), skipped = training.dry_run_args(method_name, rest)
        print(f"method: {method_name}\n{data_args}\n{training_args}\n{model_args}")
        for check in skipped:
            print(f"dry run: not checked on this machine: {check}")
        return 0
    data_args, training_args, model_args = training.parse_args(method_name, rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    training.run(method_name, data_args, training_args, model_args)
    return 0
