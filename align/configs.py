"""Script-level arguments shared by every `align train <method>` recipe.

A recipe YAML is parsed by TRL's `TrlParser` into three dataclasses: `DataArguments` (below), the method's trainer
config (e.g. `DCOConfig(SFTConfig)`), and `AlignModelConfig` (TRL's `ModelConfig` with align's default model).
Unknown keys are an error, so a typo in a recipe fails at parse time instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, TrlParser

from align.data.prompts import DEFAULT_INSTRUCTION
from align.errors import InputError, InputFileNotFoundError
from align.evaluation.callback_arguments import CoverageEvalArguments
from align.models import DEFAULT_MODEL
from align.precision import auto_mixed_precision


@dataclass
class DataArguments(CoverageEvalArguments):
    """Which problems to train on and how to turn them into the trainer's dataset format (and, with
    `coverage_eval_steps`, which held-out problems to evaluate on during training: `CoverageEvalArguments`)."""

    dataset_name: str = field(
        default="synthetic",
        metadata={
            "help": "`synthetic` (offline default), `math500`, `math`, `gsm8k`, a Hub dataset id, or a local "
            ".jsonl/.json/.parquet file. A file written by `align data ...` is used as is."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (subset) name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on during training (None: no eval dataset)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N eval rows."})
    synthetic_levels: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "Difficulty levels (1-5) of the synthetic task."}
    )
    synthetic_num_train: int = field(default=2000, metadata={"help": "Number of synthetic training problems."})
    synthetic_num_eval: int = field(default=100, metadata={"help": "Number of synthetic eval problems."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic generator."})
    completion_target: str = field(
        default="solution",
        metadata={
            "help": "What the model is trained to produce for problem rows: `solution` (step-by-step, ending in "
            "\\boxed{}) or `answer` (the direct answer `\\boxed{...}`, the DCO paper's setting)."
        },
    )
    prompt_instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction appended to every problem in the user turn."}
    )
    prompt_style: str = field(
        default="chat", metadata={"help": "`chat` (tokenizer chat template) or `plain` (for base models)."}
    )
    negatives_per_problem: int = field(
        default=1,
        metadata={
            "help": "For preference/outcome data built offline from problem rows: wrong solutions made per "
            "problem (one arithmetic slip each)."
        },
    )
    skip_invalid: bool = field(
        default=False, metadata={"help": "Skip (and count) invalid dataset rows instead of failing on the first one."}
    )


@dataclass
class AlignModelConfig(ModelConfig):
    """TRL's `ModelConfig` whose model defaults to align's embedded SmolLM2-135M-Instruct."""

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Model alias (`smollm2-135m-instruct`), local directory or Hub id."},
    )


class ConfigParser(TrlParser):
    """`TrlParser` for the commands that read a YAML config (`align train`, `align eval`, `align data`).

    On top of TRL's `--config FILE.yaml` (defaults from YAML, flags override them, unknown keys are an error):

    - `--config` is listed in `--help` (TRL takes it out of the arguments before argparse sees them);
    - every bad input is one `align.errors.InputError` line instead of argparse's usage text or a traceback: a
      missing or unparsable config file, a YAML value of the wrong type (`recipe.yaml: field 'max_steps' = 'four':
      expected an integer`), a bad flag, and the `ValueError`s the configs' `__post_init__` raise about values;
    - a scalar where a field takes a list is a list of one (`synthetic_levels: 1` is `[1]`);
    - `supplied` is the set of fields the config file or the command line set (`align eval --samples` warns about
      the ones it does not use).
    """

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        config = self.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=argparse.SUPPRESS,  # never reaches the namespace: TrlParser removes it from the arguments first
            help="YAML file of field values (e.g. a recipe or eval/math500.yaml); flags given with it override it.",
        )
        for actions in (self._actions, self._optionals._group_actions):  # listed first, after --help
            actions.remove(config)
            actions.insert(1, config)
        for action in self._actions:
            if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
                # HfArgumentParser copies the field's help ("Show progress bars.") onto its `--no_X` complement
                action.help = f"Turn --{action.dest} off."
                action.default = argparse.SUPPRESS  # the field's own flag holds the default; "(default: False)" misled
        self.config_path: str | None = None
        self.supplied: set[str] = set()
        self._refuse_unknown = True

    def parse_args_and_config(
        self, args=None, return_remaining_strings=False, fail_with_unknown_args=True, separate_remaining_strings=False
    ):
        import yaml

        args = _split_config_flag(list(args) if args is not None else sys.argv[1:])
        self.config_path = None
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise InputError("--config needs a file: --config FILE.yaml")
            self.config_path = args[index + 1]
            if not Path(self.config_path).is_file():
                raise InputFileNotFoundError(f"no such config file: {self.config_path}")
        self.supplied = self._flag_dests(args) - {"config"}
        # TrlParser refuses a config file's unknown keys in this case only; refused here, they are named in one line
        self._refuse_unknown = fail_with_unknown_args and not return_remaining_strings
        try:
            return super().parse_args_and_config(
                args, return_remaining_strings, fail_with_unknown_args, separate_remaining_strings
            )
        except InputError:
            raise
        except yaml.YAMLError as error:
            raise InputError(f"{self.config_path} is not valid YAML: {' '.join(str(error).split())}") from error
        except ValueError as error:  # TRL's checks of the config file, the configs' __post_init__ checks of values
            raise InputError(self.explain(str(error))) from error

    def explain(self, message: str) -> str:
        """The one-line message for a `ValueError` raised while the configs were built from the input."""
        return " ".join(message.split())

    def set_defaults_with_config(self, **config):
        actions = {}
        for action in self._actions:  # a field's own flag, not its `--no_X` complement
            if action.option_strings:
                actions.setdefault(action.dest, action)
        unknown = [key for key in config if key not in actions]
        if unknown and self._refuse_unknown:
            fields = ", ".join(repr(key) for key in unknown)
            raise InputError(
                f"{self.config_path}: unknown field{'s' * (len(unknown) > 1)} {fields} (a typo? `{self.prog} --help` "
                "lists the fields)"
            )
        for key, value in config.items():
            if key in actions:
                config[key] = self._checked_value(actions[key], key, value)
        self.supplied |= config.keys()
        return super().set_defaults_with_config(**config)

    def error(self, message: str):
        """argparse's errors (an invalid flag value, a missing required flag): the message, without the usage."""
        raise InputError(f"{message} (see {self.prog} --help)")

    def _flag_dests(self, args: list[str]) -> set[str]:
        flags = (arg.partition("=")[0] for arg in args if arg.startswith("--"))
        return {self._option_string_actions[flag].dest for flag in flags if flag in self._option_string_actions}

    def _checked_value(self, action: argparse.Action, key: str, value):
        """`value` as the field takes it, or an `InputError` naming the field, the value and the type expected.

        argparse converts a string default with the field's type only later, printing the whole usage when that
        fails, and never looks at other defaults: a YAML int for a list field would reach the config as it is.
        """
        if action.nargs not in ("+", "*"):
            return self._checked_scalar(action, key, value, value)
        if not isinstance(value, list | tuple):
            if value is None or _expected_type(action) is None:
                return value  # a string for a list of strings stays one: "all-linear" means something to PEFT
            value = [value]
        return [self._checked_scalar(action, key, item, value) for item in value]

    def _checked_scalar(self, action: argparse.Action, key: str, value, shown):
        expected = _expected_type(action)
        if expected is None or value is None or not isinstance(value, str | int | float | bool):
            return value
        try:
            if action.type in (int, float) and isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            converted = action.type(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            converted = None
        if converted is None or (action.choices is not None and converted not in action.choices):
            where = f"{self.config_path}: " if self.config_path else ""
            raise InputError(f"{where}field '{key}' = {shown!r}: expected {expected}")
        return converted


def _expected_type(action: argparse.Action) -> str | None:
    """How a message names what the field takes; None for fields whose values are not checked here (str, dict)."""
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    if getattr(action.type, "__name__", None) == "string_to_bool":  # HfArgumentParser's (TRL ships a copy of it)
        return "true or false"
    return None


def _split_config_flag(args: list[str]) -> list[str]:
    """`--config=FILE` as `--config FILE`, the only spelling TrlParser looks for."""
    split = []
    for arg in args:
        split += ["--config", arg.removeprefix("--config=")] if arg.startswith("--config=") else [arg]
    return split


class RecipeParser(ConfigParser):
    """`ConfigParser` of `align train` recipes: `bf16: auto`, `gradient_checkpointing`, and a default `output_dir`.

    `bf16: auto` (recipe) / `--bf16 auto` (command line) becomes True (bf16 mixed precision: autocast, float32
    master weights) where the hardware computes bf16 natively and False elsewhere (`align.precision`). It is
    resolved here, before the dataclasses are built, because TRL's configs type `bf16` as a boolean and transformers
    validates it in `__post_init__`.

    `gradient_checkpointing(_kwargs)`, the name TRL's docs and align's recipes use, is passed to transformers as
    `activation_checkpointing(_kwargs)`, its current name (where the configs have it), TRL's default (on) included:
    transformers printed a FutureWarning about the deprecated name on every run, since TRL's default sets it.

    With `method`, a recipe that names no `output_dir` writes to `runs/<model>/<method>` (the recipes' own layout)
    instead of transformers' `./trainer_output`; `default_output_dir` is then that directory, else None.
    """

    def __init__(self, dataclass_types, method: str | None = None, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.method = method
        self.default_output_dir: str | None = None
        dests = {action.dest for action in self._actions}
        self._renamed = {old: new for old, new in _RENAMED_FIELDS.items() if old in dests and new in dests}
        for old, new in self._renamed.items():
            if self.get_default(new) is None and self.get_default(old) is not None:
                self.set_defaults(**{new: self.get_default(old)})  # TRL's default (on) under the current name

    def parse_args_and_config(
        self, args=None, return_remaining_strings=False, fail_with_unknown_args=True, separate_remaining_strings=False
    ):
        args = _split_config_flag(list(args) if args is not None else sys.argv[1:])
        args = [_renamed_flag(arg, self._renamed) for arg in args]
        self._cli_use_cpu = _flag_value(args, "use_cpu")
        for index, arg in enumerate(args):
            if arg in ("--bf16=auto",) or (arg == "--bf16" and index + 1 < len(args) and args[index + 1] == "auto"):
                use_cpu = _truthy(self._cli_use_cpu) if self._cli_use_cpu is not None else False
                resolved = str(auto_mixed_precision(use_cpu=use_cpu)).lower()
                if arg == "--bf16":
                    args[index + 1] = resolved
                else:
                    args[index] = f"--bf16={resolved}"
        return super().parse_args_and_config(
            args, return_remaining_strings, fail_with_unknown_args, separate_remaining_strings
        )

    def set_defaults_with_config(self, **config):
        config = {self._renamed.get(key, key): value for key, value in config.items()}
        if config.get("bf16") == "auto":
            use_cpu = self._cli_use_cpu if getattr(self, "_cli_use_cpu", None) is not None else config.get("use_cpu")
            config["bf16"] = auto_mixed_precision(use_cpu=_truthy(use_cpu))
        return super().set_defaults_with_config(**config)

    def parse_args_into_dataclasses(self, args=None, *rest, **kwargs):
        # Runs after the config file's values became defaults, before the configs are built from them.
        self.default_output_dir = None
        if self.method is not None and "output_dir" not in self.supplied:
            model = _flag_value(list(args or []), "model_name_or_path") or self.get_default("model_name_or_path")
            self.default_output_dir = default_output_dir(model, self.method)
            self.set_defaults(output_dir=self.default_output_dir)
        return super().parse_args_into_dataclasses(args, *rest, **kwargs)

    def explain(self, message: str) -> str:
        if "bf16/gpu" in message:  # TRL configs default to bf16=True, which transformers refuses without a GPU
            return (
                "this machine has no GPU but the recipe trains in bf16 (TRL's default). Set `bf16: false` and "
                "`use_cpu: true` in the recipe, or pass `--bf16 false --use_cpu true` (`bf16: auto` picks what the "
                "machine computes natively); `--dry_run` checks a GPU recipe's configs on a CPU."
            )
        return super().explain(message)


def default_output_dir(model_name_or_path: str | None, method: str) -> str:
    """`runs/<model>/<method>`, the layout of the recipes: <model> is the alias, or the last part of the directory or
    Hub id (`runs/Meta-Llama-3-8B/dco` for `meta-llama/Meta-Llama-3-8B`)."""
    model = Path(str(model_name_or_path or DEFAULT_MODEL).rstrip("/")).name or DEFAULT_MODEL
    return str(Path("runs") / model / method)


# deprecated name -> transformers' current name
_RENAMED_FIELDS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _renamed_flag(arg: str, renamed: dict[str, str]) -> str:
    """`--gradient_checkpointing[=V]` as `--activation_checkpointing[=V]` (`--no_gradient_checkpointing`: `=false`)."""
    flag, sep, value = arg.partition("=")
    name = flag.removeprefix("--").replace("-", "_")
    if not flag.startswith("--"):
        return arg
    if name in renamed:
        return f"--{renamed[name]}{sep}{value}"
    if name.startswith("no_") and name.removeprefix("no_") in renamed and not sep:
        return f"--{renamed[name.removeprefix('no_')]}=false"
    return arg


def _flag_value(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` (dashes or underscores) in `args`, None when absent."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    value = None
    for index, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        if flag in spellings:
            value = inline if inline else (args[index + 1] if index + 1 < len(args) else "true")
    return value


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "y", "t"}
    return bool(value)
