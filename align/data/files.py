"""Rows of local dataset files (`.jsonl`, `.json`, `.parquet`), read without Hub access.

Bad files are one-line `align.errors.InputError`s: a malformed JSON line is named with its line number (counted
from 1) and the JSON error, a file without rows says so.
"""

from __future__ import annotations

from pathlib import Path

from align.errors import InputError


def read_local_rows(path: str) -> list[dict]:
    """Rows of a local jsonl/json/parquet file (no Hub access); an `InputError` for a file with no rows.

    JSON is read line by line (`.jsonl`, or a `.json` file that is not one JSON document), so that a malformed line
    is named with its line number and the JSON error; a `.json` document is a list of rows. Parquet is read with
    `datasets`. Unlike `datasets`' JSON reader, no column type is imposed across rows (a row whose value has
    another type is reported by the validation that reads it, with its row index, instead of an Arrow cast error);
    like it, every row has every column of the file (None where it has no value).
    """
    file = Path(path).expanduser()
    if file.suffix == ".parquet":
        rows = _read_parquet_rows(file)
    else:
        text = file.read_text(encoding="utf-8")
        rows = _json_document_rows(file, text) if file.suffix == ".json" else None
        if rows is None:
            rows = _json_lines_rows(file, text)
    if not rows:
        raise InputError(f"{path} has no rows")
    return rows if file.suffix == ".parquet" else _with_every_column(rows)


def _with_every_column(rows: list) -> list:
    """Every object row with every column of the file (None where a row has no value), as a table reader gives
    them: consumers such as `datasets.Dataset.from_list` take the columns from the first row."""
    columns = list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
    return [{column: row.get(column) for column in columns} if isinstance(row, dict) else row for row in rows]


def _json_document_rows(file: Path, text: str) -> list | None:
    """The rows of a `.json` file holding one JSON document (a list of rows), None when it is JSON lines."""
    import json

    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON lines, or a malformed document: read line by line to name the line
    if isinstance(document, dict) and len(text.strip().splitlines()) == 1:
        return [document]  # one row on one line
    if not isinstance(document, list):
        raise InputError(
            f"{file}: expected a JSON list of rows (or one JSON object per line), got a {type(document).__name__}"
        )
    return document


def _json_lines_rows(file: Path, text: str) -> list:
    import json

    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(
                f"{file}: line {number} is not valid JSON ({error.msg} at column {error.colno}); every line must "
                "be one JSON object"
            ) from None
    return rows


def _read_parquet_rows(file: Path) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset("parquet", data_files=str(file), split="train"))
    except Exception as error:  # pyarrow and datasets raise many types for a damaged or foreign file
        raise InputError(f"{file} is not a readable parquet file ({type(error).__name__}: {error})") from error
