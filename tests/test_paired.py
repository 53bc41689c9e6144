"""Paired comparison of two runs: the bootstrap interval against exact enumeration, and run matching by problem."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from align.evaluation.estimators import pass_at_k
from align.evaluation.paired import compare_runs, paired_bootstrap, per_problem


def test_constant_difference_has_a_zero_width_interval():
    result = paired_bootstrap([0.1, 0.5, 0.9], [0.3, 0.7, 1.1])
    assert result["diff"] == pytest.approx(0.2)
    assert result["low"] == pytest.approx(0.2) and result["high"] == pytest.approx(0.2)
    assert result["shown"]


def test_interval_matches_the_exact_bootstrap_distribution():
    """For 4 items all 4^4 resamples are equally likely: their mean quantiles are the exact bootstrap interval."""
    a, b = np.array([0.0, 0.2, 0.5, 0.1]), np.array([0.4, 0.1, 0.9, 0.1])
    diff = b - a
    exact = np.array([diff[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    low, high = np.quantile(exact, [0.025, 0.975])
    result = paired_bootstrap(a, b, resamples=200_000, seed=1)
    assert result["diff"] == pytest.approx(diff.mean())
    assert result["low"] == pytest.approx(low, abs=0.01) and result["high"] == pytest.approx(high, abs=0.01)
    assert result["shown"] is bool(low > 0 or high < 0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])


def _run(path, verdicts_by_id):
    with path.open("w") as handle:
        for pid, verdicts in verdicts_by_id.items():
            samples = [
                {
                    "completion": "x",
                    "num_tokens": 1,
                    "finish_reason": "stop",
                    "verdict": v,
                    "extracted": "1",
                    "group": 0 if v == "correct" else 1,
                }
                for v in verdicts
            ]
            record = {
                "id": pid,
                "problem": "p",
                "answer": "1",
                "level": 1,
                "subject": "s",
                "prompt": "q",
                "samples": samples,
            }
            handle.write(json.dumps(record) + "\n")
    return path


def test_compare_runs_pairs_by_problem(tmp_path):
    a = _run(tmp_path / "a.jsonl", {"p1": ["correct", "wrong", "wrong", "wrong"], "p2": ["wrong"] * 4})
    b = _run(tmp_path / "b.jsonl", {"p2": ["correct", "correct", "wrong", "wrong"], "p1": ["correct"] * 4})
    result = compare_runs(a, b, metrics=("pass@1", "pass@2"))
    expected = ((1.0 - 0.25) + (0.5 - 0.0)) / 2
    assert result["pass@1"]["diff"] == pytest.approx(expected)
    p2_b = pass_at_k(4, 2, 2)
    assert result["pass@2"]["diff"] == pytest.approx(((1.0 - pass_at_k(4, 1, 2)) + p2_b) / 2)
    assert per_problem([json.loads(line) for line in b.read_text().splitlines()], "pass@1") == {"p2": 0.5, "p1": 1.0}


def test_compare_runs_refuses_different_problems(tmp_path):
    a = _run(tmp_path / "a.jsonl", {"p1": ["correct"], "p2": ["wrong"]})
    b = _run(tmp_path / "b.jsonl", {"p1": ["correct"], "p3": ["wrong"]})
    with pytest.raises(ValueError, match="hold different problems"):
        compare_runs(a, b)
    with pytest.raises(ValueError, match="use FAMILY@K"):
        compare_runs(a, a, metrics=("accuracy",))
