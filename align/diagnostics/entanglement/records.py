"""`<output_dir>/entanglement.jsonl`: one JSON line per diagnosed pair, appended by rank 0 per diagnosed step."""

from __future__ import annotations

import json
import os


ENTANGLEMENT_FILE = "entanglement.jsonl"
# Fields every record has; `read_records` refuses a line without them.
REQUIRED_FIELDS = frozenset({"step", "delta_chosen", "delta_rejected", "regime"})


def append_records(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def read_records(path: str) -> list[dict]:
    """Records of an `entanglement.jsonl`; a malformed line is reported with its line number."""
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg}); was the file truncated?") from None
            missing = REQUIRED_FIELDS - set(record)
            if missing:
                raise ValueError(
                    f"{path}:{number}: missing fields {sorted(missing)}; is this an entanglement.jsonl written by "
                    "`align train margin` with entanglement_steps > 0?"
                )
            records.append(record)
    return records


def restart_records(path: str, global_step: int) -> None:
    """At train begin: a fresh run (step 0, or no file yet) empties the file; a run resumed at `global_step` keeps only
    the records of the steps up to it, since the later ones will be measured again."""
    if global_step == 0 or not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
        return
    kept = [record for record in read_records(path) if record["step"] <= global_step]
    with open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in kept)
