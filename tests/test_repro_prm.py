"""`align repro prm`: the implicit-PRM proving ground end to end on the tiny model (samples scripted, so that each
problem has right and wrong ones), its resume, the ranking metrics against brute force, and the command's errors."""

import json
import random

import pytest

from align.cli import main as align_main
from align.evaluation import runs
from align.experiments.prm_report import aggregate, discrimination, per_problem_metrics, top_pick
from tests.scripted_backend import ScriptedBackend, arithmetic_script


@pytest.fixture
def scripted(monkeypatch, tiny_model_dir):
    """Sampling through the harness returns scripted completions, prompts rendered with the tiny model's chat
    template (the same prompts the PRMs are trained and scored on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backends = []

    def factory(*args, **kwargs):
        backends.append(ScriptedBackend(arithmetic_script))
        backends[-1].tokenizer = tokenizer
        return backends[-1]

    monkeypatch.setattr(runs, "get_backend", factory)
    return backends


@pytest.mark.slow  # ~1-2 min on 2 cores: a warm-up, 2 PRMs, their scoring and step benchmarks
def test_prm_proving_ground_on_tiny_model(tiny_model_dir, tmp_path, scripted, capsys):
    out = tmp_path / "prm"
    argv = ["repro", "prm", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]
    assert align_main(argv) == 0
    capsys.readouterr()

    results = json.loads((out / "results.json").read_text())
    assert set(results["ranking"]) == {"ce-s0", "dpo-s0"}
    # the scripted policy: samples 0-1 right, 2 wrong, 3 unanswered on every problem
    assert results["policy"]["metrics"]["pass@1"] == 0.5
    assert results["training_data"]["0"]["outcome"] == {"problems": 4, "positive": 8, "negative": 8, "rows": 16}
    assert results["training_data"]["0"]["pairs"]["rows"] == 8
    for entry in results["ranking"].values():
        means = entry["means"]
        assert means["pass@1"] == 0.5 and means["pass@n"] == 1.0 and means["maj"] == 1.0
        assert 0.0 <= means["bon_process"] <= 1.0 and 0.0 <= means["bon_outcome"] <= 1.0
        assert entry["auc"]["process"]["problems"] == 4 and 0.0 <= entry["auc"]["outcome"]["within_problem"] <= 1.0
        for difference in entry["differences"].values():
            assert difference["low"] <= difference["diff"] <= difference["high"] and difference["n"] == 4
    steps = results["steps"]
    assert set(steps) == {"ce-s0", "dpo-s0"}
    assert "likelihood" in steps["ce-s0"] and "likelihood" not in steps["dpo-s0"]  # a baseline, computed once
    report = (out / "report.md").read_text()
    assert "| ce-s0 |" in report and "bon (process) - maj" in report and "likelihood (no PRM)" in report
    assert (out / "repro-prm.png").stat().st_size > 0
    # PRMs are adapters over the merged start: the reference is the policy that produced the samples
    adapter = json.loads((out / "train" / "ce-s0" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "start")

    # a rerun redoes nothing: every stage is found finished
    calls = len(scripted)
    assert align_main(argv) == 0
    rerun = capsys.readouterr().out
    assert len(scripted) == calls
    assert rerun.count("reusing the finished run") == 3 and "reusing the scored samples" in rerun
    assert "reusing the step benchmark" in rerun
    assert json.loads((out / "results.json").read_text())["ranking"] == results["ranking"]


def test_ranking_metrics_match_brute_force():
    rng = random.Random(0)
    records = []
    for index in range(5):
        samples = []
        for _ in range(4):
            answer = rng.choice(["1", "2", "3"])
            rewards = [rng.gauss(0, 1) for _ in range(rng.randint(1, 3))]
            samples.append(
                {"verdict": "correct" if answer == "1" else "incorrect", "group": answer, "step_rewards": rewards}
            )
        records.append({"id": f"p{index}", "samples": samples})
    values = per_problem_metrics(records, 4)
    for index, record in enumerate(sorted(records, key=lambda r: r["id"])):
        samples = record["samples"]
        best_min = max(samples, key=lambda s: min(s["step_rewards"]))
        best_sum = max(samples, key=lambda s: sum(s["step_rewards"]))
        assert values["bon_process"][index] == float(best_min["verdict"] == "correct")
        assert values["bon_outcome"][index] == float(best_sum["verdict"] == "correct")
        assert values["pass@1"][index] == sum(s["verdict"] == "correct" for s in samples) / 4
    assert aggregate([], "min") == 0.0 and aggregate([1.0, -2.0], "sum") == -1.0
    with pytest.raises(ValueError, match="'min' or 'sum'"):
        aggregate([1.0], "mean")


def test_discrimination_separates_knowing_the_problem_from_ranking_its_samples():
    def record(scores_right, scores_wrong):
        samples = [{"verdict": "correct", "step_rewards": [s]} for s in scores_right]
        return {"samples": samples + [{"verdict": "incorrect", "step_rewards": [s]} for s in scores_wrong]}

    # an easy problem scored high, a hard one low, and inside each the wrong sample above the right one
    records = [record([1.0], [1.5, 1.5]), record([-1.0, -1.0, -1.0], [-0.5]), record([0.0], [])]
    auc = discrimination(records, "min")
    assert auc["within_problem"] == 0.0 and auc["problems"] == 2
    # pooled: right {1, -1, -1, -1, 0} vs wrong {1.5, 1.5, -0.5}, by brute force
    right, wrong = [1.0, -1.0, -1.0, -1.0, 0.0], [1.5, 1.5, -0.5]
    assert auc["pooled"] == sum(r > w for r in right for w in wrong) / 15
    tied = discrimination([record([2.0], [2.0])], "sum")
    assert tied == {"pooled": 0.5, "within_problem": 0.5, "problems": 1}
    assert discrimination([record([1.0], [])], "min") == {"pooled": None, "within_problem": None, "problems": 0}


def test_top_pick_counts_distinct_texts_as_a_ranker_sees_them():
    def sample(text, correct, score):
        return {"completion": text, "verdict": "correct" if correct else "incorrect", "step_rewards": [score]}

    # the right text sampled 3 times, 3 different wrong texts: a random sample is right 1/2, a random text 1/4
    mixed = {
        "samples": [sample("r", True, 0.1)] * 3 + [sample(w, False, s) for w, s in (("a", 0.0), ("b", 0.2), ("c", -1))]
    }
    solved = {"samples": [sample("r", True, 0.0)] * 2}  # no wrong sample: not a ranking problem
    pick = top_pick([mixed, solved], "min")
    assert pick == {"mixed_problems": 1, "top_is_right": 0.0, "chance_random_sample": 0.5,
                    "chance_random_distinct_text": 0.25}  # fmt: skip
    assert top_pick([solved], "sum")["top_is_right"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objectives", "kto"], "trains ce and/or dpo"),
        (["--epochs", "1"], "not options of `align repro prm`"),
        (["--seeds", "-1"], "training seeds are integers >= 0"),
        (["--num-test", "0"], "sizes must be >= 1"),
    ],
)
def test_repro_prm_rejects_bad_arguments(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "prm", "--quick", "--output-dir", str(tmp_path / "x"), *flags])
    assert message in capsys.readouterr().err
