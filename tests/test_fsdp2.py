"""FSDP2 launched for real on CPU: 2 processes over gloo through `accelerate launch`, every trainer of CASES.

accelerate does not run FSDP on CPU by itself (platform.md section 3): tests/fsdp2_cpu_entry.py applies a test-only
workaround in each launched process, then runs `align train`, with tests/fsdp2_cpu.yaml (FSDP2, transformer-block
wrapping, FULL_STATE_DICT, reshard after forward). What these runs prove, per trainer: accelerate's FSDP2 path is
taken (align logs `type=FSDP`; every trainable parameter of the prepared model is a DTensor whose local shard is half
of it on each rank), the 2 x batch-2 run reproduces the 1 x batch-4 loss trajectory, the full parameters are the
same on both ranks (align's ALIGN_VERIFY_SYNC fingerprint, gathered with full_tensor()), and the consolidated
model.safetensors the run saves (and, for sft, its last checkpoint's) reloads with from_pretrained and equals the
1-process run's saved model. Also LoRA (sharded adapters, saved adapter = the 1-process one) and PRIME (sharded
policy, replicated PRM). The margin case runs without its entanglement diagnostics, which refuse FSDP.
Only GPUs can show NCCL behaviour, mixed precision under FSDP (these runs are fp32), cpu_ram_efficient_loading,
memory savings and real sampling under FSDP (the PRIME script replaces generation).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import CASES, LORA_FIELDS, STEPS, losses, write_recipe

from align.cli import main as align_main


pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "fsdp2_cpu_entry.py"
CONFIG = REPO / "tests" / "fsdp2_cpu.yaml"
# platform.md section 3's route: TrainingArguments builds a gloo group, not a CPU state (without the workaround,
# use_cpu: true is plain DDP; with it, FSDP too, which the PRIME test relies on).
FSDP_FIELDS = {"use_cpu": False, "ddp_backend": "gloo"}
# The entanglement diagnostics need unsharded parameters (the margin trainer refuses FSDP with them).
FSDP_WITHOUT = {"margin_dpo": ("entanglement_steps", "entanglement_pairs")}
# The sft run also writes a checkpoint at its last step (FULL_STATE_DICT model + optimizer), at no extra launch.
FSDP_EXTRA = {"sft": {"save_strategy": "steps", "save_steps": STEPS}}
# Saved weights vs the 1-process run. AdamW's per-element normalization turns a float-rounding difference in a
# near-zero gradient (batch 4 in one process vs 2 x 2 reduced) into an update difference of up to the learning rate.
# Measured on the sft case: one weight of ~100k differs by 2.2e-6 (3 steps move every weight ~2e-3), and a plain DDP
# run differs from the 1-process run by the same 2.2e-6 while FSDP2 and DDP agree to 7.5e-9; margin_dpo has one weight
# off by 1.1e-5. So: all but 0.1% of the weights within ATOL, and none further than the run's whole step budget
# (learning rates summed over the steps, 2e-3 here, doubled).
ATOL = 1e-6
MAX_OUTLIER_SHARE = 1e-3
MAX_DIFF = 4e-3
FSDP_LOG_LINE = "distributed: type=FSDP world_size=2 backend=gloo"


def fsdp_case_fields(case: str) -> dict:
    fields = dict(CASES[case][1])
    for key in FSDP_WITHOUT.get(case, ()):
        fields.pop(key)
    return fields


def launch_fsdp(recipe: Path, method: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ALIGN_VERIFY_SYNC": "1",
        "ALIGN_TEST_SHARD_REPORT": "1",
        "ALIGN_EXPECTED_PROCESSES": "2",
        "OMP_NUM_THREADS": "1",
    }
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), str(ENTRY)]
    command = [*launcher, "train", method, "--config", str(recipe)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_really_fsdp(proc: subprocess.CompletedProcess, output_dir: Path) -> None:
    """align's setup line says FSDP, and each rank's prepared model holds half of every trainable parameter."""
    assert FSDP_LOG_LINE in proc.stderr
    reports = [json.loads((output_dir / f"fsdp_shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] and reports[0].keys() == reports[1].keys()
    for name, first in reports[0].items():
        second = reports[1][name]
        assert first["class"] == second["class"] == "DTensor", name
        assert first["shape"] == second["shape"], name
        rows = first["shape"][0]  # FSDP2 shards dim 0; the tiny Llama's are all even
        assert first["local"] == second["local"] == [rows // 2, *first["shape"][1:]], name


def assert_ranks_identical(output_dir: Path) -> None:
    check = json.loads((output_dir / "sync_check.json").read_text())
    assert check["world_size"] == 2
    first, second = check["fingerprints"]
    assert first == pytest.approx(second, rel=1e-9, abs=1e-9)


def assert_saved_model_matches(output_dir: Path, reference_dir: Path) -> None:
    """The consolidated model reloads outside FSDP, no tensor is an empty shard, and it is the 1-process model (up to
    the AdamW outliers explained at ATOL)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    params = dict(model.named_parameters())
    assert params and all(p.numel() > 0 for p in params.values())
    saved, expected = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert saved.keys() == expected.keys()
    outliers = total = 0
    for name in expected:
        assert saved[name].shape == expected[name].shape, name
        if name in params:
            assert torch.equal(params[name].detach(), saved[name]), name
        diff = (saved[name] - expected[name]).abs()
        assert diff.max().item() <= MAX_DIFF, f"{name}: max |diff| {diff.max().item():.2e}"
        outliers += int((diff > ATOL).sum())
        total += diff.numel()
    assert outliers <= MAX_OUTLIER_SHARE * total, f"{outliers} of {total} weights differ by more than {ATOL}"


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    """Reference runs: one process, batch 4 (= 2 processes x 2); returns the output directory."""
    cache = {}

    def get(case: str, fields: dict) -> Path:
        key = (case, json.dumps(fields, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"fsdp-single-{case}")
            recipe = write_recipe(
                out / "recipe.yaml", tiny_model_dir, out / "run", {**fields, "per_device_train_batch_size": 4}
            )
            assert align_main(["train", CASES[case][0], "--config", str(recipe)]) == 0
            cache[key] = out / "run"
        return cache[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_two_processes_match_one(case, tiny_model_dir, tmp_path, single_process):
    fields = fsdp_case_fields(case)
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_model_dir, run, {**fields, **FSDP_EXTRA.get(case, {}), **FSDP_FIELDS}
    )
    proc = launch_fsdp(recipe, CASES[case][0])
    assert_really_fsdp(proc, run)
    reference = single_process(case, fields)
    distributed = losses(run)
    assert len(distributed) == STEPS
    assert distributed == pytest.approx(losses(reference), rel=1e-6, abs=1e-5)
    assert_ranks_identical(run)
    assert_saved_model_matches(run, reference)
    if case in FSDP_EXTRA:
        assert_saved_model_matches(run / f"checkpoint-{STEPS}", reference)


def test_fsdp2_lora_two_processes_match_one(tiny_model_dir, tmp_path):
    """LoRA under FSDP2: the adapters are sharded DTensors too, and the saved adapter is the 1-process one."""
    lora = LORA_FIELDS
    single = tmp_path / "single"
    recipe = write_recipe(tmp_path / "single.yaml", tiny_model_dir, single, {**lora, "per_device_train_batch_size": 4})
    assert align_main(["train", "sft", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    proc = launch_fsdp(write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, run, {**lora, **FSDP_FIELDS}), "sft")
    assert_really_fsdp(proc, run)
    shards = json.loads((run / "fsdp_shards-rank0.json").read_text())
    assert shards and all(".lora_" in name for name in shards)  # only the adapters train
    assert losses(run) == pytest.approx(losses(single), rel=1e-6, abs=1e-5)
    assert_ranks_identical(run)
    saved = load_file(run / "adapter_model.safetensors")
    expected = load_file(single / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for name, want in expected.items():
        assert (saved[name] - want).abs().max().item() <= ATOL, name


def test_fsdp2_prime_two_processes_match_one(tiny_model_dir, tmp_path):
    """PRIME under FSDP2 (tests/prime_distributed_run.py, its generation made layout-independent): the policy is
    sharded by FSDP2, the PRM is a second, replicated model outside it whose gradients PRIME all-reduces by hand.
    Every logged metric matches the 1-process run; the PRM is identical on both ranks and equal to the 1-process
    one; the policy's per-rank [sum, abs-sum, sum of squares] are of its local shards (the script reads parameters
    as they are), which add up to the full tensor's, equal to the 1-process policy's."""
    from test_prime_distributed import SCRIPT, assert_steps_match, fingerprints, run_prime

    reference = run_prime(tiny_model_dir, tmp_path / "single", "all_groups")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_VERIFY_SYNC": "1", "ALIGN_EXPECTED_PROCESSES": "2"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), str(ENTRY)]
    # The script sets use_cpu=True: the workaround turns that MULTI_CPU state into FSDP as well.
    command = [*launcher, str(SCRIPT), tiny_model_dir, str(run), "--per-device-batch", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed: type=FSDP world_size=2" in proc.stderr

    assert_steps_match(reference, run)
    assert_ranks_identical(run)
    ranks, alone = fingerprints(run), fingerprints(reference)[0]
    assert len(ranks) == 2
    for name, stats in alone["prm"].items():
        assert ranks[0]["prm"][name] == pytest.approx(ranks[1]["prm"][name], rel=1e-9, abs=1e-9), name
        assert ranks[0]["prm"][name] == pytest.approx(stats, abs=1e-6 * stats[1] + 1e-9), f"prm {name}"
    sharded = 0
    for name, stats in alone["policy"].items():
        first, second = ranks[0]["policy"][name], ranks[1]["policy"][name]
        sharded += first != second
        full = [a + b for a, b in zip(first, second, strict=True)]
        assert full == pytest.approx(stats, abs=1e-6 * stats[1] + 1e-9), f"policy {name}"
    assert sharded == len(alone["policy"])  # every policy tensor: the ranks hold different halves
