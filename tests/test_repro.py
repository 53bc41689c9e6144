"""`align repro dco` end to end on the tiny model: checkpoints per epoch, evaluation rows, report, figure, resume."""

import json

import pytest

from align.cli import main as align_main
from align.commands.repro import _slug


def test_repro_dco_sweep_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "repro"
    argv = ["repro", "dco", "--quick", "--model", tiny_model_dir, "--output-dir", str(out), "--epochs", "2", "1"]
    assert align_main(argv) == 0

    rows = json.loads((out / "results.json").read_text())
    # base + (cross-entropy, DCO N'=4) x epochs (1, 2), in that order.
    assert [(row["method"], row["epoch"]) for row in rows] == [
        ("base", 0),
        ("cross-entropy", 1),
        ("cross-entropy", 2),
        ("DCO N'=4", 1),
        ("DCO N'=4", 2),
    ]
    for row in rows:
        passes = [row[f"pass@{k}"] for k in (1, 2, 4)]
        assert all(0.0 <= p <= 1.0 for p in passes) and passes == sorted(passes)
        assert 0.0 <= row["greedy_confidence"] <= 1.0 and 0.0 <= row["greedy_accuracy"] <= 1.0
    # Each method trained once for max(epochs) and kept one checkpoint per epoch (what the rows evaluated).
    for method in ("cross_entropy", "dco_n4"):
        checkpoints = sorted((out / "train" / method).glob("checkpoint-*"))
        assert len(checkpoints) == 2, checkpoints
    report = (out / "report.md").read_text()
    assert "| DCO N'=4 | 2 |" in report and "| cross-entropy | 1 |" in report
    assert (out / "repro-dco.png").stat().st_size > 0
    assert json.loads((out / "repro_config.json").read_text())["epochs"] == [1, 2]

    # A rerun reuses every training run and evaluation.
    import align.evaluation.runs as runs
    import align.training as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished training run was redone"))
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: pytest.fail("finished evaluations were regenerated"))
    assert align_main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == rows


@pytest.mark.parametrize("flags", [["--n", "0"], ["--levels", "6"], ["--epochs", "0", "2"]])
def test_repro_rejects_bad_sizes(flags, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "dco", "--quick", "--output-dir", str(tmp_path), *flags])
    assert "must be >= 1" in capsys.readouterr().err


def test_method_labels_become_shell_safe_directory_names():
    assert _slug("DCO N'=16") == "dco_n16"
    assert _slug("cross-entropy") == "cross_entropy"
