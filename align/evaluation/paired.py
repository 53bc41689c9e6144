"""Paired comparison of two evaluation runs on the same problems: per-problem metric differences and a paired
bootstrap 95 % interval for the mean difference.

Two arms (two models, two precisions, two losses) evaluated on identical problems are compared per problem, not as
two independent means: problem difficulty is shared by both arms, so the variance of the difference is far
smaller than the sum of the arms' variances. The paired bootstrap (Efron & Tibshirani 1993, ch. 16; the standard
for comparing systems on one test set, e.g. Koehn 2004 for MT) resamples problems with replacement B times and
takes the mean of d_i = metric_B(i) - metric_A(i) over each resample; the 2.5 % and 97.5 % quantiles of those
means are the 95 % interval (`align.evaluation.bootstrap`, which also gives summary.json's `ci95`). An interval
that contains 0 means the difference is "not shown" at this size.

Per-problem metrics come from `align.evaluation.report.problem_metrics` over each record's n graded samples (unbiased
pass@k, maj@k, ...), so the comparison uses exactly the numbers `summary.json` averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from align.evaluation.bootstrap import DEFAULT_RESAMPLES, percentile_interval
from align.evaluation.estimators import DEFAULT_NUM_SUBSETS
from align.evaluation.records import read_records
from align.evaluation.report import METRIC_FAMILIES, SCORED_FAMILIES, problem_metrics


def per_problem(records: list[dict], name: str) -> dict[str, float]:
    """`{problem id: metric}` for `name` like "pass@16" or "maj@8", computed as summary.json computes it."""
    family, _, k = name.partition("@")
    if family not in METRIC_FAMILIES or not k.isdigit():
        raise ValueError(f"metric {name!r}: use FAMILY@K with FAMILY one of {METRIC_FAMILIES}, e.g. pass@16")
    values = {}
    for record in records:
        n = len(record["samples"])
        if int(k) > n:
            raise ValueError(f"{name} needs at least {k} samples; problem {record['id']!r} has {n}")
        scored = family in SCORED_FAMILIES
        values[record["id"]] = problem_metrics(record, n, [int(k)], 0, DEFAULT_NUM_SUBSETS, scored)[name]
    return values


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> dict:
    """Mean of b - a over paired items with its paired-bootstrap interval at `level`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two equally long, non-empty 1-d arrays of paired values, got {a.shape} and {b.shape}")
    diff = b - a
    low, high = percentile_interval(diff, resamples=resamples, seed=seed, level=level)
    return {
        "n": len(diff),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "shown": bool(low > 0 or high < 0),
    }


def compare_runs(
    samples_a: Path,
    samples_b: Path,
    *,
    metrics: Sequence[str] = ("pass@1",),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict]:
    """`{"pass@1": paired_bootstrap(...), ...}`: each of `metrics` for run B minus run A, paired by problem.

    The runs must cover the same problem ids (a paired comparison of different test sets means nothing).
    """
    records_a, records_b = read_records(Path(samples_a)), read_records(Path(samples_b))
    ids_a, ids_b = {r["id"] for r in records_a}, {r["id"] for r in records_b}
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b)[:3], sorted(ids_b - ids_a)[:3]
        raise ValueError(
            f"{samples_a} and {samples_b} hold different problems ({len(ids_a ^ ids_b)} ids differ, e.g. only in A: "
            f"{only_a}, only in B: {only_b}); evaluate both arms on the same dataset, split, limit and seed"
        )
    order = sorted(ids_a)
    results = {}
    for name in metrics:
        a, b = per_problem(records_a, name), per_problem(records_b, name)
        results[name] = paired_bootstrap([a[i] for i in order], [b[i] for i in order], resamples=resamples, seed=seed)
    return results
