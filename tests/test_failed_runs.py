"""A run that fails before producing anything never poisons its output directory: the corrected command into the same
directory runs (`align eval`, `align data`, `align repro`), while one with results still refuses another config."""

import json
from pathlib import Path

import pytest

import align.pipeline
from align.cli import main as align_main


REPO = Path(__file__).resolve().parents[1]


def fails(argv: list[str]) -> None:
    """`align <argv>` fails: an error exit code, or an exception from a model path that does not exist."""
    try:
        code = align_main(argv)
    except (OSError, ValueError):
        return
    assert code != 0


def test_a_failed_eval_leaves_its_directory_usable(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    sizes = ["--limit", "2", "--n", "2", "--max_new_tokens", "8", "--progress", "false", "--grader_workers", "1"]
    command = ["eval", "--config", str(REPO / "eval" / "synthetic.yaml"), "--output-dir", str(out), *sizes]
    fails([*command, "--model", str(tmp_path / "no-such-model")])
    assert align_main([*command, "--model", tiny_model_dir]) == 0
    assert json.loads((out / "run_config.json").read_text())["model"] == tiny_model_dir
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    # with samples recorded, the identity binds: another configuration is refused
    assert align_main([*command, "--model", tiny_model_dir, "--temperature", "1.0"]) == 2
    error = capsys.readouterr().err
    assert "holds samples drawn with a different configuration (sampling.temperature: 0.6 (existing) vs 1.0" in error


def test_a_failed_data_build_leaves_its_directory_usable(tiny_model_dir, tmp_path):
    out = tmp_path / "cov"
    sizes = ["--dataset", "synthetic", "--limit", "2", "--k", "2", "--max_new_tokens", "8", "--progress", "false"]
    command = ["data", "coverage", *sizes, "--grader_workers", "1", "--output", str(out)]
    fails([*command, "--model", str(tmp_path / "no-such-model")])
    assert align_main([*command, "--model", tiny_model_dir]) == 0
    assert json.loads((out / "summary.json").read_text())["num_problems"] == 2


class StopAfterTheBaseModel(Exception):
    pass


def test_a_failed_repro_leaves_its_directory_usable(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "repro"
    command = ["repro", "dco", "--quick", "--output-dir", str(out)]
    fails([*command, "--model", str(tmp_path / "no-such-model")])

    def stop(*args, **kwargs):
        raise StopAfterTheBaseModel

    monkeypatch.setattr(align.pipeline, "train_recipe", stop)  # the rest of the sweep is tests/test_repro.py's
    with pytest.raises(StopAfterTheBaseModel):
        align_main([*command, "--model", tiny_model_dir])  # the corrected command: the base model gets evaluated
    assert json.loads((out / "repro_config.json").read_text())["model"] == tiny_model_dir
    assert (out / "eval" / "base" / "exact" / "exact_coverage.jsonl").read_text()
    assert (out / "eval" / "base" / "sampled" / "samples.jsonl").read_text()
    capsys.readouterr()
    # with results recorded, the identity binds: another configuration is refused, in one line
    assert align_main([*command, "--model", tiny_model_dir, "--n", "2"]) == 2
    error = capsys.readouterr().err
    assert f"align repro: {out} holds results of a different configuration (n: 4 (existing) vs 2 (now))" in error
    assert error.count("\n") == 1
