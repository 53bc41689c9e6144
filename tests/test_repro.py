"""`align repro dco` end to end on the tiny model (checkpoints per epoch, an exact-coverage block per checkpoint, the
sampled cross-check, report, figure, resume), its input errors, and the claims' verdicts on hand-made intervals."""

import json

import pytest

from align.cli import main as align_main
from align.experiments.dco_report import (
    CLAIM_DCO,
    CLAIM_LARGE_N,
    CLAIM_PASS_1,
    LARGE_NS,
    TABLE_NS,
    check_claims,
    interval_verdict,
    measurable,
)
from align.experiments.runs import slug as _slug


def test_repro_dco_sweep_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "repro"
    argv = ["repro", "dco", "--quick", "--model", tiny_model_dir, "--output-dir", str(out), "--epochs", "2", "1"]
    assert align_main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert results["seeds"] == [0]  # --quick trains one seed
    # base + (cross-entropy, DCO N'=4) x epochs (1, 2), in that order.
    assert [(row["method"], row["seed"], row["epoch"]) for row in rows] == [
        ("base", None, 0),
        ("cross-entropy", 0, 1),
        ("cross-entropy", 0, 2),
        ("DCO N'=4", 0, 1),
        ("DCO N'=4", 0, 2),
    ]
    for row in rows:
        exact = [row["exact"][f"pass@{n}"] for n in TABLE_NS]
        assert all(0.0 <= p <= 1.0 for p in exact) and exact == sorted(exact)
        assert all(low <= high for low, high in row["exact_ci95"].values())
        assert row["curve"]["n"][-1] == 10_000 and len(row["curve"]["pass"]) == len(row["curve"]["n"])
        sampled = [row["sampled"][f"pass@{k}"] for k in (1, 4)]  # --quick samples n = 4
        assert all(0.0 <= p <= 1.0 for p in sampled) and sampled == sorted(sampled)
        assert set(row["exact_on_sampled_subset"]) == {"pass@1", "pass@4"}
        assert 0.0 <= row["greedy_confidence"] <= 1.0 and 0.0 <= row["greedy_accuracy"] <= 1.0
    # Every evaluated checkpoint has its exact-coverage block on all 8 test problems and a sampled summary on 3.
    for name in ("base", "cross_entropy-s0-e1", "cross_entropy-s0-e2", "dco_n4-s0-e1", "dco_n4-s0-e2"):
        block = json.loads((out / "eval" / name / "exact" / "summary.json").read_text())["exact_coverage"]
        assert block["num_problems"] == 8 and len(block["log_p"]) == 8 and "lower bound" in block["note"].lower()
        assert json.loads((out / "eval" / name / "sampled" / "summary.json").read_text())["num_problems"] == 3
    by_key = {(row["method"], row["epoch"]): row for row in rows}
    # Paired differences: each method against its own first epoch, DCO against cross-entropy at the same epoch.
    assert (
        by_key[("cross-entropy", 1)]["vs_first_epoch"] is None
        and by_key[("cross-entropy", 2)]["vs_cross_entropy"] is None
    )
    for diff in (by_key[("cross-entropy", 2)]["vs_first_epoch"], by_key[("DCO N'=4", 1)]["vs_cross_entropy"]):
        assert set(diff) == {f"pass@{n}" for n in TABLE_NS}
        assert all(cell["low"] <= cell["diff"] <= cell["high"] and cell["n"] == 8 for cell in diff.values())
    dco_2, ce_2 = by_key[("DCO N'=4", 2)], by_key[("cross-entropy", 2)]
    assert dco_2["vs_cross_entropy"]["pass@1"]["diff"] == pytest.approx(
        dco_2["exact"]["pass@1"] - ce_2["exact"]["pass@1"]
    )
    # One verdict per claim and seed, in the words of the brief.
    assert [(c["claim"], c["seed"]) for c in results["claims"]] == [
        (CLAIM_PASS_1, 0),
        (CLAIM_LARGE_N, 0),
        (CLAIM_DCO.format(method="DCO N'=4"), 0),
    ]
    assert all(c["verdict"] in {"held", "refuted", "not shown"} for c in results["claims"])
    # Each method trained once for max(epochs) and kept one checkpoint per epoch (what the rows evaluated).
    for method in ("cross_entropy", "dco_n4"):
        checkpoints = sorted((out / "train" / f"{method}-s0").glob("checkpoint-*"))
        assert len(checkpoints) == 2, checkpoints
    report = (out / "report.md").read_text()
    assert "| DCO N'=4 | 0 | 2 |" in report and "| cross-entropy | 0 | 1 |" in report and "| base | - | 0 |" in report
    assert "## Claims" in report and "lower bound" in report and "DCO minus cross-entropy" in report
    assert (out / "repro-dco.png").stat().st_size > 0
    config = json.loads((out / "repro_config.json").read_text())
    assert config["epochs"] == [1, 2] and config["evaluation"] == "exact-coverage"

    # A rerun reuses every training run and evaluation (sampled, exact and confidence).
    import align.evaluation.hf_backend as hf_backend
    import align.evaluation.runs as runs
    import align.models as models
    import align.training as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished training run was redone"))
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: pytest.fail("finished evaluations were regenerated"))
    monkeypatch.setattr(hf_backend, "HFBackend", lambda *a, **k: pytest.fail("exact coverage was recomputed"))
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("confidence was remeasured"))
    assert align_main(argv) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows

    # Other sizes need another output directory: one line naming the difference, no traceback.
    assert align_main([*argv[:-2], "1", "3"]) == 2
    error = capsys.readouterr().err
    assert "different configuration" in error and "epochs: [1, 2] (existing) vs [1, 3] (now)" in error


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n", "0"], "must be >= 1"),
        (["--levels", "6"], "must be >= 1"),
        (["--epochs", "0", "2"], "must be >= 1"),
        (["--seeds", "0", "-1"], "--seeds: got [0, -1]"),
        (["--objectives", "grpo"], "belong to `align repro pass-k`"),
    ],
)
def test_repro_rejects_bad_arguments(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "dco", "--quick", "--output-dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_method_labels_become_shell_safe_directory_names():
    assert _slug("DCO N'=16") == "dco_n16"
    assert _slug("cross-entropy") == "cross_entropy"


def _cell(diff, low, high, mean_a=0.5, mean_b=0.5):
    return {"diff": diff, "low": low, "high": high, "mean_a": mean_a, "mean_b": mean_b}


def test_interval_verdict_is_decided_by_the_interval_alone():
    assert interval_verdict([_cell(0.05, 0.01, 0.09)], +1) == "held"
    assert interval_verdict([_cell(0.05, -0.01, 0.09)], +1) == "not shown"  # the interval holds 0
    assert interval_verdict([_cell(0.05, 0.0, 0.09)], +1) == "not shown"  # touching 0 is not above it
    assert interval_verdict([_cell(-0.05, -0.09, -0.01)], +1) == "refuted"
    assert interval_verdict([_cell(-0.05, -0.09, -0.01)], -1) == "held"
    # Every cell must agree for "held"; one cell against the claim refutes it.
    assert interval_verdict([_cell(-0.05, -0.09, -0.01), _cell(-0.01, -0.03, 0.01)], -1) == "not shown"
    assert interval_verdict([_cell(-0.05, -0.09, -0.01), _cell(0.02, 0.01, 0.03)], -1) == "refuted"
    assert interval_verdict([], +1) == "not shown"


def test_only_measurable_differences_are_judged():
    comparison = {
        "pass@1": _cell(2e-20, 1e-20, 3e-20, mean_a=1e-20, mean_b=3e-20),  # a model that never answers
        "pass@16": _cell(0.004, 0.002, 0.006, mean_a=0.003, mean_b=0.02),  # one run above 1 %: measurable
        "pass@256": _cell(-0.1, -0.2, -0.05, mean_a=0.9, mean_b=0.8),
        "pass@4096": _cell(-0.01, -0.02, -0.005, mean_a=0.995, mean_b=0.985),  # one run below 99 %: measurable
        "pass@10000": _cell(-1e-6, -2e-6, -5e-7, mean_a=0.999999, mean_b=0.999998),  # both saturated
    }
    assert list(measurable(comparison, TABLE_NS)) == [16, 256, 4096]


def _comparison(**cells):
    """A compare_exact_coverage result: `cells` by N (pass@1 and LARGE_NS), the rest neutral."""
    return {f"pass@{n}": cells.get(f"n{n}", _cell(0.0, -0.01, 0.01)) for n in TABLE_NS}


def test_claims_per_seed_on_hand_made_intervals():
    ce, dco = "cross-entropy", "DCO N'=16"
    methods, seeds, epochs = [ce, dco], [0, 1], [1, 2, 4]
    up, down, flat = _cell(0.05, 0.02, 0.08), _cell(-0.05, -0.08, -0.02), _cell(0.0, -0.02, 0.02)
    comparisons = {}
    for seed in seeds:
        for method in methods:
            for epoch in epochs:
                comparisons[(method, seed, epoch)] = {"vs_first_epoch": None, "vs_cross_entropy": None}
    # Seed 0: the paper's picture. CE's pass@1 up, its pass@N at every large N down; DCO above CE at large N.
    comparisons[(ce, 0, 4)]["vs_first_epoch"] = _comparison(n1=up, **{f"n{n}": down for n in LARGE_NS})
    comparisons[(dco, 0, 4)]["vs_cross_entropy"] = _comparison(**{f"n{n}": up for n in LARGE_NS})
    # Seed 1: pass@1 not shown, pass@256 up (refutes the fall), DCO below CE at one N (refutes the limit).
    comparisons[(ce, 1, 4)]["vs_first_epoch"] = _comparison(n1=flat, n256=up, n4096=down, n10000=down)
    comparisons[(dco, 1, 4)]["vs_cross_entropy"] = _comparison(n256=up, n4096=down, n10000=flat)
    # An intermediate epoch against the claim does not count: the claims compare the last epoch with the first.
    comparisons[(ce, 0, 2)]["vs_first_epoch"] = _comparison(n1=down)
    claims = check_claims(comparisons, methods, seeds, epochs)
    verdicts = {(c["claim"], c["seed"]): c["verdict"] for c in claims}
    claim_dco = CLAIM_DCO.format(method=dco)
    assert verdicts == {
        (CLAIM_PASS_1, 0): "held",
        (CLAIM_LARGE_N, 0): "held",
        (claim_dco, 0): "held",
        (CLAIM_PASS_1, 1): "not shown",
        (CLAIM_LARGE_N, 1): "refuted",
        (claim_dco, 1): "refuted",
    }
    (why,) = [c["why"] for c in claims if (c["claim"], c["seed"]) == (CLAIM_LARGE_N, 1)]
    assert "N=256 +5.0 [+2.0, +8.0]" in why and "epoch 4 minus epoch 1" in why


def test_claims_without_a_second_epoch_or_headroom_are_not_shown():
    ce, dco = "cross-entropy", "DCO N'=16"
    saturated = _cell(1e-6, 5e-7, 2e-6, mean_a=0.9999, mean_b=0.99999)
    comparisons = {
        (ce, 0, 1): {"vs_first_epoch": None, "vs_cross_entropy": None},
        (dco, 0, 1): {
            "vs_first_epoch": None,
            "vs_cross_entropy": _comparison(**{f"n{n}": saturated for n in LARGE_NS}),
        },
    }
    claims = check_claims(comparisons, [ce, dco], [0], [1])
    assert [c["verdict"] for c in claims] == ["not shown"] * 3
    assert "only epoch 1" in claims[0]["why"] and "both runs above 99%" in claims[2]["why"]
    # A difference of 1e-20 between two runs that never answer is "significant" but not measurable: not shown.
    never = _cell(2e-20, 1e-20, 3e-20, mean_a=1e-20, mean_b=3e-20)
    comparisons[(ce, 0, 2)] = {"vs_first_epoch": _comparison(n1=never), "vs_cross_entropy": None}
    comparisons[(dco, 0, 2)] = {"vs_first_epoch": None, "vs_cross_entropy": _comparison()}
    claims = check_claims(comparisons, [ce, dco], [0], [1, 2])
    assert claims[0]["claim"] == CLAIM_PASS_1 and claims[0]["verdict"] == "not shown"
