"""summary.json extras and passk.png: pass^k, bootstrap intervals, scores read from a samples file, the plot."""

import json

import numpy as np
import pytest

from align.evaluation import report
from align.evaluation.bootstrap import bootstrap_means, percentile_interval
from align.evaluation.config import EvalConfig
from align.evaluation.estimators import pass_all_at_k
from align.evaluation.harness import run_eval
from align.evaluation.records import SamplesFileError


def graded_record(pid: str, verdicts: list[str], level: int = 1) -> dict:
    groups = {"correct": 0, "incorrect": 1, "no_answer": None}
    samples = [{"verdict": v, "group": groups[v], "num_tokens": 3, "finish_reason": "stop"} for v in verdicts]
    return {"id": pid, "level": level, "subject": "S", "samples": samples}


RECORDS = [
    graded_record("a", ["correct"] * 4),
    graded_record("b", ["correct", "correct", "correct", "incorrect"]),
    graded_record("c", ["correct", "incorrect", "no_answer", "incorrect"], level=2),
    graded_record("d", ["incorrect"] * 4, level=2),
]


def test_summary_reports_pass_all_beside_pass_at_k():
    summary = report.summarize(RECORDS, n=4)
    metrics = summary["metrics"]
    assert list(metrics)[:6] == ["pass@1", "pass_all@1", "maj@1", "pass@2", "pass_all@2", "maj@2"]
    # pass^k = C(c, k)/C(n, k) per problem, then the mean: (1 + 3/6 + 0 + 0) / 4 at k = 2
    assert metrics["pass_all@2"] == pytest.approx((1 + 0.5) / 4)
    assert metrics["pass_all@4"] == 0.25 and metrics["pass_all@1"] == metrics["pass@1"]
    expected = [pass_all_at_k(4, c, 2) for c in (4, 3, 1, 0)]
    assert metrics["pass_all@2"] == pytest.approx(np.mean(expected))
    assert summary["by_level"]["1"]["pass_all@2"] == pytest.approx(0.75)
    assert "pass^k" in summary["estimators"]["pass_all@k"] and "exact" in summary["estimators"]["maj@k"]
    assert summary["estimators"]["weighted_maj@k"] is None  # no scores


def test_every_metric_has_a_seeded_bootstrap_interval_beside_its_stderr():
    summary = report.summarize(RECORDS, n=4, seed=3)
    assert set(summary["ci95"]) == set(summary["metrics"]) == set(summary["stderr"])
    per_problem = [report.problem_metrics(r, 4, summary["ks"], 3, 1000, False) for r in RECORDS]
    low, high = percentile_interval([[row["pass@1"]] for row in per_problem], seed=3)
    assert summary["ci95"]["pass@1"] == [round(float(low[0]), 6), round(float(high[0]), 6)]
    for key, (lo, hi) in summary["ci95"].items():
        assert 0.0 <= lo <= summary["metrics"][key] <= hi <= 1.0, key
    # pass@4 per problem is 1, 1, 1, 0: a resample's mean is 1 - j/4 with j ~ Binomial(4, 1/4) picks of the 0,
    # P(j >= 3) = 5.1 % and P(j = 0) = 31.6 %, so the 2.5 % and 97.5 % quantiles are 0.25 and 1
    assert summary["ci95"]["pass@4"] == [0.25, 1.0]
    assert report.summarize(RECORDS, n=4, seed=3)["ci95"] == summary["ci95"]  # seeded
    assert "10000 resamples (seed 3)" in summary["estimators"]["ci95"]
    (one,) = RECORDS[1:2]
    single = report.summarize([one], n=4)
    assert all(lo == hi == single["metrics"][key] for key, (lo, hi) in single["ci95"].items())


def test_bootstrap_resamples_are_shared_by_all_metrics():
    rng = np.random.default_rng(0)
    values = rng.random((37, 3))
    together = bootstrap_means(values, resamples=500, seed=9)
    assert together.shape == (500, 3)
    for column in range(3):
        assert np.allclose(together[:, column], bootstrap_means(values[:, column], resamples=500, seed=9))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_means([], resamples=10)
    with pytest.raises(ValueError, match="level must be in"):
        percentile_interval([1.0, 2.0], level=95)


def scored_samples_file(path, second_reward=-1.0):
    rows = [
        {
            "id": "q1",
            "answer": "4",
            "samples": [{"completion": "$\\boxed{4}$", "reward": 0.9}, {"completion": "$\\boxed{5}$", "reward": 0.1}],
        },
        {
            "id": "q2",
            "answer": "\\frac12",
            "samples": [
                {"completion": "$\\boxed{3}$", "reward": second_reward},
                {"completion": "$\\boxed{0.5}$", "reward": 2},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def regrade(source, out, **overrides):
    options = dict(samples=str(source), output_dir=str(out), progress=False, grader_workers=1, plot=False)
    return run_eval(EvalConfig(**{**options, **overrides}))


def test_score_field_gives_best_of_n_and_weighted_majority_from_external_scores(tmp_path):
    source = scored_samples_file(tmp_path / "theirs.jsonl")
    summary = regrade(source, tmp_path / "out", score_field="reward")
    metrics = summary["metrics"]
    assert metrics["pass@1"] == 0.5 and metrics["maj@2"] == 0.5  # each problem: a 1-1 tie, half credit
    assert metrics["bon@2"] == 1.0 and metrics["weighted_maj@2"] == 1.0  # the external scores prefer the right one
    assert metrics["bon@1"] == 0.5 and summary["score_field"] == "reward" and summary["prm"] is None
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["score"] for s in records[1]["samples"]] == [-1.0, 2.0]
    assert records[0]["scored_with"] == {"score_field": "reward"}


def test_score_field_missing_or_not_a_number_names_the_problem_and_sample(tmp_path):
    source = scored_samples_file(tmp_path / "theirs.jsonl")
    with pytest.raises(SamplesFileError) as missing:
        regrade(source, tmp_path / "out", score_field="orm")
    assert str(missing.value) == (
        f"{source}: line 1: problem 'q1', sample index 0 (from 0) has no field 'orm'; --score-field orm needs a "
        "number there in every sample (or leave out --score-field)"
    )
    for bad, shown in (("high", "'high' (str)"), (None, "None (NoneType)"), (True, "True (bool)")):
        scored_samples_file(source, second_reward=bad)
        with pytest.raises(SamplesFileError) as wrong:
            regrade(source, tmp_path / "out", score_field="reward")
        assert str(wrong.value) == (
            f"{source}: line 2: problem 'q2', sample index 0 (from 0): field 'reward' is {shown}, not a number; "
            "--score-field needs a number in every sample"
        )


def test_score_field_needs_samples_and_excludes_prm(tmp_path):
    with pytest.raises(ValueError, match="score_field 'reward' reads scores from a samples file: add --samples"):
        EvalConfig(output_dir=str(tmp_path), score_field="reward")
    with pytest.raises(ValueError, match="score_field 'reward' and prm 'p' both give the samples' scores"):
        EvalConfig(samples="s.jsonl", score_field="reward", prm="p")


def test_score_field_errors_are_one_line_on_the_command_line(tmp_path, capsys):
    from align.cli import main

    source = scored_samples_file(tmp_path / "theirs.jsonl")
    argv = ["eval", "--samples", str(source), "--output-dir", str(tmp_path / "o"), "--no_progress", "--no_plot"]
    assert main([*argv, "--score-field", "orm"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("align eval: ") and "problem 'q1', sample index 0 (from 0) has no field 'orm'" in line
    assert main([*argv, "--score-field", "reward", "--grader_workers", "1"]) == 0
    assert "bon:" in capsys.readouterr().out


def test_plot_title_names_external_samples_by_their_file():
    base = {"num_problems": 2, "n": 4}
    assert report.plot_title({**base, "model": "m", "dataset": "d"}) == "m on d (2 problems, n=4)"
    assert report.plot_title({**base, "source": "/x/theirs.jsonl"}) == "samples from theirs.jsonl (2 problems, n=4)"
    assert report.plot_title(base) == "samples (2 problems, n=4)"
    assert "?" not in report.plot_title({**base, "model": None, "dataset": None, "source": "a/b.jsonl"})


def test_overlapping_curves_stay_visible_with_their_error_bars():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from align.evaluation.plots import draw_curves

    same = ([1, 2, 4], [0.5, 0.6, 0.7])
    curves = {"pass@k": same, "maj@k": same, "bon@k": same}
    figure, axis = plt.subplots()
    draw_curves(axis, curves, {"pass@k": [0.1, 0.1, 0.1], "maj@k": None})
    lines = [container.lines[0] for container in axis.containers]
    assert len({line.get_marker() for line in lines}) == 3 and len({line.get_linestyle() for line in lines}) == 3
    xs = np.array([line.get_xdata() for line in lines], dtype=float)
    assert np.all(np.diff(xs, axis=0) > 0)  # dodged apart at every k ...
    assert np.allclose(xs[1], [1, 2, 4]) and np.all(np.abs(np.log2(xs / [1, 2, 4])) < 0.1)  # ... around k
    errorbars = [c for c in axis.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
    assert len(errorbars) == 1
    plt.close(figure)


def test_passk_plot_gets_the_stderr_as_error_bars(tmp_path, monkeypatch):
    summary = report.summarize(RECORDS, n=4)
    seen = {}
    monkeypatch.setattr(report, "plot_curves", lambda curves, path, **kwargs: seen.update(kwargs) or path)
    report.plot_passk(summary, tmp_path / "passk.png")
    assert seen["errors"]["pass@k"] == [summary["stderr"][f"pass@{k}"] for k in summary["ks"]]
    assert set(seen["errors"]) == {"pass@k", "pass_all@k", "maj@k"}
    assert seen["title"] == "samples (4 problems, n=4)"
    monkeypatch.undo()
    assert report.plot_passk(summary, tmp_path / "passk.png").stat().st_size > 0
