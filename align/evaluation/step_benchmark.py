"""ProcessBench's metric: find the earliest wrong step, scored as two accuracies and their harmonic mean.

Zheng et al. 2024, "ProcessBench" (arXiv 2412.06559), §3: each solution has a label, the index of its earliest wrong
step or −1 when every step is right. A model's prediction is correct when it equals the label; the benchmark reports
the accuracy on erroneous solutions, the accuracy on correct ones, and their harmonic mean (F1), so a model that
flags everything (or nothing) scores 0. A PRM predicts by thresholding: the first step whose score falls below the
threshold is the predicted error, −1 when none does. The threshold is a choice, so it is either swept (the best F1,
an optimistic figure) or chosen on a separate calibration split and applied unchanged (the honest figure).

Pure functions over lists of per-step scores; `align.prm.ImplicitPRM` (or any scorer) produces the scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np


def first_below(step_scores: Sequence[float], threshold: float) -> int:
    """The index of the first step whose score is < threshold, or −1 when none is."""
    for index, score in enumerate(step_scores):
        if score < threshold:
            return index
    return -1


def processbench_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict:
    """{"error_accuracy", "correct_accuracy", "f1", "num_error", "num_correct"} of predicted first-error indices.

    An accuracy over an empty class is NaN (say so rather than guess); F1 is then NaN too.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    erroneous = [int(p == y) for p, y in zip(predictions, labels) if y != -1]
    correct = [int(p == -1) for p, y in zip(predictions, labels) if y == -1]
    error_accuracy = sum(erroneous) / len(erroneous) if erroneous else math.nan
    correct_accuracy = sum(correct) / len(correct) if correct else math.nan
    return {
        "error_accuracy": error_accuracy,
        "correct_accuracy": correct_accuracy,
        "f1": harmonic_mean(error_accuracy, correct_accuracy),
        "num_error": len(erroneous),
        "num_correct": len(correct),
    }


def harmonic_mean(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def candidate_thresholds(step_scores: Sequence[Sequence[float]]) -> list[float]:
    """Every threshold that gives a distinct prediction: −inf (flag nothing), the midpoints between consecutive
    distinct scores, and +inf (flag every first step)."""
    values = np.unique(np.fromiter((s for scores in step_scores for s in scores), dtype=np.float64))
    return [-math.inf, *((values[:-1] + values[1:]) / 2).tolist(), math.inf]


def predict(step_scores: Sequence[Sequence[float]], threshold: float) -> list[int]:
    return [first_below(scores, threshold) for scores in step_scores]


def sweep_threshold(step_scores: Sequence[Sequence[float]], labels: Sequence[int]) -> dict:
    """The threshold with the best F1 on these rows (ties: the lowest threshold), with its metrics.

    Vectorised: for each row, the running minimum of its scores says, for any threshold t, the first index whose
    score < t; so F1 for every candidate comes from one sort per row, not one pass per candidate.
    """
    thresholds = np.asarray(candidate_thresholds(step_scores))
    labels = list(labels)
    hits_error = np.zeros(len(thresholds))
    hits_correct = np.zeros(len(thresholds))
    for scores, label in zip(step_scores, labels):
        prefix_min = np.minimum.accumulate(np.asarray(scores, dtype=np.float64)) if len(scores) else np.array([])
        # predicted index for threshold t: the first i with prefix_min[i] < t (prefix_min is non-increasing)
        if len(prefix_min):
            first = np.searchsorted(-prefix_min, -thresholds, side="right")  # count of i with prefix_min[i] >= t
            predicted = np.where(first >= len(prefix_min), -1, first)
        else:
            predicted = np.full(len(thresholds), -1)
        if label == -1:
            hits_correct += predicted == -1
        else:
            hits_error += predicted == label
    num_error = sum(1 for y in labels if y != -1)
    num_correct = len(labels) - num_error
    error_accuracy = hits_error / num_error if num_error else np.full(len(thresholds), np.nan)
    correct_accuracy = hits_correct / num_correct if num_correct else np.full(len(thresholds), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = error_accuracy + correct_accuracy
        f1 = np.where(total > 0, 2 * error_accuracy * correct_accuracy / np.where(total > 0, total, 1), 0.0)
    best = int(np.nanargmax(f1)) if not np.all(np.isnan(f1)) else 0
    threshold = float(thresholds[best])
    return {"threshold": threshold, **processbench_metrics(predict(step_scores, threshold), labels)}


def per_position(predictions: Sequence[int], labels: Sequence[int]) -> dict[int, dict]:
    """Accuracy per label (−1 = correct solutions, 0, 1, ... = the earliest error's index): {label: {n, accuracy}}."""
    table: dict[int, list[int]] = {}
    for predicted, label in zip(predictions, labels):
        table.setdefault(int(label), []).append(int(predicted == label))
    return {label: {"n": len(hits), "accuracy": sum(hits) / len(hits)} for label, hits in sorted(table.items())}


def random_step_scores(rows: Sequence[Sequence[object]], seed: int = 0) -> list[list[float]]:
    """The no-model baseline: an independent U(0, 1) score per step. Thresholded, it flags each step with
    probability t, so its sweep is the best a random flag can do on these rows."""
    rng = random.Random(f"align-random-flag-{seed}")
    return [[rng.random() for _ in steps] for steps in rows]


def evaluate_step_scores(
    step_scores: Sequence[Sequence[float]],
    labels: Sequence[int],
    calibration: tuple[Sequence[Sequence[float]], Sequence[int]] | None = None,
) -> dict:
    """ProcessBench metrics of one scorer: at the best threshold on these rows (`best`), and, with `calibration`
    (scores and labels of a separate split), at the threshold chosen there (`calibrated`), each with per-position
    accuracies."""
    best = sweep_threshold(step_scores, labels)
    result = {"best": {**best, "per_position": per_position(predict(step_scores, best["threshold"]), labels)}}
    if calibration is not None:
        threshold = sweep_threshold(*calibration)["threshold"]
        predictions = predict(step_scores, threshold)
        result["calibrated"] = {
            "threshold": threshold,
            **processbench_metrics(predictions, labels),
            "per_position": per_position(predictions, labels),
        }
    return result
