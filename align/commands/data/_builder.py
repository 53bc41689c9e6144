"""What `align data coverage|pairs|outcome` share: options, sampling through the harness, writing the outputs.

Every builder samples k completions per problem with `align.evaluation.runs.collect_samples` into
`OUT/samples.jsonl` (the harness format, so a killed run resumes where it stopped), turns the graded records into
training rows (`align.data.sampled`), and writes `OUT/<rows file>` and `OUT/summary.json` (counts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from align.evaluation.config import SamplingRunArguments


@dataclass
class DataBuildArguments(SamplingRunArguments):
    """Options of every `align data` builder: what to sample from, k samples per problem, and where to write."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "`synthetic`, `math`, `gsm8k`, `math500`, a Hub dataset id, or a local .jsonl/.json/.parquet file."
        },
    )
    split: str = field(default="train", metadata={"help": "Dataset split to sample on (training data: train)."})
    k: int = field(default=8, metadata={"help": "Samples per problem."})
    output: str | None = field(
        default=None, metadata={"help": "Output directory: samples.jsonl, summary.json and the rows file."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.output:
            raise ValueError("output is required: --output DIR (samples.jsonl, summary.json and the rows go there)")


RowMaker = Callable[[list[dict], list, DataBuildArguments, object], tuple[dict[str, list[dict]], dict]]


def run_builder(name: str, argv: list[str], options_class, make_rows: RowMaker, description: str) -> int:
    """Parse `argv`, sample and grade (resumable, sharded), write the rows `make_rows` returns and the summary."""
    from align.configs import ConfigParser
    from align.data.loaders import load_problems_as_configured
    from align.evaluation.backends import resolve_backend_name
    from align.evaluation.records import SUMMARY_FILE, write_json_atomic, write_records_atomic
    from align.evaluation.runs import collect_samples
    from align.models import check_model_name

    # Bad input (options, the model, the dataset, a directory holding another configuration's samples) raises
    # align.errors.InputError, which align.cli reports in one line.
    parser = ConfigParser((DataBuildArguments, options_class), prog=f"align data {name}", description=description)
    args, options = parser.parse_args_and_config(argv)
    check_model_name(args.model)  # before the output directory is written to
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    loaded = load_problems_as_configured(args)
    records = collect_samples(loaded.problems, args, args.k, output)
    if records is None:  # not rank 0: rank 0 writes the outputs
        return 0
    files, counts = make_rows(records, loaded.problems, args, options)
    for filename, rows in files.items():
        write_records_atomic(output / filename, rows)
    summary = {
        "builder": name,
        **args.identity(args.k, resolve_backend_name(args.backend)),
        "source": loaded.source,
        "skipped_rows": loaded.skipped,
        "num_problems": len(records),
        "num_samples": sum(len(record["samples"]) for record in records),
        "num_correct": sum(record["num_correct"] for record in records),
        "counts": counts,
        "files": {filename: len(rows) for filename, rows in files.items()},
    }
    write_json_atomic(output / SUMMARY_FILE, summary)
    written = ", ".join(f"{output / filename} ({len(rows)} rows)" for filename, rows in files.items())
    print(f"wrote {written}\ncounts: {json.dumps(counts)}")
    return 0
