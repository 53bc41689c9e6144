"""`align repro prime`: the PRIME proving ground end to end on the tiny model (training samples from the model,
held-out samples scripted so that pass@k is known), its resume, the sample-efficiency count against a hand count,
and the command's errors."""

import json

import pytest

from align.cli import main as align_main
from align.evaluation import runs
from align.experiments.prime_report import sample_efficiency
from tests.scripted_backend import ScriptedBackend, arithmetic_script


@pytest.fixture
def scripted(monkeypatch, tiny_model_dir):
    """Held-out sampling through the harness returns scripted completions (2 of 4 right on every problem), prompts
    rendered with the tiny model's chat template, as training renders them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backends = []

    def factory(*args, **kwargs):
        backends.append(ScriptedBackend(arithmetic_script))
        backends[-1].tokenizer = tokenizer
        return backends[-1]

    monkeypatch.setattr(runs, "get_backend", factory)
    return backends


@pytest.mark.slow  # ~1-2 min on 2 cores: 3 arms x 2 steps of GRPO on the tiny model
def test_prime_proving_ground_on_tiny_model(tiny_model_dir, tmp_path, scripted, capsys):
    out = tmp_path / "prime"
    argv = ["repro", "prime", "--quick", "--start", tiny_model_dir, "--output-dir", str(out)]
    assert align_main(argv) == 0
    capsys.readouterr()

    results = json.loads((out / "results.json").read_text())
    assert set(results["summaries"]) == {"start", "prime-s0", "rloo-s0", "grpo-s0"}
    assert results["metrics_names"] == ["pass@1"]  # QUICK draws n = 4 < 8 held-out samples
    for summary in results["summaries"].values():
        assert summary["pass@1"] == 0.5  # the scripted sampler, whatever the weights
    for name, by_metric in results["comparisons"].items():
        difference = by_metric["pass@1"]
        assert difference["diff"] == 0.0 and difference["low"] <= 0.0 <= difference["high"], name
        assert not difference["shown"]
    assert set(results["comparisons"]) >= {"prime-s0 - grpo-s0", "prime-s0 - rloo-s0", "prime-s0 - start"}
    for arm in ("prime", "rloo", "grpo"):
        curve = results["curves"][f"{arm}-s0"]
        assert [point["samples"] for point in curve] == [8, 16]  # 2 steps x 2 prompts x K 4
        assert all(0.0 <= point["reward"] <= 1.0 for point in curve)
    # the random tiny model never answers right: every prompt is all-wrong, filtered out, and logged as such
    assert all(point["filtered_frac"] == 1.0 for point in results["curves"]["prime-s0"])
    # the PRIME arm saves its PRM next to the policy; the outcome-only arm has none; checkpoints are removed
    assert (out / "train" / "prime-s0" / "prm" / "adapter_config.json").is_file()
    assert not (out / "train" / "rloo-s0" / "prm").exists()
    assert not list((out / "train").glob("*/checkpoint-*"))
    report = (out / "report.md").read_text()
    assert "| prime-s0 - grpo-s0 |" in report and "Sample efficiency" in report
    assert (out / "repro-prime.png").stat().st_size > 0

    # a rerun redoes nothing: every training run and every held-out evaluation is found finished
    calls = len(scripted)
    assert align_main(argv) == 0
    rerun = capsys.readouterr().out
    assert len(scripted) == calls
    assert rerun.count("reusing the finished run") == 3
    assert json.loads((out / "results.json").read_text())["curves"] == results["curves"]


def test_sample_efficiency_counts_samples_to_the_baselines_final_reward():
    def curve(rewards):
        return [{"samples": 16 * (i + 1), "reward": r} for i, r in enumerate(rewards)]

    curves = {
        # 8 steps: window 2; rloo ends at mean(0.5, 0.75) = 0.625
        "rloo-s0": curve([0.0, 0.25, 0.25, 0.5, 0.25, 0.5, 0.5, 0.75]),
        # trailing means of 2 from step 2: .5 (a lucky first step alone would be 1.0), .25, .5, .625 -> step 5
        "prime-s0": curve([1.0, 0.0, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]),
        "prime-s1": curve([0.0, 0.0]),
        "rloo-s1": curve([0.5, 0.5]),
    }
    table = sample_efficiency(curves, "prime", "rloo", [0, 1, 2])
    assert table["0"] == {"window_steps": 2, "target_final_reward": 0.625, "samples_to_reach": 80,
                          "baseline_samples": 128}  # fmt: skip
    assert table["1"]["window_steps"] == 1 and table["1"]["samples_to_reach"] is None  # never reached
    assert "2" not in table  # no runs for that seed


def test_repro_prime_rejects_a_start_that_is_not_a_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = align_main(["repro", "prime", "--quick", "--start", str(empty), "--output-dir", str(tmp_path / "x")])
    assert code != 0
    err = capsys.readouterr().err
    assert "config.json missing" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "1"], "not options of `align repro prime`"),
        (["--objectives", "ce"], "not options of `align repro prime`"),
        (["--seeds", "-1"], "training seeds are integers >= 0"),
        (["--num-test", "0"], "sizes must be >= 1"),
    ],
)
def test_repro_prime_rejects_bad_arguments(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "prime", "--quick", "--output-dir", str(tmp_path / "x"), *flags])
    assert message in capsys.readouterr().err


def test_start_is_an_option_of_prime_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "prm", "--quick", "--start", str(tmp_path), "--output-dir", str(tmp_path / "x")])
    assert "--start is an option of `align repro prime`" in capsys.readouterr().err
