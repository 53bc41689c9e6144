"""The GPU kit (benchmarks/gpu/, docs/gpu.md) cannot rot: its tiny CPU run passes every check in CI.

The slow test runs `bash benchmarks/gpu/run.sh --tiny --device cpu OUTDIR` once, with the deliberately failing check
switched on: that check is recorded as failed and every other check still runs and is ok, except the DeepSpeed
ones, which the CPU run skips with a logged reason. The fast tests cover the budget alarm, the check selection, the
table and `wheels.sh --dry-run` (no network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu import checks
from benchmarks.gpu.report import COLUMNS, table


REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"


@pytest.mark.slow
def test_tiny_cpu_run_records_every_check(tmp_path):
    env = {**os.environ, checks.FAIL_ENV: "1", "PYTHON": sys.executable}
    for variable in (checks.SUBSET_ENV, checks.BUDGET_ENV):
        env.pop(variable, None)
    env.pop("GPU_KIT_DEEPSPEED_ON_CPU", None)
    began = time.monotonic()
    proc = subprocess.run(
        ["bash", str(RUN), "--tiny", "--device", "cpu", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    environment, records = lines[0], {record["check"]: record for record in lines[1:]}
    assert environment["check"] == "environment" and environment["packages"]["trl"]
    assert list(records) == ["deliberate_failure", *(check.name for check in checks.CHECKS)]
    assert records["deliberate_failure"]["status"] == "failed"
    assert "deliberate failure" in records["deliberate_failure"]["error"]
    for name, record in records.items():
        if name == "deliberate_failure":
            continue
        if name.startswith("deepspeed_"):
            assert record["status"] == "skipped" and "DeepSpeed on CPU" in record["reason"], record
            continue
        assert record["status"] == "ok", record
        assert record.get("tokens_per_s") or record.get("samples_per_s"), record
        assert record["peak_mib"], record
        if name != "prm_scoring":  # the only check without a baseline
            assert record["ratios"] and all(value > 0 for value in record["ratios"].values()), record
    assert records["attention_entropy_short"]["kernel"] in ("fused", "eager")
    markdown = (tmp_path / "gpu.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    for name in records:
        assert f"| {name} | {records[name]['status']} |" in markdown
    print(f"tiny CPU run: {time.monotonic() - began:.0f} s")


def test_a_check_over_its_budget_is_stopped_and_skipped(tmp_path):
    from benchmarks.gpu.kit import Kit

    kit = Kit("cpu", tiny=True, workdir=tmp_path)
    began = time.monotonic()
    record = checks.run_check(kit, checks.Check("sleeper", lambda kit: time.sleep(30) or {}, 30), budget=1)
    assert time.monotonic() - began < 10
    assert record["status"] == "skipped" and "budget of 1 s" in record["reason"]
    failing = checks.run_check(kit, checks.Check("raiser", lambda kit: 1 / 0, 30), budget=5)
    assert failing["status"] == "failed" and failing["error"].startswith("ZeroDivisionError")


def test_check_selection(monkeypatch):
    assert [c.name for c in checks.selected("hf_generation,sft_vs_dco_full")] == ["sft_vs_dco_full", "hf_generation"]
    with pytest.raises(SystemExit, match="unknown check"):
        checks.selected("no_such_check")
    monkeypatch.setenv(checks.FAIL_ENV, "1")
    assert checks.selected(None)[0].name == "deliberate_failure"


def test_table_rows():
    records = [
        {"check": "a", "status": "ok", "wall_s": 1.0, "ratios": {"dco": 1.01}, "baseline": "trl_sft",
         "tokens_per_s": {"dco": 10.0}, "peak_mib": {"dco": 5.0}, "memory": "cuda max_memory_allocated",
         "setting": "x | y"},
        {"check": "b", "status": "skipped", "wall_s": 0.0, "reason": "no time"},
    ]  # fmt: skip
    lines = table(records).splitlines()
    assert lines[2] == "| a | ok | dco 1.01 (vs trl_sft) | dco 10.0 | dco 5.0 | 1.0 | x \\| y |"
    assert lines[3] == "| b | skipped |  |  |  | 0.0 | no time |"


def test_wheels_dry_run_lists_the_packages_without_network():
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "wheels.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    import importlib.metadata as metadata

    for name in ("trl", "datasets", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "pydantic"):
        assert f"{name}=={metadata.version(name)}" in proc.stdout
    assert f"deepspeed=={metadata.version('deepspeed')}" in proc.stdout
    assert 'carry: ["benchmarks/gpu/wheels"]' in proc.stdout


def test_run_sh_needs_an_output_directory():
    proc = subprocess.run(["bash", str(RUN), "--tiny"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "output directory" in proc.stderr
