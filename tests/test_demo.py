"""`align demo` end to end (quick sizes), its resumability, and the greedy-confidence diagnostic it relies on."""

import json
import math

import pytest
import torch

from align.cli import main as align_main


def test_demo_quick_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| cross-entropy |" in report and "| DCO (N'=16) |" in report and "| base |" in report
    assert (out / "exact_coverage.png").stat().st_size > 0
    for name in ("base", "sft", "dco"):
        exact = json.loads((out / "eval" / name / "exact" / "summary.json").read_text())
        assert exact["num_problems"] == 8 and exact["n"] == 0
        assert exact["exact_coverage"]["num_problems"] == 8
        sampled = json.loads((out / "eval" / name / "sampled" / "summary.json").read_text())
        assert sampled["num_problems"] == 3 and sampled["n"] == 4
    # The two fine-tuned runs trained for the same steps from the same recipes, differing only in the loss.
    sft_state = json.loads((out / "train" / "sft" / "trainer_state.json").read_text())
    dco_state = json.loads((out / "train" / "dco" / "trainer_state.json").read_text())
    assert sft_state["global_step"] == dco_state["global_step"] == 2

    results = json.loads((out / "results.json").read_text())
    assert list(results["exact"]) == ["base", "cross-entropy", "DCO (N'=16)"]
    for exact in results["exact"].values():
        # the curve runs N = 1..10^4, is a probability and never decreases in N
        assert exact["curve"]["n"][0] == 1 and exact["curve"]["n"][-1] == 10_000
        curve = exact["curve"]["pass"]
        assert all(0.0 <= value <= 1.0 for value in curve)
        assert all(later >= earlier for earlier, later in zip(curve, curve[1:]))
        for n in ("1", "16", "256", "4096"):
            low, high = exact["ci95"][n]
            assert low <= exact["pass_at"][n] <= high
            assert f"{100 * exact['pass_at'][n]:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in report
    # DCO - CE, paired by problem at each N, with its interval, in results.json and the report
    paired = results["difference"]["paired"]
    assert set(paired) == {"pass@1", "pass@16", "pass@256", "pass@4096"}
    for n, d in paired.items():
        assert d["n"] == 8 and d["low"] <= d["diff"] <= d["high"]
        exact_ce, exact_dco = (results["exact"][name]["pass_at"][n[5:]] for name in ("cross-entropy", "DCO (N'=16)"))
        assert d["diff"] == pytest.approx(exact_dco - exact_ce, abs=1e-6)
        assert f"| {n[5:]} | " in report and f"[{_points(d['low'])}, {_points(d['high'])}]" in report
    # the cross-check: sampled pass@1 / pass@4 / maj@4 on the first 3 problems beside the exact bound on them
    assert "| model | sampled pass@1 | exact pass@1 | sampled pass@4 | exact pass@4 | sampled maj@4 |" in report
    from align.evaluation.exact_coverage import pass_at_n_lower_bound

    subset = [json.loads(line)["id"] for line in (out / "test_sampled.jsonl").read_text().splitlines()]
    assert len(subset) == 3
    for name, row in results["cross_check"].items():
        assert row["num_problems"] == 3 and row["n"] == 4
        assert set(row["sampled"]) == {"pass@1", "pass@4", "maj@4"}
        exact = json.loads((out / "eval" / _dir(name) / "exact" / "summary.json").read_text())["exact_coverage"]
        bound = pass_at_n_lower_bound([exact["log_p"][i] for i in subset], [1, 4]).mean(axis=0)
        assert row["exact"] == pytest.approx({"pass@1": bound[0], "pass@4": bound[1]})
        assert row["exact"]["pass@1"] <= row["exact"]["pass@4"]
        assert f"| {name} | {100 * row['sampled']['pass@1']:.1f}" in report
    assert "LOWER bound" in report

    # A rerun reuses every stage: no training, no generation, no exact-coverage forward pass.
    import align.evaluation.hf_backend as hf_backend
    import align.evaluation.runs as runs
    import align.training as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished training run was redone"))
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: pytest.fail("finished evaluations were regenerated"))
    monkeypatch.setattr(hf_backend, "HFBackend", lambda *a, **k: pytest.fail("finished exact coverage was redone"))
    assert align_main(["demo", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["difference"] == results["difference"]


def _points(value: float) -> str:
    points = 100 * value
    return f"{points:+.1e}" if 0 < abs(points) < 0.005 else f"{points:+.2f}"


def _dir(name: str) -> str:
    return {"base": "base", "cross-entropy": "sft", "DCO (N'=16)": "dco"}[name]


def _fake_evaluation(probabilities: list[float], sampled: dict[str, float]) -> dict:
    from align.evaluation.exact_coverage import coverage_block

    records = [{"id": f"p{i}", "log_p": math.log(p) if p else None} for i, p in enumerate(probabilities)]
    return {
        "exact": {"exact_coverage": coverage_block(records)},
        "sampled": {"num_problems": 2, "n": 16, "metrics": sampled, "stderr": dict.fromkeys(sampled, 0.05)},
    }


def test_demo_report_on_known_probabilities():
    """The report's numbers against closed forms: exact bound 1 - (1 - p)^N, DCO - CE paired by problem."""
    from align.demo import FULL
    from align.demo_report import collect_results, report_text

    ce_p = [0.5, 0.2, 0.0, 0.01] * 8
    dco_p = [0.4, 0.3, 0.001, 0.05] * 8
    sampled = {"pass@1": 0.25, "pass@16": 0.5, "maj@16": 0.25}
    evaluations = {
        "base": _fake_evaluation([0.001] * 32, sampled),
        "cross-entropy": _fake_evaluation(ce_p, sampled),
        "DCO (N'=16)": _fake_evaluation(dco_p, sampled),
    }
    results = collect_results(evaluations, ["p0", "p1"], FULL, {"training": 1.0}, "m")

    def bound(ps, n):
        return sum(1 - (1 - p) ** n for p in ps) / len(ps)

    for n in (1, 16, 256, 4096):
        d = results["difference"]["paired"][f"pass@{n}"]
        assert d["diff"] == pytest.approx(bound(dco_p, n) - bound(ce_p, n), abs=1e-7)
        assert d["low"] <= d["diff"] <= d["high"]
    # at N = 4096 no problem loses and two gain: shown; at N = 1 (-0.1 + 0.1 + 0.001 + 0.04) / 4
    assert results["difference"]["paired"]["pass@4096"]["shown"]
    assert results["difference"]["paired"]["pass@1"]["diff"] == pytest.approx(0.01025, abs=1e-7)
    row = results["cross_check"]["cross-entropy"]
    assert row["exact"] == pytest.approx({"pass@1": 0.35, "pass@16": 1 - (0.5**16 + 0.8**16) / 2})
    report = report_text(results)
    assert f"| 4096 | {100 * bound(ce_p, 4096):.1f} | {100 * bound(dco_p, 4096):.1f} |" in report
    d = results["difference"]["paired"]["pass@1"]
    assert f"| 1 | 17.8 | 18.8 | +1.03 | [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] |" in report
    exact_16 = 100 * row["exact"]["pass@16"]
    assert f"| cross-entropy | 25.0 ± 5.0 | 35.0 | 50.0 ± 5.0 | {exact_16:.1f} | 25.0 ± 5.0 |" in report
    low, high = results["exact"]["DCO (N'=16)"]["ci95"]["16"]
    assert 0 < low < bound(dco_p, 16) < high
    assert f"{100 * bound(dco_p, 16):.1f} [{100 * low:.1f}, {100 * high:.1f}]" in report


def test_demo_report_rejects_a_decreasing_exact_curve():
    from align.demo_report import check_exact_sane

    check_exact_sane("ok", {"curve": {"pass": [0.1, 0.2, 0.2]}})
    with pytest.raises(AssertionError, match="decreases"):
        check_exact_sane("bad", {"curve": {"pass": [0.1, 0.3, 0.2]}})
    with pytest.raises(AssertionError, match="not a probability"):
        check_exact_sane("bad", {"curve": {"pass": [0.1, 1.5]}})


def test_demo_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--output-dir", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    for method in ("sft", "dco"):
        assert f"align train {method} --config " in plan and f"smollm2-135m-instruct/{method}.yaml" in plan
    assert '"num_test": 8' in plan and '"num_sampled": 3' in plan and '"n": 4' in plan
    assert "exact coverage on 8 held-out problems" in plan and "sampled cross-check on the first 3 with n=4" in plan
    assert str(out) in plan and not out.exists()


def test_demo_full_size_plan(tmp_path, capsys):
    """`make demo`'s sizes: exact coverage on >= 256 held-out problems, a sampled cross-check on 16 of them."""
    from align.demo import FULL

    assert FULL.num_test >= 256 and FULL.num_sampled == 16 and FULL.n == 16
    assert align_main(["demo", "--output-dir", str(tmp_path / "demo"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "exact coverage on 256 held-out problems" in plan and "first 16 with n=16" in plan


def test_greedy_confidence_equals_teacher_forced_probability(tiny_model_dir):
    from align.diagnostics.confidence import greedy_confidence
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    prompts = ["What is 1 + 1?", "Compute $3 \\times 4 + 5$. Please reason step by step."]
    results = greedy_confidence(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    for prompt, result in zip(prompts, results):
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        completion_ids = torch.tensor([result["token_ids"]])
        assert completion_ids.shape[1] == result["num_tokens"] > 0
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        with torch.no_grad():
            logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[0, :, None]).sum().item()
        assert result["logp"] == pytest.approx(logp, abs=1e-4)
        assert result["prob"] == pytest.approx(math.exp(logp), rel=1e-4)
        assert 0.0 <= result["prob"] <= 1.0


@pytest.mark.slow
def test_demo_quick_with_smollm2(tmp_path):
    """What CI runs: the quick demo with the embedded SmolLM2-135M-Instruct."""
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "exact_coverage.png").exists()
