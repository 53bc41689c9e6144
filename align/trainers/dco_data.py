"""DCO's inputs beyond SFT's: the `p_hat` column (estimated mode), per-token step ids (step mode), their collator.

`DCOTrainer` checks the `p_hat` column before TRL prepares the dataset, adds the step ids after (they index the
tokenized labels), and wraps TRL's collator so both reach `compute_loss` as tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl.trainer.utils import global_then_local_main_first

from align.steps import step_segment_ids


P_HAT_COLUMN = "p_hat"
STEP_IDS_COLUMN = "dco_step_ids"


def check_p_hat_column(dataset, dataset_name: str) -> None:
    """Fail early, naming the fix, when the dataset has no `p_hat` column or a value outside [0, 1]."""
    columns = dataset.column_names
    if columns is not None and P_HAT_COLUMN not in columns:
        raise ValueError(
            f"dco_mode='estimated' reads p̂ from a `{P_HAT_COLUMN}` column, but the {dataset_name} dataset has "
            f"columns {sorted(columns)}. Build one with `align data coverage --model M --dataset D --k 16 --output "
            "out/` and train on its output, or use dco_mode='sequence'."
        )
    if isinstance(dataset, Dataset):
        for row, value in enumerate(dataset[P_HAT_COLUMN]):
            if not _is_probability(value):
                raise ValueError(
                    f"The {dataset_name} dataset, row {row}: {P_HAT_COLUMN} = {value!r} is not a probability in "
                    "[0, 1]. Fix or drop the row (p_hat is the fraction of sampled answers graded correct)."
                )


def _is_probability(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def add_step_ids(dataset, tokenizer, pattern: str, num_proc: int | None, dataset_name: str):
    """`dataset` (tokenized by TRL: `labels` per row) with the column `dco_step_ids`: each token's step, -1 outside
    the loss, split by the regex `pattern` (see `align.steps.step_segment_ids`)."""
    map_kwargs = {"num_proc": num_proc, "desc": f"Splitting {dataset_name} completions into steps"}
    if not isinstance(dataset, Dataset):  # an IterableDataset maps lazily and takes neither option
        map_kwargs = {}
    regex = re.compile(pattern)
    with global_then_local_main_first():
        return dataset.map(
            lambda example: {STEP_IDS_COLUMN: step_segment_ids(example["labels"], tokenizer, regex)}, **map_kwargs
        )


@dataclass
class DataCollatorForCoverage:
    """Wraps TRL's collator and adds DCO's inputs: `p_hat` (B,) and the per-token step ids (B, L), -1 padded."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    with_p_hat: bool = False
    with_step_ids: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if self.with_p_hat:
            values = [example.get(P_HAT_COLUMN) for example in examples]
            for index, value in enumerate(values):
                if not _is_probability(value):
                    raise ValueError(
                        f"Batch example {index}: {P_HAT_COLUMN} = {value!r} is not a probability in [0, 1]; fix the "
                        "dataset's p_hat column."
                    )
            batch[P_HAT_COLUMN] = torch.tensor(values, dtype=torch.float32)
        if self.with_step_ids:
            width = batch["labels"].shape[1]
            step_ids = torch.full((len(examples), width), -1, dtype=torch.long)
            for index, example in enumerate(examples):
                row = example[STEP_IDS_COLUMN]
                if len(row) != len(example["input_ids"]):
                    raise ValueError(
                        f"Batch example {index}: {STEP_IDS_COLUMN} has {len(row)} entries for "
                        f"{len(example['input_ids'])} tokens; rebuild the dataset (the column must come from "
                        "DCOTrainer's dataset preparation)."
                    )
                step_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)  # TRL pads on the right
            batch[STEP_IDS_COLUMN] = step_ids
        return batch
