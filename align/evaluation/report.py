"""summary.json and passk.png from graded records (see `align.evaluation.records` for the record format).

The summary is a pure function of the records and the run's metadata: timings come from the per-record
`generation_s` / `grading_s` stored in samples.jsonl, so re-summarizing a finished run (a resumed run with nothing
left to do, or `align eval --samples`) reproduces it exactly.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections import Counter, defaultdict
from pathlib import Path

from align.evaluation.bootstrap import DEFAULT_RESAMPLES, percentile_interval
from align.evaluation.estimators import (
    bon_at_k,
    ks_up_to,
    maj_at_k,
    pass_all_at_k,
    pass_at_k,
    weighted_maj_at_k,
)
from align.evaluation.plots import curve_errors, plot_curves
from align.evaluation.records import PLOT_FILE, SUMMARY_FILE, write_json_atomic


# The metric families, in report order: each is reported as `FAMILY@K` for every k (summary.json, console, plot,
# `align.evaluation.paired`). `pass_all` is pass^k (all k samples correct; `^` is kept out of JSON keys and flags).
METRIC_FAMILIES = ("pass", "pass_all", "maj", "bon", "weighted_maj")
SCORED_FAMILIES = ("bon", "weighted_maj")  # need a per-sample `score` (--prm or --score-field)
_VERSIONED = ("align", "torch", "transformers", "trl", "accelerate", "datasets", "math-verify", "vllm")


def problem_metrics(record: dict, n: int, ks: list[int], seed: int, num_subsets: int, scored: bool) -> dict:
    """pass@k, pass_all@k (pass^k) and maj@k (and with scores bon@k, weighted_maj@k) of one problem, from its first n
    samples; `seed` and `num_subsets` are weighted maj@k's (the only estimate that samples subsets)."""
    samples = record["samples"][:n]
    correct = [sample["verdict"] == "correct" for sample in samples]
    groups = [sample.get("group") for sample in samples]
    metrics = {}
    for k in ks:
        metrics[f"pass@{k}"] = pass_at_k(n, sum(correct), k)
        metrics[f"pass_all@{k}"] = pass_all_at_k(n, sum(correct), k)
        metrics[f"maj@{k}"] = maj_at_k(groups, correct, k)
        if scored:
            scores = [sample["score"] for sample in samples]
            metrics[f"bon@{k}"] = bon_at_k(scores, correct, k)
            metrics[f"weighted_maj@{k}"] = weighted_maj_at_k(groups, scores, correct, k, seed, num_subsets)
    return metrics


def _mean(rows: list[dict]) -> dict:
    return {key: round(sum(row[key] for row in rows) / len(rows), 6) for key in rows[0]} if rows else {}


def _stderr(rows: list[dict]) -> dict:
    """Standard error of the mean over problems (sample standard deviation / sqrt(problems))."""
    if len(rows) < 2:
        return {key: 0.0 for key in (rows[0] if rows else {})}
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        mean = sum(values) / len(values)
        variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
        out[key] = round(math.sqrt(variance / len(values)), 6)
    return out


def _ci95(rows: list[dict], seed: int) -> dict:
    """Percentile-bootstrap 95 % interval of each metric's mean over problems: `{metric: [low, high]}`."""
    keys = list(rows[0])
    low, high = percentile_interval([[row[key] for key in keys] for row in rows], seed=seed)
    return {key: [round(float(lo), 6), round(float(hi), 6)] for key, lo, hi in zip(keys, low, high)}


def _breakdown(records: list[dict], per_problem: list[dict], field: str) -> dict:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for record, metrics in zip(records, per_problem):
        buckets[str(record.get(field, ""))].append(metrics)
    return {key: {"num_problems": len(rows), **_mean(rows)} for key, rows in sorted(buckets.items())}


def package_versions() -> dict:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def summarize(
    records: list[dict], *, n: int, seed: int = 0, num_subsets: int = 1000, meta: dict | None = None
) -> dict:
    """The summary dict: metrics over problems, per level and subject, sample statistics, timing, versions."""
    if not records:
        raise ValueError("no records to summarize")
    too_few = [record["id"] for record in records if len(record["samples"]) < n]
    if too_few:
        raise ValueError(f"{len(too_few)} records have fewer than n={n} samples (first: {too_few[0]!r})")
    ks = ks_up_to(n)
    samples = [sample for record in records for sample in record["samples"][:n]]
    scored = all("score" in sample for sample in samples)
    per_problem = [problem_metrics(record, n, ks, seed, num_subsets, scored) for record in records]
    verdicts = Counter(sample["verdict"] for sample in samples)
    token_counts = [sample["num_tokens"] for sample in samples if sample.get("num_tokens") is not None]
    generation_s = sum(record.get("generation_s") or 0.0 for record in records)
    return {
        **(meta or {}),
        "num_problems": len(records),
        "n": n,
        "ks": ks,
        "metrics": _mean(per_problem),
        "stderr": _stderr(per_problem),
        "ci95": _ci95(per_problem, seed),
        "by_level": _breakdown(records, per_problem, "level"),
        "by_subject": _breakdown(records, per_problem, "subject"),
        "samples": {
            "total": len(samples),
            **{verdict: verdicts.get(verdict, 0) for verdict in ("correct", "incorrect", "no_answer", "timeout")},
            "truncated": sum(sample.get("finish_reason") == "length" for sample in samples),
            "mean_tokens": round(sum(token_counts) / len(token_counts), 2) if token_counts else None,
        },
        "estimators": {
            "pass@k": "unbiased, 1 - C(n-c,k)/C(n,k) (Chen et al. 2021)",
            "pass_all@k": "pass^k, all k correct: C(c,k)/C(n,k) (Yao et al. 2024)",
            "maj@k": "exact expectation over all k-subsets, from the answer-group counts (ties split)",
            "bon@k": "exact expectation over all k-subsets" if scored else None,
            "weighted_maj@k": (
                f"mean over all k-subsets if C(n,k) <= {num_subsets}, else {num_subsets} random (seed {seed})"
                if scored
                else None
            ),
            "ci95": f"percentile bootstrap over problems, {DEFAULT_RESAMPLES} resamples (seed {seed})",
        },
        "timing": {
            "generation_s": round(generation_s, 3),
            "grading_s": round(sum(record.get("grading_s") or 0.0 for record in records), 3),
            "generated_tokens": sum(token_counts),
            "tokens_per_s": round(sum(token_counts) / generation_s, 2) if generation_s > 0 else None,
        },
        "engine": _engines(records),
        "versions": package_versions(),
    }


def _engines(records: list[dict]) -> dict | list[dict] | None:
    """The generation engine(s) the records were sampled with (one dict, or each distinct one after a resume)."""
    distinct = []
    for record in records:
        engine = record.get("engine")
        if engine is not None and engine not in distinct:
            distinct.append(engine)
    return distinct[0] if len(distinct) == 1 else (distinct or None)


def plot_title(summary: dict) -> str:
    """ "MODEL on DATASET (P problems, n=N)"; samples graded with `--samples` and no run_config.json next to them
    have neither, so they are named by their file instead."""
    model, dataset = summary.get("model"), summary.get("dataset")
    if model and dataset:
        what = f"{model} on {dataset}"
    elif summary.get("source"):
        what = f"{model or 'samples'} from {Path(summary['source']).name}"
    else:
        what = model or dataset or "samples"
    return f"{what} ({summary['num_problems']} problems, n={summary['n']})"


def plot_passk(summary: dict, path: Path) -> Path:
    """Every metric family present (pass@k, pass^k, maj@k, bon@k, weighted maj@k) against k on a log-2 axis, with
    error bars of one standard error (summary `stderr`)."""
    ks = summary["ks"]
    curves, errors = {}, {}
    for family in METRIC_FAMILIES:
        values = [summary["metrics"].get(f"{family}@{k}") for k in ks]
        if all(value is not None for value in values):
            curves[f"{family}@k"] = (ks, values)
            errors[f"{family}@k"] = curve_errors(summary, family)
    return plot_curves(curves, path, title=plot_title(summary), ylabel="accuracy", errors=errors)


def write_report(summary: dict, output_dir: Path, plot: bool = True) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    if plot:
        plot_passk(summary, output_dir / PLOT_FILE)
