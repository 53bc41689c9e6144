"""Load problems from any source into align's schema (`align.data.schema.Problem`).

Sources: `synthetic` (offline generator), local `.jsonl`/`.json`/`.parquet` files (with an optional column
mapping). Every row is validated; a bad row raises `InvalidRowError` naming the row, field and value, or, with
`skip_invalid=True`, is skipped and counted in `LoadedProblems.skipped`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.data import synthetic
from align.data.schema import InvalidRowError, Problem


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class LoadedProblems:
    problems: list[Problem]
    source: str
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)


def is_local_file(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES) and Path(name).expanduser().exists()


def read_local_rows(path: str) -> list[dict]:
    """Rows of a local jsonl/json/parquet file, read with `datasets` (no Hub access)."""
    from datasets import load_dataset

    suffix = Path(path).suffix
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}[suffix]
    return list(load_dataset(builder, data_files=str(Path(path).expanduser()), split="train"))


def problem_from_row(row: dict, index: int, source: str, column_mapping: dict[str, str] | None = None) -> Problem:
    """Validate one row and build a `Problem`; raises `InvalidRowError` on a missing/empty/mistyped field."""
    mapping = {
        "id": "id",
        "problem": "problem",
        "solution": "solution",
        "answer": "answer",
        "level": "level",
        "subject": "subject",
    }
    mapping.update(column_mapping or {})
    values = {}
    for name in ("problem", "answer"):
        column = mapping[name]
        if column not in row:
            raise InvalidRowError(
                source,
                index,
                column,
                None,
                "missing required field",
                f"Columns present: {sorted(row)}. Map one with a column mapping ({name}=COLUMN).",
            )
        value = row[column]
        if isinstance(value, int | float) and not isinstance(value, bool) and name == "answer":
            value = str(value)
        if not isinstance(value, str):
            raise InvalidRowError(source, index, column, value, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise InvalidRowError(source, index, column, value, "is empty")
        values[name] = value
    solution = row.get(mapping["solution"]) or ""
    if not isinstance(solution, str):
        raise InvalidRowError(source, index, mapping["solution"], solution, "expected a string")
    level = _parse_level(row.get(mapping["level"]), index, source, mapping["level"])
    subject = row.get(mapping["subject"]) or ""
    problem_id = row.get(mapping["id"])
    return Problem(
        id=str(problem_id) if problem_id not in (None, "") else f"{Path(source).stem}-{index}",
        problem=values["problem"],
        solution=solution,
        answer=values["answer"],
        level=level,
        subject=str(subject),
    )


def _parse_level(value, index: int, source: str, column: str) -> int:
    """MATH stores levels as ints (MATH-500) or as 'Level 3' strings (hendrycks); '?' and missing mean 0."""
    if value is None or value == "" or value == "Level ?":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        digits = value.removeprefix("Level").strip()
        if digits.isdigit():
            return int(digits)
    raise InvalidRowError(source, index, column, value, "expected an int or 'Level N'")


def problems_from_rows(rows, source: str, skip_invalid=False, column_mapping=None, limit=None) -> LoadedProblems:
    loaded = LoadedProblems(problems=[], source=source)
    for index, row in enumerate(rows):
        if limit is not None and len(loaded.problems) >= limit:
            break
        try:
            loaded.problems.append(problem_from_row(row, index, source, column_mapping))
        except InvalidRowError as error:
            if not skip_invalid:
                raise
            loaded.skipped += 1
            loaded.skipped_reasons.append(str(error))
    return loaded


def load_problems(
    name: str,
    split: str = "test",
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    column_mapping: dict[str, str] | None = None,
    synthetic_levels=(1,),
    synthetic_seed: int = 0,
) -> LoadedProblems:
    """Load `split` of dataset `name` (see the module docstring) as validated problems."""
    if name == "synthetic":
        if limit is None:
            raise ValueError("The synthetic task is unbounded: pass a limit (number of problems).")
        problems = synthetic.generate_problems(limit, split, synthetic_levels, synthetic_seed)
        return LoadedProblems(problems=problems, source=f"synthetic[{split}]")
    if is_local_file(name):
        return problems_from_rows(read_local_rows(name), name, skip_invalid, column_mapping, limit)
    raise ValueError(
        f"Unknown dataset {name!r}: use 'synthetic' or a local .jsonl/.json/.parquet file path "
        f"(check that the file exists)."
    )
