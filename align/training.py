"""Training as a library: the methods align trains, and `run`, which trains one from parsed configs.

The flow of a run is one line: recipe YAML -> `TrlParser` (DataArguments, the method's config, AlignModelConfig)
-> problems -> the method's dataset format -> trainer -> checkpoints -> final model/adapter in `output_dir`.
A run whose `output_dir` already holds checkpoints resumes from the newest complete one instead of starting over
(checkpoints are written atomically: `align.checkpoints`).
`align train` (align.commands.train) parses the command line and calls `parse_args` and `run`, or `launch_command`
to start itself under `accelerate launch`; `align.pipeline.train_recipe` calls them the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger("align.train")


def _prm_kind(config) -> str:
    """The implicit PRM trains on labelled outcomes with its `ce` objective, on preference pairs with dpo/nca."""
    return "outcome" if config.objective == "ce" else "preference"


@dataclass(frozen=True)
class Method:
    """One row of `METHODS`: where the method's config and trainer live, what data it trains on, its recipe."""

    module: str  # holds both classes; a leading dot means a module of align.trainers
    config: str
    trainer: str
    dataset_kind: str | Callable[[object], str]  # a kind of align.data.training, or a function of the trainer config
    recipe: str  # default recipe: recipes/smollm2-135m-instruct/<recipe>.yaml
    description: str  # one line of `align train --help`


# The registry. Classes are named, not imported: importing every trainer pulls in TRL's trainer stack (16 s on the
# 2-core CI machine, against 0.3 s for `align train --help`), which the help and the parent process of
# `--accelerate-config` never need; a run imports only its own method's module. Module `.x` is align.trainers.x,
# dataset kinds are align.data.training's, and default recipe `r` is recipes/smollm2-135m-instruct/r.yaml.
# fmt: off
_TABLE = {
    # method   module            config class              trainer class              dataset kind  default recipe
    "sft":     ("trl",           "SFTConfig",              "SFTTrainer",              "sft",        "sft"),
    "dco":     (".dco",          "DCOConfig",              "DCOTrainer",              "sft",        "dco"),
    "margin":  (".margin",       "MarginPreferenceConfig", "MarginPreferenceTrainer", "preference", "margin_dpo"),
    "prm":     (".implicit_prm", "ImplicitPRMConfig",      "ImplicitPRMTrainer",      _prm_kind,    "implicit_prm"),
    "pass_n":  (".pass_n",       "PassAtNConfig",          "PassAtNGRPOTrainer",      "prompts",    "pass_n"),
    "grpo":    (".pass_n",       "GraderGRPOConfig",       "GraderGRPOTrainer",       "prompts",    "grpo"),
    "prime":   (".prime",        "PrimeConfig",            "PrimeGRPOTrainer",        "prompts",    "prime"),
}
# fmt: on
_DESCRIPTIONS = {
    "sft": "cross-entropy fine-tuning (TRL SFTTrainer)",
    "dco": "Direct Coverage Optimization: pass@N loss -log(1-(1-p̂)^N) that limits over-confidence (sequence/step/p̂)",
    "margin": "margin losses (DPO/IPO/SLiC/SimPO/R-DPO/DPOP/CPO) with live gradient-entanglement diagnostics",
    "prm": "implicit PRM: outcome reward β·log π/π_ref (ce on labels, dpo/nca on pairs); step rewards for free",
    "pass_n": (
        "online pass@N for chains of thought: GRPO sampling, weights F(N,p̂)/c on correct samples (verifier reward)"
    ),
    "grpo": "GRPO (TRL GRPOTrainer) with align's verifier reward on the dataset's answers: the pass_n baseline",
    "prime": "PRIME: GRPO with token advantages from an implicit PRM updated online on the verifier's outcomes",
}
METHODS: dict[str, Method] = {name: Method(*row, _DESCRIPTIONS[name]) for name, row in _TABLE.items()}


def default_recipe(method_name: str) -> Path:
    """The method's recipe for the embedded default model (CPU-sized), from the recipes align ships."""
    from align.models import DEFAULT_MODEL
    from align.resources import recipe_path

    return recipe_path(f"{DEFAULT_MODEL}/{METHODS[method_name].recipe}.yaml")


def method_classes(method: Method) -> tuple[type, type]:
    """The method's (trainer, config) with entropy-regularized attention composed in (off unless a field sets it)."""
    from align.trainers.entropy import with_entropy_regularization

    module = importlib.import_module(method.module, "align.trainers")
    return with_entropy_regularization(getattr(module, method.trainer), getattr(module, method.config))


def build_parser(method: Method):
    """The recipe parser of `method`; a recipe without `output_dir` gets `runs/<model>/<method name>`."""
    from align.configs import AlignModelConfig, DataArguments, RecipeParser

    name = next(name for name, row in METHODS.items() if row is method)
    config_classes = (DataArguments, method_classes(method)[1], AlignModelConfig)
    return RecipeParser(config_classes, method=name, prog=f"align train {name}")


def parse_args(method_name: str, argv: list[str]):
    """(DataArguments, the method's config, AlignModelConfig) from `--config RECIPE.yaml` and `--field value` flags.

    Bad input raises `align.errors.InputError` (one line). A recipe without `output_dir` writes to
    `runs/<model>/<method>` (`align.configs.default_output_dir`), which is logged.
    """
    parser = build_parser(METHODS[method_name])
    configs = parser.parse_args_and_config(argv)
    if parser.default_output_dir is not None:
        logger.warning("the recipe sets no output_dir: writing to %s", parser.default_output_dir)
    return configs


def dry_run_args(method_name: str, argv: list[str]) -> tuple[tuple, list[str]]:
    """`parse_args` for `align train --dry_run`: the configs as the recipe's hardware would build them, and the
    hardware checks this machine could not make.

    transformers refuses `bf16: true` in `TrainingArguments.__post_init__` on a machine without a bf16 GPU (unless
    `use_cpu`). A dry run validates everything else: that one availability test is answered "yes" while the configs
    are built, and reported as skipped, so that a GPU recipe's configs, mixed precision included, print on a CPU.
    """
    from unittest import mock

    import transformers.training_args as training_arguments

    skipped = []
    available = training_arguments.is_torch_bf16_gpu_available

    def bf16_check() -> bool:
        if not available():
            skipped.append("bf16 needs a GPU that computes bf16 (Ampere or newer), and there is none here")
        return True

    with mock.patch.object(training_arguments, "is_torch_bf16_gpu_available", bf16_check):
        configs = parse_args(method_name, argv)
    return configs, skipped


def dataset_kind_for(method: Method, training_args) -> str:
    kind = method.dataset_kind
    return kind(training_args) if callable(kind) else kind


def model_init_kwargs(model_args) -> dict:
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint a run resumes from: `resume_from_checkpoint` when it names one, else (unset or `true`) the newest
    complete checkpoint in `output_dir` (`align.checkpoints`: incomplete ones are skipped, with a log line)."""
    from align.checkpoints import newest_complete_checkpoint

    requested = training_args.resume_from_checkpoint
    if requested and str(requested).lower() != "true":
        return requested
    return newest_complete_checkpoint(training_args.output_dir)


def run(method_name: str, data_args, training_args, model_args):
    """Build everything from parsed configs, train (resuming if possible), save; returns the trainer.

    In a multi-process run, a rank that loses contact with another (a node died, the network dropped) prints one
    line saying so and exits with status 1 (`align.distributed.exit_on_lost_rank`)."""
    from align.distributed import exit_on_lost_rank

    with exit_on_lost_rank():
        return _run(method_name, data_args, training_args, model_args)


def _run(method_name: str, data_args, training_args, model_args):
    from trl import get_peft_config

    from align.checkpoints import with_atomic_checkpoints
    from align.data.training import build_datasets
    from align.distributed import DistributedSanityCallback, describe_node
    from align.models import load_tokenizer, resolve_model_path

    method = METHODS[method_name]
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    kind = dataset_kind_for(method, training_args)
    train_dataset, eval_dataset = build_datasets(kind, data_args, seed=training_args.seed)
    # Every method's checkpoints are written atomically, so that a kill mid-save never blocks the rerun's resume.
    trainer_cls = with_atomic_checkpoints(method_classes(method)[0])
    trainer = trainer_cls(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.add_callback(DistributedSanityCallback(trainer))
    if os.environ.get("LOCAL_RANK", "0") == "0" and (node := describe_node()):
        logger.warning(node)  # one line per launcher: on several machines, shows what each one started
    if data_args.coverage_eval_steps:  # exact coverage / sampled pass@k on held-out problems, logged as eval_*
        from align.evaluation.callback import callback_from_arguments

        trainer.add_callback(callback_from_arguments(trainer, data_args, seed=training_args.seed))
    resume = resume_checkpoint(training_args)
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


def rank_argv(accelerate_config: str, argv: list[str]) -> list[str]:
    """The `align train <method>` arguments every launched process gets."""
    if accelerate_config.removesuffix(".yaml").startswith("cpu_") and "--use_cpu" not in argv:
        # The CPU configs select accelerate's multi-process launcher; the Trainer must also be told to use the CPU,
        # otherwise every process trains alone (platform.md section 1).
        return [*argv, "--use_cpu", "true"]
    return argv


def launch_command(
    method_name: str, argv: list[str], accelerate_config: str, **launch_options
) -> tuple[list[str], dict[str, str]]:
    """The command (and its environment) that runs `align train <method> <rank_argv>` under `accelerate launch`
    with a named config (like `trl sft --accelerate_config`); `launch_options` are `distributed.launch_command`'s."""
    from align.distributed import EXPECTED_PROCESSES_ENV, _from_env
    from align.distributed import launch_command as accelerate_command
    from align.errors import InputError

    machines = int(launch_options.get("num_machines") or _from_env("num_machines") or 1)
    processes = launch_options.get("num_processes")
    if machines > 1 and processes is not None and int(processes) % machines:
        # accelerate would start num_processes // num_machines per machine (0 when fewer processes than machines)
        raise InputError(
            f"--num-processes {processes} is not a multiple of --num-machines {machines}: --num-processes counts "
            f"the processes of ALL machines (e.g. {machines} machines x 8 GPUs: --num-processes {machines * 8})"
        )
    command = accelerate_command(
        accelerate_config, ["train", method_name, *rank_argv(accelerate_config, argv)], **launch_options
    )
    env = dict(os.environ)
    if launch_options.get("num_processes") is not None:
        env[EXPECTED_PROCESSES_ENV] = str(int(launch_options["num_processes"]))  # accelerate's count: all machines
    return command, env
