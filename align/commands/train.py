"""`align train <method> --config recipe.yaml [--key value ...]`: one training script for every method.

The flow of a run is one line: recipe YAML -> `TrlParser` (DataArguments, the method's config, AlignModelConfig)
-> problems -> the method's dataset format -> trainer -> checkpoints -> final model/adapter in `output_dir`.
A run whose `output_dir` already holds checkpoints resumes from the last one instead of starting over.
Runs under `accelerate launch -m align.cli train ...` as well (one process per device).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


HELP = "Train with a recipe: align train <method> --config recipes/<model>/<method>.yaml"

logger = logging.getLogger("align.train")


@dataclass(frozen=True)
class Method:
    """Where a method's config and trainer live and which dataset format it trains on."""

    config: str  # "module:Class"
    trainer: str  # "module:Class"
    dataset_kind: str | Callable  # a kind of `align.data.training`, or a function of the trainer config
    description: str


METHODS: dict[str, Method] = {
    "sft": Method("trl:SFTConfig", "trl:SFTTrainer", "sft", "cross-entropy fine-tuning (TRL SFTTrainer)"),
    "dco": Method(
        "align.trainers.dco:DCOConfig",
        "align.trainers.dco:DCOTrainer",
        "sft",
        "Direct Coverage Optimization: pass@N loss -log(1-(1-p̂)^N) that limits over-confidence (sequence/step/p̂)",
    ),
    "margin": Method(
        "align.trainers.margin:MarginPreferenceConfig",
        "align.trainers.margin:MarginPreferenceTrainer",
        "preference",
        "margin losses (DPO/IPO/SLiC/SimPO/R-DPO/DPOP/CPO) with live gradient-entanglement diagnostics",
    ),
    "prm": Method(
        "align.trainers.implicit_prm:ImplicitPRMConfig",
        "align.trainers.implicit_prm:ImplicitPRMTrainer",
        lambda config: "outcome" if config.objective == "ce" else "preference",
        "implicit PRM: outcome reward β·log π/π_ref (ce on labels, dpo/nca on pairs); step rewards for free",
    ),
    "pass_n": Method(
        "align.trainers.pass_n:PassAtNConfig",
        "align.trainers.pass_n:PassAtNGRPOTrainer",
        "prompts",
        "online pass@N for chains of thought: GRPO sampling, weights F(N,p̂)/c on correct samples (verifier reward)",
    ),
    "grpo": Method(
        "align.trainers.pass_n:GraderGRPOConfig",
        "align.trainers.pass_n:GraderGRPOTrainer",
        "prompts",
        "GRPO (TRL GRPOTrainer) with align's verifier reward on the dataset's answers: the pass_n baseline",
    ),
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
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


def build_parser(method: Method):
    from trl import TrlParser

    from align.configs import AlignModelConfig, DataArguments

    return TrlParser((DataArguments, method_classes(method)[1], AlignModelConfig))


def method_classes(method: Method) -> tuple[type, type]:
    """The method's (trainer, config) with entropy-regularized attention composed in (off unless a field sets it)."""
    from align.trainers.entropy import with_entropy_regularization

    return with_entropy_regularization(_load(method.trainer), _load(method.config))


def dataset_kind_for(method: Method, training_args) -> str:
    kind = method.dataset_kind
    return kind(training_args) if callable(kind) else kind


def build_datasets(kind: str, data_args, seed: int):
    """Train (and optional eval) `datasets.Dataset` in the trainer's format for `kind`."""
    from datasets import Dataset

    from align.data.loaders import HUB_SOURCES, is_local_file, load_problems, read_hub_rows, read_local_rows
    from align.data.training import is_trainer_format, rows_for_kind

    name = data_args.dataset_name

    def raw_rows(split: str) -> list[dict] | None:
        """Rows of a local file or of a Hub dataset that is not a known problem source (None otherwise)."""
        if is_local_file(name):
            return read_local_rows(name)
        if "/" in name and name not in HUB_SOURCES and not name.endswith((".jsonl", ".json", ".parquet")):
            return read_hub_rows(((name, (data_args.dataset_config,)),), split)[1]
        return None

    def rows_for(split: str, limit: int | None) -> list[dict]:
        rows = raw_rows(split)
        if rows and is_trainer_format(rows[0].keys(), kind):
            return rows[:limit] if limit is not None else rows
        if name == "synthetic" and limit is None:
            limit = (
                data_args.synthetic_num_train
                if split == data_args.dataset_train_split
                else data_args.synthetic_num_eval
            )
        loaded = load_problems(
            name,
            split,
            limit=limit,
            skip_invalid=data_args.skip_invalid,
            dataset_config=data_args.dataset_config,
            synthetic_levels=data_args.synthetic_levels,
            synthetic_seed=data_args.synthetic_seed,
        )
        if loaded.skipped:
            logger.warning(
                "skipped %d invalid rows of %s (first: %s)", loaded.skipped, loaded.source, loaded.skipped_reasons[0]
            )
        return rows_for_kind(kind, loaded.problems, data_args, seed=seed)

    train_rows = rows_for(data_args.dataset_train_split, data_args.max_train_samples)
    if not train_rows:
        raise ValueError(f"The training set {data_args.dataset_name!r} is empty after loading; nothing to train on.")
    eval_dataset = None
    if data_args.dataset_test_split:
        eval_dataset = Dataset.from_list(rows_for(data_args.dataset_test_split, data_args.max_eval_samples))
    return Dataset.from_list(train_rows), eval_dataset


def model_init_kwargs(model_args) -> dict:
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def run(method_name: str, data_args, training_args, model_args):
    """Build everything from parsed configs, train (resuming if possible), save; returns the trainer."""
    from trl import get_peft_config

    from align.distributed import DistributedSanityCallback
    from align.models import load_tokenizer, resolve_model_path

    method = METHODS[method_name]
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    kind = dataset_kind_for(method, training_args)
    train_dataset, eval_dataset = build_datasets(kind, data_args, seed=training_args.seed)
    trainer_cls = method_classes(method)[0]
    trainer = trainer_cls(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.add_callback(DistributedSanityCallback(trainer))
    resume = training_args.resume_from_checkpoint or last_checkpoint(training_args.output_dir)
    if resume:
        logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        # The Trainer writes its state (loss history) only inside checkpoints; keep the final one with the model.
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    # Tear down together: a rank that destroys its gloo group and exits while another is still writing files has
    # been seen to abort at exit ("terminate called without an active exception"), failing the whole launch.
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: closes trackers and the process group
        trainer.end()
    return trainer


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    method_name, rest = argv[0].replace("-", "_"), argv[1:]
    if method_name not in METHODS:
        print(f"align train: unknown method {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dry_run", "--dry-run", action="store_true")
    for flag in (
        "accelerate-config",
        "num-processes",
        "num-machines",
        "machine-rank",
        "main-process-ip",
        "main-process-port",
    ):
        pre.add_argument(f"--{flag}", f"--{flag.replace('-', '_')}", dest=flag.replace("-", "_"))
    known, rest = pre.parse_known_args(rest)
    if known.accelerate_config:
        return launch(method_name, rest, known)
    parser = build_parser(METHODS[method_name])
    try:
        data_args, training_args, model_args = parser.parse_args_and_config(rest)
    except ValueError as error:
        if "bf16/gpu" in str(error):  # TRL configs default to bf16=True, which transformers refuses without a GPU
            raise SystemExit(
                "align train: this machine has no GPU but the recipe trains in bf16 (TRL's default). Set "
                "`bf16: false` and `use_cpu: true` in the recipe, or pass `--bf16 false --use_cpu true`."
            ) from error
        raise
    if known.dry_run:
        print(f"method: {method_name}\n{data_args}\n{training_args}\n{model_args}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(method_name, data_args, training_args, model_args)
    return 0


def launch(method_name: str, rest: list[str], known) -> int:
    """Re-run this command under `accelerate launch` with a named config (like `trl sft --accelerate_config`)."""
    import subprocess

    from align.distributed import EXPECTED_PROCESSES_ENV, format_command, launch_command

    if known.accelerate_config.removesuffix(".yaml").startswith("cpu_") and "--use_cpu" not in rest:
        # The CPU configs select accelerate's multi-process launcher; the Trainer must also be told to use the CPU,
        # otherwise every process trains alone (platform.md section 1).
        rest = [*rest, "--use_cpu", "true"]
    command = launch_command(
        known.accelerate_config,
        ["train", method_name, *rest],
        num_processes=known.num_processes,
        num_machines=known.num_machines,
        machine_rank=known.machine_rank,
        main_process_ip=known.main_process_ip,
        main_process_port=known.main_process_port,
    )
    env = dict(os.environ)
    if known.num_processes is not None:
        env[EXPECTED_PROCESSES_ENV] = str(int(known.num_processes))  # accelerate's count is over all machines
    print(f"align train: {format_command(command)}", file=sys.stderr, flush=True)
    return subprocess.run(command, env=env).returncode
