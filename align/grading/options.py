"""The grading pool's options, defined once: `GradingArguments` (a dataclass mixin) and the default worker count.

`align eval` / `align data` (`align.evaluation.config.SamplingRunArguments`) and the verifier reward of the online
trainers (`align.trainers.pass_n.GraderGRPOConfig`) both inherit `GradingArguments`, so their flags, help texts and
checks are the same. TRL's `TrlParser` (transformers' `HfArgumentParser`) reads inherited dataclass fields like
the class's own, so they are `--grader_workers` / `--grading_timeout` flags and YAML keys of both commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_grader_workers() -> int:
    """The CPUs this process may use, shared between the processes of this machine (one grading pool per process).

    The processes on this machine are the launcher's LOCAL_WORLD_SIZE (torchrun and accelerate set it), else its
    WORLD_SIZE, else 1.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))


@dataclass
class GradingArguments:
    """How answers are graded: the size of the pool of grading processes and the per-answer time budget.

    A mixin. List it before a base class whose first field is positional (`class C(GradingArguments, GRPOConfig)`):
    a dataclass collects the fields of its last base first, and `output_dir` must stay the first field of a
    TrainingArguments subclass.
    """

    grader_workers: int | None = field(
        default=None,
        metadata={
            "help": "Grading processes per process (default: the CPUs this process may use, divided by the "
            "processes on this machine)."
        },
    )
    grading_timeout: float = field(
        default=5.0,
        metadata={
            "help": "Seconds allowed to grade one answer; an answer that takes longer is not correct (verdict "
            "`timeout`, reward 0)."
        },
    )

    def __post_init__(self):
        if self.grader_workers is not None and self.grader_workers < 1:
            raise ValueError(f"grader_workers must be >= 1 (or null for automatic), got {self.grader_workers!r}.")
        if not (isinstance(self.grading_timeout, int | float) and self.grading_timeout > 0):
            raise ValueError(f"grading_timeout must be > 0 seconds, got {self.grading_timeout!r}.")
        # cooperative: the next class in the MRO (e.g. GRPOConfig) may have a __post_init__ of its own
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
