"""Shared fixtures: everything offline, a tiny Llama built once per session, the embedded SmolLM2 for slow tests."""

import os


# Set before transformers / datasets / trl are imported anywhere in the test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
# Tests check logic, to 1e-5 and across batchings and process counts: `auto` precision means float32 in every test
# (and in the processes they launch); tests/test_precision.py unsets it to check what `auto` picks.
os.environ["ALIGN_PRECISION"] = "fp32"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Llama (2 layers, hidden 64, 4 heads, 2 KV heads) and byte-level BPE tokenizer."""
    from align.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct as a local safetensors directory (converted once, then cached)."""
    from align.models import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture
def cpu_args(tmp_path):
    """TrainingArguments fields every CPU test needs (TRL defaults to bf16 and gradient checkpointing)."""
    return dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
