"""Script-level arguments shared by every `align train <method>` recipe.

A recipe YAML is parsed by TRL's `TrlParser` into three dataclasses: `DataArguments` (below), the method's trainer
config (e.g. `DCOConfig(SFTConfig)`), and `AlignModelConfig` (TRL's `ModelConfig` with align's default model).
Unknown keys are an error, so a typo in a recipe fails at parse time instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from align.data.prompts import DEFAULT_INSTRUCTION
from align.models import DEFAULT_MODEL
from align.precision import auto_mixed_precision


@dataclass
class DataArguments:
    """Which problems to train on and how to turn them into the trainer's dataset format."""

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


class RecipeParser(TrlParser):
    """`TrlParser` that also accepts `bf16: auto` (recipe) / `--bf16 auto` (command line).

    `auto` becomes True (bf16 mixed precision: autocast, float32 master weights) where the hardware computes bf16
    natively and False elsewhere (`align.precision`). It is resolved here, before the dataclasses are built, because
    TRL's configs type `bf16` as a boolean and transformers validates it in `__post_init__`.
    """

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        import sys

        args = list(args) if args is not None else sys.argv[1:]
        self._cli_use_cpu = _flag_value(args, "use_cpu")
        for index, arg in enumerate(args):
            if arg in ("--bf16=auto",) or (arg == "--bf16" and index + 1 < len(args) and args[index + 1] == "auto"):
                use_cpu = _truthy(self._cli_use_cpu) if self._cli_use_cpu is not None else False
                resolved = str(auto_mixed_precision(use_cpu=use_cpu)).lower()
                if arg == "--bf16":
                    args[index + 1] = resolved
                else:
                    args[index] = f"--bf16={resolved}"
        return super().parse_args_and_config(args, *rest, **kwargs)

    def set_defaults_with_config(self, **config):
        if config.get("bf16") == "auto":
            use_cpu = self._cli_use_cpu if getattr(self, "_cli_use_cpu", None) is not None else config.get("use_cpu")
            config["bf16"] = auto_mixed_precision(use_cpu=_truthy(use_cpu))
        return super().set_defaults_with_config(**config)


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
