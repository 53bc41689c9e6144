"""The percentile bootstrap over problems (Efron & Tibshirani 1993, ch. 13): resample the problems with
replacement B times, take each metric's mean over every resample, and read an interval off the quantiles of those B
means. Shared by summary.json's `ci95` (one run, every metric) and `align.evaluation.paired` (the per-problem
differences of two runs).
"""

from __future__ import annotations

import numpy as np


DEFAULT_RESAMPLES = 10_000
_CHUNK_ELEMENTS = 1 << 22  # resample indices drawn per chunk: bounds memory (32 MB) for any number of problems


def bootstrap_means(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, ...) means of `values` over `resamples` draws of its rows (axis 0: the problems) with replacement.

    `values` is (problems,) or (problems, metrics); every metric sees the same resamples (one draw of problem
    indices per resample, from `numpy.random.default_rng(seed)`), so the result is deterministic for a seed.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim not in (1, 2) or not len(values):
        raise ValueError(f"need a non-empty (items,) or (items, metrics) array of values, got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    items = len(values)
    matrix = values.reshape(items, -1)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // items)
    means = []
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        picks = rng.integers(0, items, size=(count, items))
        # how often each item is drawn in each resample: the mean is then a matrix product
        offsets = picks + items * np.arange(count)[:, None]
        times = np.bincount(offsets.ravel(), minlength=count * items).reshape(count, items)
        means.append(times @ matrix / items)
    return np.concatenate(means).reshape(resamples, *values.shape[1:])


def percentile_interval(
    values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval at `level` of the mean of `values` (per column): (low, high)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(bootstrap_means(values, resamples=resamples, seed=seed), [tail, 1.0 - tail], axis=0)
    return low, high
