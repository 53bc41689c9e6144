"""Load problems from any source into align's schema (`align.data.schema.Problem`).

Sources:

| name        | where                                                                 | answer                       |
| ----------- | --------------------------------------------------------------------- | ---------------------------- |
| `synthetic` | the offline generator (`align.data.synthetic`)                        | generated                    |
| `math500`   | Hub `HuggingFaceH4/MATH-500` (split `test`)                           | the `answer` column          |
| `math`      | Hub `DigitalLearningGmbH/MATH-lighteval`, `EleutherAI/hendrycks_math` | last `\\boxed{}` of solution |
| `gsm8k`     | Hub `openai/gsm8k` (config `main`)                                    | the text after `####`        |
| a file      | local `.jsonl` / `.json` / `.parquet`                                 | see row formats below        |
| any Hub id  | `datasets.load_dataset(id, config)`                                   | see row formats below        |

Rows of files and other Hub datasets are read in the `auto` row format: columns `problem`, `answer` and optionally
`solution`, `level`, `subject`, `id` (rename with a column mapping, e.g. `{"problem": "question"}`); a row without an
answer column takes the last `\\boxed{}` of its solution (the MATH convention), and GSM8K-shaped rows (`question`,
`answer` with a `####` line) are recognized. Every row is validated; a bad row raises `InvalidRowError` naming the
row, field and value, or, with `skip_invalid=True`, is skipped and counted in `LoadedProblems.skipped`.
Without Hub access the Hub sources fail with `DatasetUnavailableError`, which says how to pass a local file instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from align.data import synthetic
from align.data.answers import last_boxed, split_gsm8k_answer
from align.data.files import read_local_rows
from align.data.schema import InvalidRowError, Problem
from align.errors import InputError, InputFileNotFoundError


logger = logging.getLogger("align.data")

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
ROW_FORMATS = ("auto", "plain", "math", "gsm8k")
HENDRYCKS_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


@dataclass(frozen=True)
class HubSource:
    """Where a named dataset lives on the Hub: candidates are tried in order, their configs concatenated."""

    candidates: tuple[tuple[str, tuple[str | None, ...]], ...]  # (hub id, configs to concatenate)
    row_format: str
    column_mapping: dict[str, str] = field(default_factory=dict)


HUB_SOURCES = {
    "math500": HubSource((("HuggingFaceH4/MATH-500", (None,)),), "plain", {"id": "unique_id"}),
    "math": HubSource(
        (("DigitalLearningGmbH/MATH-lighteval", ("default",)), ("EleutherAI/hendrycks_math", HENDRYCKS_SUBJECTS)),
        "math",
        {"subject": "type"},
    ),
    "gsm8k": HubSource((("openai/gsm8k", ("main",)),), "gsm8k"),
}


class DatasetUnavailableError(InputError, RuntimeError):
    """A Hub dataset could not be loaded (no network, offline mode, unknown id); the message says what to do."""


def parse_column_mapping(text: str | dict | None) -> dict[str, str]:
    """`"problem=question,answer=final"` (or a dict) -> `{"problem": "question", "answer": "final"}`."""
    if not text:
        return {}
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for item in text.split(","):
            name, sep, column = item.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise InputError(f"column mapping item {item!r} is not FIELD=COLUMN (e.g. problem=question)")
            pairs.append((name.strip(), column.strip()))
    mapping = {}
    for name, column in pairs:
        if name not in _SCHEMA_FIELDS:
            raise InputError(f"column mapping names unknown field {name!r}; fields are {', '.join(_SCHEMA_FIELDS)}")
        mapping[name] = column
    return mapping


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


_SCHEMA_FIELDS = ("id", "problem", "solution", "answer", "level", "subject")


def _math_row(row: dict, index: int, source: str, mapping: dict[str, str]) -> dict:
    """MATH rows carry no answer column: the answer is the last `\\boxed{}` of the solution."""
    if mapping["answer"] in row:
        return row
    solution = row.get(mapping["solution"])
    if not isinstance(solution, str):
        raise InvalidRowError(
            source, index, mapping["solution"], solution, "no answer column and no solution to take one from"
        )
    answer = last_boxed(solution)
    if answer is None or not answer.strip():
        raise InvalidRowError(source, index, mapping["solution"], solution, "has no \\boxed{} answer")
    return {**row, mapping["answer"]: answer}


def _gsm8k_row(row: dict, index: int, source: str, mapping: dict[str, str]) -> dict:
    """GSM8K rows: `question`, and `answer` = worked solution + `#### final answer`."""
    text = row.get("answer")
    split = split_gsm8k_answer(text) if isinstance(text, str) else None
    if split is None:
        raise InvalidRowError(source, index, "answer", text, "expected a GSM8K answer ending in '#### <answer>'")
    work, final = split
    adapted = {key: value for key, value in row.items() if key not in ("question", "answer")}
    adapted[mapping["problem"]] = row.get("question", row.get(mapping["problem"]))
    adapted[mapping["solution"]] = f"{work}\n\nThe answer is $\\boxed{{{final}}}$." if work else ""
    adapted[mapping["answer"]] = final
    return adapted


def _detect_row_format(row: dict, mapping: dict[str, str]) -> str:
    if mapping["answer"] in row:
        answer = row[mapping["answer"]]
        if mapping["problem"] not in row and "question" in row and isinstance(answer, str) and "####" in answer:
            return "gsm8k"
        return "plain"
    return "math" if mapping["solution"] in row else "plain"


_ROW_ADAPTERS: dict[str, Callable[[dict, int, str, dict], dict]] = {"math": _math_row, "gsm8k": _gsm8k_row}


def problem_from_row(
    row: dict, index: int, source: str, column_mapping: dict[str, str] | None = None, row_format: str = "plain"
) -> Problem:
    """Validate one row and build a `Problem`; raises `InvalidRowError` on a missing/empty/mistyped field.

    `row_format` (see the module docstring) says how to find the answer: `plain` reads the answer column, `math`
    takes the last `\\boxed{}` of the solution when there is no answer column, `gsm8k` splits GSM8K's `####`
    answers, `auto` picks one of these per row from its columns.
    """
    if not isinstance(row, dict):
        raise InvalidRowError(source, index, "<row>", row, f"expected a JSON object, got {type(row).__name__}")
    mapping = {name: name for name in _SCHEMA_FIELDS}
    mapping.update(column_mapping or {})
    if row_format == "auto":
        row_format = _detect_row_format(row, mapping)
    if row_format in _ROW_ADAPTERS:
        row = _ROW_ADAPTERS[row_format](row, index, source, mapping)
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


def problems_from_rows(
    rows: Iterable[dict],
    source: str,
    skip_invalid=False,
    column_mapping=None,
    limit=None,
    row_format: str = "auto",
    id_prefix: str | None = None,
) -> LoadedProblems:
    """Validate rows into problems (first `limit` valid ones); bad rows raise, or are skipped and counted.

    `id_prefix` names problems of sources without an id column `{id_prefix}-{row index}` (default: file stem).
    """
    if row_format not in ROW_FORMATS:
        raise InputError(f"row_format must be one of {ROW_FORMATS}, got {row_format!r}")
    loaded = LoadedProblems(problems=[], source=source)
    id_column = (column_mapping or {}).get("id", "id")
    for index, row in enumerate(rows):
        if limit is not None and len(loaded.problems) >= limit:
            break
        if id_prefix is not None and isinstance(row, dict) and row.get(id_column) in (None, ""):
            # MATH-500 names its ids `unique_id`; other sources get one from their name and the row index.
            row = {**row, id_column: row.get("unique_id") or f"{id_prefix}-{index}"}
        try:
            loaded.problems.append(problem_from_row(row, index, source, column_mapping, row_format))
        except InvalidRowError as error:
            if not skip_invalid:
                raise
            loaded.skipped += 1
            loaded.skipped_reasons.append(str(error))
    return loaded


def _hub_rows(hub_id: str, configs: tuple[str | None, ...], split: str) -> list[dict]:
    from datasets import load_dataset

    rows = []
    for config in configs:
        rows.extend(load_dataset(hub_id, config, split=split))
    return rows


def read_hub_rows(candidates, split: str) -> tuple[str, list[dict]]:
    """Rows of the first loadable (hub id, configs) candidate, as (source name, rows)."""
    errors = []
    for hub_id, configs in candidates:
        try:
            return f"{hub_id}[{split}]", _hub_rows(hub_id, configs, split)
        except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
            errors.append(f"{hub_id}: {type(error).__name__}: {error}")
    names = " or ".join(hub_id for hub_id, _ in candidates)
    raise DatasetUnavailableError(
        f"Could not load {names} (split {split!r}) from the Hugging Face Hub:\n  "
        + "\n  ".join(errors)
        + "\nWithout Hub access (HF_HUB_OFFLINE=1 or no network), pass a local copy instead, e.g. "
        "--dataset path/to/math500.jsonl: a .jsonl/.json/.parquet file with columns problem and answer (or a "
        "solution ending in \\boxed{}), optionally solution, level, subject, id."
    )


@dataclass(frozen=True)
class SourceRows:
    """The rows of a file or Hub dataset, and what reading problems from them needs to know about the source."""

    source: str  # the name messages and `LoadedProblems.source` give it
    rows: list[dict]
    id_prefix: str  # rows without an id become problems `{id_prefix}-{row index}`
    row_format: str | None = None  # fixed by a named source (math500, math, gsm8k); None: the caller's choice
    column_mapping: dict[str, str] = field(default_factory=dict)  # a named source's columns


def is_problem_source(name: str) -> bool:
    """`synthetic` and the named Hub sources hold problems by definition; files and other Hub datasets may instead
    hold rows already in a trainer's format (e.g. written by `align data pairs`)."""
    return name == "synthetic" or name in HUB_SOURCES


def read_source(name: str, split: str = "test", dataset_config: str | None = None) -> SourceRows:
    """The rows of `split` of a local file, a named Hub source or a Hub dataset id (any source but `synthetic`)."""
    if is_local_file(name):
        return SourceRows(name, read_local_rows(name), Path(name).stem)
    if name.endswith(LOCAL_SUFFIXES):
        raise InputFileNotFoundError(f"Dataset file {name!r} does not exist (check the path).")
    if name in HUB_SOURCES:
        hub = HUB_SOURCES[name]
        candidates = hub.candidates
        if dataset_config is not None:
            candidates = tuple((hub_id, (dataset_config,)) for hub_id, _ in candidates)
        source, rows = read_hub_rows(candidates, split)
        return SourceRows(source, rows, f"{name}-{split}", hub.row_format, hub.column_mapping)
    if "/" in name:
        source, rows = read_hub_rows(((name, (dataset_config,)),), split)
        return SourceRows(source, rows, f"{name.rsplit('/', 1)[-1]}-{split}")
    raise InputError(
        f"Unknown dataset {name!r}: use 'synthetic', {', '.join(repr(n) for n in HUB_SOURCES)}, a Hub dataset id "
        "(owner/name) or a local .jsonl/.json/.parquet file path."
    )


def load_problems(
    name: str,
    split: str = "test",
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    column_mapping: dict[str, str] | str | None = None,
    synthetic_levels=(1,),
    synthetic_seed: int = 0,
    dataset_config: str | None = None,
    row_format: str = "auto",
) -> LoadedProblems:
    """Load `split` of dataset `name` (see the module docstring) as validated problems.

    `dataset_config` selects a Hub config (e.g. one hendrycks subject); `column_mapping` maps schema fields to the
    source's columns (a dict or `"problem=question,answer=final"`).
    """
    column_mapping = parse_column_mapping(column_mapping)
    if name == "synthetic":
        if limit is None:
            raise InputError("The synthetic task is unbounded: pass a limit (number of problems), e.g. --limit 100.")
        problems = synthetic.generate_problems(limit, split, synthetic_levels, synthetic_seed)
        return LoadedProblems(problems=problems, source=f"synthetic[{split}]")
    read = read_source(name, split, dataset_config)
    return problems_from_rows(
        read.rows,
        read.source,
        skip_invalid,
        {**read.column_mapping, **column_mapping},
        limit,
        read.row_format or row_format,
        read.id_prefix,
    )


def load_problems_as_configured(
    options, *, name: str | None = None, split: str | None = None, limit: int | None = None
) -> LoadedProblems:
    """`load_problems` with every source option read from a config object, warning once about skipped rows.

    `options` is any config with load_problems' option fields (`EvalConfig`, `DataBuildArguments`, the training
    `DataArguments`); fields it lacks take load_problems' defaults. `name`, `split` and `limit` override the
    config's `dataset`/`split`/`limit` (training names its dataset `dataset_name` and has one split per call).
    """
    loaded = load_problems(
        name if name is not None else options.dataset,
        split if split is not None else options.split,
        limit=limit if limit is not None else getattr(options, "limit", None),
        skip_invalid=getattr(options, "skip_invalid", False),
        column_mapping=getattr(options, "column_mapping", None),
        synthetic_levels=tuple(getattr(options, "synthetic_levels", (1,))),
        synthetic_seed=getattr(options, "synthetic_seed", 0),
        dataset_config=getattr(options, "dataset_config", None),
        row_format=getattr(options, "row_format", "auto"),
    )
    if loaded.skipped:
        logger.warning(
            "skipped %d invalid rows of %s (first: %s)", loaded.skipped, loaded.source, loaded.skipped_reasons[0]
        )
    if not loaded.problems:
        if loaded.skipped:
            raise InputError(
                f"{loaded.source} has no valid rows: all {loaded.skipped} were skipped as invalid (first: "
                f"{loaded.skipped_reasons[0]})"
            )
        raise InputError(f"{loaded.source} has no rows")
    return loaded
