"""`batch_size: auto`: KV-cache arithmetic against a closed form, the memory budget and cap, and the record of it."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from align.evaluation import batching
from align.evaluation.config import EvalConfig
from align.evaluation.harness import run_eval


CONFIG = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def test_kv_bytes_per_token_closed_form():
    # 2 (key and value) x 2 layers x 2 KV heads x head_dim 16 x 2 bytes
    assert batching.kv_bytes_per_token(CONFIG, "bfloat16") == 2 * 2 * 2 * 16 * 2
    assert batching.kv_bytes_per_token(CONFIG, "float32") == 2 * 2 * 2 * 16 * 4


def test_auto_batch_fits_the_budget_and_respects_the_cap():
    per_sequence = 100 * batching.kv_bytes_per_token(CONFIG, "float32") + batching.LOGIT_COPIES * 4 * 300
    free = int(10 * per_sequence / batching.MEMORY_SHARE)
    assert batching.auto_batch_size(CONFIG, "float32", 100, "cpu", free_bytes=free) == 10
    assert batching.auto_batch_size(CONFIG, "float32", 100, "cpu", free_bytes=free - 4 * per_sequence) == 9
    assert batching.auto_batch_size(CONFIG, "float32", 100, "cpu", free_bytes=1) == 1
    assert batching.auto_batch_size(CONFIG, "float32", 100, "cpu", free_bytes=10**15) == batching.BATCH_CAP["cpu"]
    assert batching.auto_batch_size(CONFIG, "float32", 100, "cuda:0", free_bytes=10**15) == batching.BATCH_CAP["cuda"]


@pytest.mark.parametrize("bad", ["0", "-3", "many", 2.5, None])
def test_bad_batch_sizes_get_one_line(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto'"):
        batching.parse_batch_size(bad)


def test_batch_size_parses_from_text():
    assert batching.parse_batch_size("AUTO") == "auto" and batching.parse_batch_size("12") == 12


def test_auto_batch_is_logged_and_stored_in_the_summary(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="align.eval")
    config = EvalConfig(
        model=tiny_model_dir, dataset="synthetic", limit=3, n=2, max_new_tokens=4, output_dir=str(tmp_path),
        progress=False, grader_workers=1,
    )  # fmt: skip
    assert config.batch_size == "auto"
    summary = run_eval(config)
    engine = summary["engine"]
    assert engine["backend"] == "hf" and engine["auto_batch"] is True and engine["dtype"] == "float32"
    assert 1 <= engine["batch_size"] <= batching.BATCH_CAP["cpu"]
    assert f"batch_size auto -> {engine['batch_size']} sequences" in caplog.text
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["engine"] == engine


def test_hf_backend_keeps_the_fast_lm_head_path(tiny_model_dir, tmp_path):
    """A frozen model (a merged PEFT adapter) makes torch's matmul copy the LM head per sequence (see hf_backend)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.evaluation.hf_backend import HFBackend

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear")
    )
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    backend = HFBackend(str(adapter), batch_size=4)
    assert not hasattr(backend.model, "peft_config")  # merged
    assert all(parameter.requires_grad for parameter in backend.model.parameters())
