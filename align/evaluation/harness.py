"""The pass@N harness, `align eval`: sample n completions per problem, grade them, score them, summarize.

`run_eval(EvalConfig)`: problems (`align.data.loaders.load_problems_as_configured`) -> prompts
(`align.data.prompts.render_prompt`, exactly as in training) -> backend (`align.evaluation.backends`) -> `Grader`
-> samples.jsonl, one record per problem, flushed as soon as it is graded (`align.evaluation.runs`: resumable,
sharded over processes) -> optional PRM scores (`align.evaluation.scoring`) -> summary.json + passk.png
(`align.evaluation.report`). `regrade_samples` is `align eval --samples FILE`: the same from existing generations.
With `--exact-coverage` every problem is also (with `--n 0`, only) scored by exact coverage
(`align.evaluation.exact_coverage_run`): summary.json's `exact_coverage` block and exact_coverage.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.errors import InputFileNotFoundError
from align.evaluation.backends import resolve_backend_name
from align.evaluation.exact_coverage_run import exact_only_summary, run_exact_coverage
from align.evaluation.grouping import grade_records
from align.evaluation.records import (
    RUN_CONFIG_FILE,
    SAMPLES_FILE,
    SamplesFileError,
    normalize_record,
    read_jsonl,
    read_records,
    write_records_atomic,
)
from align.evaluation.report import summarize, write_report
from align.evaluation.runs import collect_samples
from align.evaluation.scoring import fill_missing_prompts, score_if_asked, scores_from_field
from align.grading import Grader


logger = logging.getLogger("align.eval")


def run_eval(config) -> dict | None:
    """The `align eval` pipeline (see the module docstring); returns the summary (None on ranks other than 0)."""
    from align.data.loaders import load_problems_as_configured

    if config.samples:
        return regrade_samples(config)
    output_dir = Path(config.output_dir)
    loaded = load_problems_as_configured(config)
    if not loaded.problems:
        raise ValueError(f"{loaded.source} has no valid problems to evaluate")
    if config.n == 0:  # --exact-coverage alone: nothing is sampled
        block = run_exact_coverage(config, loaded.problems, output_dir)
        return None if block is None else exact_only_summary(config, loaded, block)
    records = collect_samples(loaded.problems, config, config.n, output_dir)
    if records is None:
        return None
    prm = score_if_asked(config, records)
    if prm is not None:
        write_records_atomic(output_dir / SAMPLES_FILE, _with_extras(output_dir, records))
    summary = summarize(
        records,
        n=config.n,
        seed=config.seed,
        num_subsets=config.maj_num_subsets,
        meta={
            **config.identity(config.n, resolve_backend_name(config.backend)),
            "source": loaded.source,
            "skipped_rows": loaded.skipped,
            "prm": prm,
        },
    )
    if config.exact_coverage:
        summary["exact_coverage"] = run_exact_coverage(config, loaded.problems, output_dir)
    write_report(summary, output_dir, plot=config.plot)
    return summary


def _with_extras(output_dir: Path, records: list[dict]) -> list[dict]:
    """`records` plus the records in samples.jsonl that are not part of this run (kept, never dropped)."""
    ids = {record["id"] for record in records}
    return records + [r for r in read_records(output_dir / SAMPLES_FILE) if r["id"] not in ids]


def regrade_samples(config) -> dict:
    """`align eval --samples FILE`: re-grade (and with --prm re-score) existing generations; no model is loaded.

    With `--score-field NAME` the samples' scores are read from the file's field NAME instead of a PRM.
    """
    source = Path(config.samples)
    if not source.is_file():
        raise InputFileNotFoundError(f"--samples {source}: no such file")
    records = []
    for line, raw in read_jsonl(source):
        record = normalize_record(raw, str(source), line)
        if config.score_field is not None:
            scores_from_field(record, config.score_field, f"{source}: line {line}")
        records.append(record)
    if not records:
        raise SamplesFileError(f"{source} has no rows (--samples reads one JSON record per line)")
    output_dir = Path(config.output_dir) if config.output_dir else source.parent
    n = min(len(record["samples"]) for record in records)
    if any(len(record["samples"]) != n for record in records):
        logger.warning("records have different numbers of samples; pass@k and maj@k use k <= %d", n)
    with Grader(num_workers=config.grader_workers, timeout_s=config.grading_timeout) as grader:
        grade_records(records, grader, progress=config.progress)
    prm = None
    if config.prm:
        fill_missing_prompts(records, config)
        prm = score_if_asked(config, records)
    write_records_atomic(output_dir / SAMPLES_FILE, records)
    stored = source.parent / RUN_CONFIG_FILE
    meta = json.loads(stored.read_text()) if stored.exists() else {}
    summary = summarize(
        records,
        n=n,
        seed=config.seed,
        num_subsets=config.maj_num_subsets,
        meta={**meta, "source": str(source), "prm": prm, "score_field": config.score_field},
    )
    write_report(summary, output_dir, plot=config.plot)
    return summary
