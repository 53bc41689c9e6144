"""Script-level arguments shared by every `align train <method>` recipe.

A recipe YAML is parsed by TRL's `TrlParser` into three dataclasses: `DataArguments` (below), the method's trainer
config (e.g. `DCOConfig(SFTConfig)`), and `AlignModelConfig` (TRL's `ModelConfig` with align's default model).
Unknown keys are an error, so a typo in a recipe fails at parse time instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig

from align.data.prompts import DEFAULT_INSTRUCTION
from align.models import DEFAULT_MODEL


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
