"""The one problem schema every loader returns, and the error raised for rows that do not fit it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from align.errors import InputError


PROBLEM_FIELDS = ("id", "problem", "solution", "answer", "level", "subject")


@dataclass(frozen=True)
class Problem:
    """A math problem in align's normalized schema.

    `answer` is the gold final answer as LaTeX (what math-verify parses as the gold); `solution` is a worked
    solution whose steps are separated by blank lines, ending in `\\boxed{answer}` when one is available.
    `level` is an int 1-5 where the source has levels, else 0.
    """

    id: str
    problem: str
    solution: str
    answer: str
    level: int = 0
    subject: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class InvalidRowError(InputError):
    """A dataset row is missing a field or has the wrong type; the message names the row, field and value."""

    def __init__(self, source: str, row_index: int, field: str, value, reason: str, hint: str | None = None):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = f"{source}: row {row_index}, field '{field}' = {shown}: {reason}."
        message += (
            f" {hint}" if hint else " Fix the row, map the right column, or pass --skip-invalid to skip and count it."
        )
        message += " (Rows are counted from 0: row 0 is the first.)"
        super().__init__(message)
        self.source, self.row_index, self.field, self.value = source, row_index, field, value
