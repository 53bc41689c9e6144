"""PRIME across processes: 2 processes x per-device batch 2 must reproduce 1 process x batch 4, step for step (and
2 x 1 reproduce 1 x 2, where every group of K = 2 is split over the ranks).

GRPO's sampling depends on the process layout, so tests/prime_distributed_run.py replaces generation by a
deterministic function of (step, prompt, copy index): filler tokens and a right or wrong boxed answer, so outcomes
vary within groups and the PRM's log-ratios are non-trivial. Everything else is the real trainer, and the parts that
only exist with several processes are what is checked: the PRM's gradients averaged by hand (one all-reduce), the
token rewards padded and gathered so that every rank computes the advantages of whole groups and keeps its slice, the
accuracy filter on gathered outcomes, and the policy's own DDP / ZeRO-2 step.

Per step, the logged loss, policy grad norm and entropy, and PRIME's metrics (PRM loss, grad norm and accuracy,
process reward, outcome accuracy, advantages, filtered share) match the 1-process run to 1e-5; at the end both
ranks hold identical policy and PRM parameters, which equal the 1-process run's to 1e-6 of each tensor's abs-sum.
ZeRO-3 is not covered: it fails at the first PRM forward ("RuntimeError: 'weight' must be 2-D"). Under ZeRO-3,
transformers' from_pretrained partitions the PRM (zero.Init) but nothing hands it to a DeepSpeed engine, so its
weights stay empty shards; the PRM also runs through TRL's fused LM head, which gathers ZeRO-3 parameters
in its forward and backward whenever ZeRO-3 is on, so a replicated PRM needs both kept outside ZeRO-3.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.distributed import resolve_accelerate_config


pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "prime_distributed_run.py"
STEPS = 3
METRICS = (
    "loss",
    "grad_norm",
    "entropy",
    "prime/outcome_accuracy",
    "prime/filtered_frac",
    "prime/process_reward_mean",
    "prime/advantage_abs_mean",
    "prime/prm_loss",
    "prime/prm_accuracy",
    "prime/prm_grad_norm",
)
# Variant -> (script options, per-device batch of the 2-process run; the 1-process run has twice as many). With
# batch 1 and K = 2 every group is split over the two ranks: the leave-one-out baselines need the gathered rewards.
VARIANTS = {
    "all_groups": ((), 2),
    "accuracy_filter": (("--accuracy-filter",), 2),
    "split_groups": ((), 1),
}


def run_prime(model_dir: str, output_dir: Path, variant: str, config: str | None = None) -> Path:
    """One run of the launch script: plain `python` with the whole batch, or `accelerate launch` of 2 processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    options, per_device = VARIANTS[variant]
    script = [str(SCRIPT), model_dir, str(output_dir), *options]
    if config is None:
        command = [sys.executable, *script, "--per-device-batch", str(2 * per_device)]
    else:
        env.update(ALIGN_VERIFY_SYNC="1", ALIGN_EXPECTED_PROCESSES="2")
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
        command = [*launcher, "--config_file", str(resolve_accelerate_config(config)), *script]
        command += ["--per-device-batch", str(per_device)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return output_dir


def step_logs(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in entry.items() if k in METRICS} for entry in history if "loss" in entry]


def fingerprints(output_dir: Path) -> list[dict]:
    found = json.loads((output_dir / "fingerprints.json").read_text())
    assert found["world_size"] == len(found["ranks"])
    return found["ranks"]


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    """The reference run of each variant: one process, the global batch, checked to be non-degenerate."""
    cache = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            out = run_prime(tiny_model_dir, tmp_path_factory.mktemp(f"prime-single-{variant}"), variant)
            logs = step_logs(out)
            assert len(logs) == STEPS
            # Mixed groups (outcome advantages), learned token rewards (process advantages), and the filter at work.
            assert any(0 < e["prime/outcome_accuracy"] < 1 for e in logs)
            assert logs[0]["prime/process_reward_mean"] == 0.0  # the PRM starts as the policy: log-ratios 0
            assert abs(logs[1]["prime/process_reward_mean"]) > 1e-5
            if variant == "accuracy_filter":
                assert any(0 < e["prime/filtered_frac"] < 1 for e in logs)
            cache[variant] = out
        return cache[variant]

    return get


def assert_steps_match(reference: Path, run: Path) -> None:
    """Every logged metric of every step of `run` equals the reference run's to 1e-5."""
    expected, got = step_logs(reference), step_logs(run)
    assert len(got) == STEPS
    for step, (want, have) in enumerate(zip(expected, got, strict=True), start=1):
        assert sorted(have) == sorted(want), f"step {step}: logged metrics differ"
        for name, value in want.items():
            assert have[name] == pytest.approx(value, abs=1e-5), f"step {step}: {name}"


@pytest.mark.parametrize(
    ("config", "variant"),
    [
        ("cpu_ddp", "all_groups"),
        ("cpu_zero2", "all_groups"),
        ("cpu_ddp", "accuracy_filter"),
        ("cpu_ddp", "split_groups"),
    ],
)
def test_two_processes_match_one(config, variant, tiny_model_dir, tmp_path, single_process):
    reference = single_process(variant)
    out = run_prime(tiny_model_dir, tmp_path / "run", variant, config)

    assert_steps_match(reference, out)

    # Every rank ends with the same policy (align's own check, and per tensor) and the same PRM.
    sync = json.loads((out / "sync_check.json").read_text())
    assert sync["world_size"] == 2
    assert sync["fingerprints"][0] == pytest.approx(sync["fingerprints"][1], rel=1e-9, abs=1e-9)
    ranks = fingerprints(out)
    assert len(ranks) == 2
    for model in ("policy", "prm"):
        first, second = ranks[0][model], ranks[1][model]
        assert first.keys() == second.keys()
        for name in first:
            assert second[name] == pytest.approx(first[name], rel=1e-9, abs=1e-9), f"{model} {name}"
        # ... and it is the 1-process run's: [sum, abs-sum, sum of squares] of each tensor to 1e-6 of its abs-sum.
        alone = fingerprints(reference)[0][model]
        assert alone.keys() == first.keys()
        for name, stats in alone.items():
            assert first[name] == pytest.approx(stats, abs=1e-6 * stats[1] + 1e-9), f"{model} {name} vs 1 process"
