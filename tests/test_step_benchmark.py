"""The step-error benchmark: injected errors are where the label says and propagate; ProcessBench's metrics."""

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.data.step_errors import computation_steps, correct_steps, inject_error, step_error_rows
from align.data.synthetic import LEVELS, generate_problems
from align.evaluation.step_benchmark import (
    evaluate_step_scores,
    first_below,
    predict,
    processbench_metrics,
    random_step_scores,
    sweep_threshold,
)
from align.grading.verify import grade_answer


@pytest.mark.parametrize("level", LEVELS)
def test_injected_errors_start_at_their_step_and_change_the_answer(level):
    for problem in generate_problems(30, "test", [level]):
        reference = correct_steps(problem)
        for position in range(computation_steps(problem)):
            steps, wrong, kind = inject_error(problem, position, random.Random(position))
            assert steps[:position] == reference[:position]  # everything before the error is the reference's
            assert steps[position] != reference[position]
            assert len(steps) == len(reference)
            assert wrong != problem.answer and f"\\boxed{{{wrong}}}" in steps[-1]
            assert grade_answer(steps[-1], problem.answer)[0] == "incorrect"
            assert kind in {"slip", "operand", "copied"}


def test_errors_propagate_consistently():
    # Level 2, an error in the product: the next step must reuse the wrong product, not the right one.
    problem = generate_problems(1, "test", [2])[0]
    steps, wrong, kind = inject_error(problem, 0, random.Random(3))
    product = int(steps[0].split("= ")[-1].rstrip("$."))
    assert steps[1].split(": $")[1].startswith(f"{product} ")
    assert steps[1].rstrip("$.").endswith(f"= {wrong}")


def test_rows_are_balanced_and_in_processbench_format():
    rows = step_error_rows(200, levels=(1, 2, 3, 5), seed=1)
    assert sum(row["label"] == -1 for row in rows) == 100
    assert all(sum(r["label"] == -1 for r in rows if r["level"] == lv) == 25 for lv in (1, 2, 3, 5))
    for row in rows:
        assert set(row) >= {"id", "problem", "steps", "label", "final_answer_correct"}
        assert row["final_answer_correct"] == (row["label"] == -1)
    by_level = Counter((row["level"], row["label"]) for row in rows if row["label"] != -1)
    for level in (1, 2, 3, 5):
        counts = [count for (lv, _), count in by_level.items() if lv == level]
        assert max(counts) - min(counts) <= 1  # error positions balanced within a level
    assert step_error_rows(20, seed=1) == step_error_rows(20, seed=1)
    with pytest.raises(ValueError, match="out of range"):
        inject_error(generate_problems(1, "test", [1])[0], 5, random.Random(0))


def test_first_below_and_metrics_closed_form():
    assert first_below([0.5, -1.0, -2.0], 0.0) == 1
    assert first_below([0.5, 0.2], 0.0) == -1
    labels = [-1, -1, 0, 1, 2]
    predictions = [-1, 0, 0, 2, 2]
    metrics = processbench_metrics(predictions, labels)
    assert metrics["correct_accuracy"] == 0.5 and metrics["error_accuracy"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert math.isnan(processbench_metrics([0], [0])["f1"])  # no correct solutions: F1 undefined, not 0 or 1


def _brute_force_best_f1(scores, labels):
    values = sorted({s for row in scores for s in row})
    thresholds = [-math.inf, *[(a + b) / 2 for a, b in zip(values, values[1:])], math.inf]
    return max(processbench_metrics(predict(scores, t), labels)["f1"] for t in thresholds)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sweep_equals_brute_force(data):
    rows = data.draw(st.integers(2, 12))
    scores = [data.draw(st.lists(st.integers(-4, 4).map(float), min_size=1, max_size=5)) for _ in range(rows)]
    labels = [data.draw(st.integers(-1, len(row) - 1)) for row in scores]
    labels[0], labels[1] = -1, 0  # both classes present
    best = sweep_threshold(scores, labels)
    assert best["f1"] == pytest.approx(_brute_force_best_f1(scores, labels))
    assert processbench_metrics(predict(scores, best["threshold"]), labels)["f1"] == pytest.approx(best["f1"])


def test_perfect_scorer_and_calibration():
    rows = step_error_rows(40, seed=2)
    labels = [row["label"] for row in rows]
    # A perfect PRM: +1 on right steps, -1 from the first wrong step on.
    oracle = [
        [1.0 if row["label"] == -1 or i < row["label"] else -1.0 for i in range(len(row["steps"]))] for row in rows
    ]
    result = evaluate_step_scores(oracle, labels, calibration=(oracle, labels))
    assert result["best"]["f1"] == 1.0 and result["calibrated"]["f1"] == 1.0
    assert all(entry["accuracy"] == 1.0 for entry in result["best"]["per_position"].values())
    randomly = evaluate_step_scores(random_step_scores([row["steps"] for row in rows]), labels)
    assert randomly["best"]["f1"] < 0.9


def test_eval_steps_scores_a_prm_and_its_baselines(tmp_path, tiny_model_dir, capsys):
    import json

    from transformers import AutoTokenizer

    from align.cli import main as align_main
    from align.testing import perturbed_copy

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = perturbed_copy(tiny_model_dir)
    prm = tmp_path / "prm"
    policy.save_pretrained(prm)
    tokenizer.save_pretrained(prm)
    (prm / "implicit_prm.json").write_text(json.dumps({"beta": 0.05, "reference_model": tiny_model_dir}))
    out = tmp_path / "steps"
    args = ["eval-steps", "--prm", str(prm), "--synthetic", "16", "--num-calibration", "8", "--output-dir", str(out)]
    assert align_main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scorers"]) == {"prm", "likelihood", "random"}
    for result in summary["scorers"].values():
        for mode in ("best", "calibrated"):
            entry = result[mode]
            assert 0.0 <= entry["f1"] <= 1.0 and entry["num_error"] == 8 and entry["num_correct"] == 8
        assert result["best"]["f1"] >= result["calibrated"]["f1"]  # the best threshold on the rows is an upper bound
    assert "| prm (best on test)" in printed and "| likelihood (chosen on calibration)" in printed
    scores = json.loads((out / "step_scores.json").read_text())
    rows = step_error_rows(16)
    assert [len(s) for s in scores["prm"]["test"]] == [len(row["steps"]) for row in rows]
    # A file in ProcessBench's format is read the same way; a bad label is named, with its row and field.
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert (
        align_main(["eval-steps", "--prm", str(prm), "--data", str(data), "--no-likelihood", "--output-dir", str(out)])
        == 0
    )
    again = json.loads((out / "step_scores.json").read_text())
    flat = [value for row in scores["prm"]["test"] for value in row]
    assert [value for row in again["prm"]["test"] for value in row] == pytest.approx(flat, abs=1e-6)
    assert again["likelihood"] == {}
    bad = dict(rows[0], label=7)
    data.write_text(json.dumps(bad) + "\n")
    from align.evaluation.step_scoring import StepRowError, read_rows

    with pytest.raises(StepRowError, match=r"row 0, field 'label' = 7"):
        read_rows(data)
