"""The `samples.jsonl` format: one JSON record per problem, appended and flushed as soon as the problem is graded.

```json
{"id": "test/algebra/1.json", "problem": "...", "answer": "5", "level": 2, "subject": "Algebra",
 "prompt": "<the rendered prompt text>",
 "samples": [{"completion": "...", "num_tokens": 212, "finish_reason": "stop",
              "extracted": "5", "verdict": "correct", "group": 0,
              "score": -0.42, "step_rewards": [0.1, -0.42]}],
 "num_correct": 1, "generation_s": 3.1, "grading_s": 0.02}
```

`group` numbers the distinct answers of the problem (equivalent answers share a number; None when there is no
answer); `score` / `step_rewards` appear when a PRM scored the samples. Records produced elsewhere can be graded with
`align eval --samples FILE`: they need `answer` and either `samples: [{"completion": ...}]` or `completions: [...]`
(strings), and may carry `id`, `problem`, `prompt`, `level`, `subject`, `num_tokens`, `finish_reason`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from align.errors import InputError


SAMPLES_FILE = "samples.jsonl"
RUN_CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "passk.png"


class SamplesFileError(InputError):
    """A samples.jsonl line is not a usable record; the message names the file, line and field."""


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every complete line. A torn last line (a run killed mid-write) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                break  # the write of this record was interrupted; it will be redone
            raise SamplesFileError(
                f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno})."
            ) from None
    return rows


def read_records(path: Path) -> list[dict]:
    return [record for _, record in read_jsonl(path)]


def drop_torn_tail(path: Path) -> None:
    """Truncate a torn last line so that appending starts on a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def append_record(handle, record: dict) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def write_json_atomic(path: Path, payload) -> None:
    _write_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_records_atomic(path: Path, records: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def normalize_record(record: dict, source: str, line: int) -> dict:
    """Check an externally produced record and bring it to the harness format (see the module docstring)."""

    def bad(field: str, reason: str):
        return SamplesFileError(f"{source}: line {line}, field '{field}': {reason}.")

    if not isinstance(record, dict):
        raise bad("<record>", f"expected a JSON object, got {type(record).__name__}")
    answer = record.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise bad("answer", f"the gold answer is required as a non-empty string, got {answer!r:.60}")
    if "samples" in record:
        samples = record["samples"]
        if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
            raise bad("samples", "expected a list of objects with a 'completion'")
    elif "completions" in record:
        completions = record["completions"]
        if not isinstance(completions, list):
            raise bad("completions", "expected a list of strings")
        samples = [{"completion": text} for text in completions]
    else:
        raise bad("samples", "a record needs 'samples' (objects with 'completion') or 'completions' (strings)")
    if not samples:
        raise bad("samples", "no samples")
    normalized_samples = []
    for index, sample in enumerate(samples):
        text = sample.get("completion")
        if not isinstance(text, str):
            raise bad(f"samples[{index}].completion", f"expected a string, got {type(text).__name__}")
        normalized_samples.append(
            {
                **sample,
                "num_tokens": sample.get("num_tokens"),
                "finish_reason": sample.get("finish_reason"),
            }
        )
    return {
        **record,
        "id": str(record.get("id", f"line-{line}")),
        "answer": answer,
        "level": record.get("level", 0) or 0,
        "subject": record.get("subject", "") or "",
        "samples": normalized_samples,
    }
