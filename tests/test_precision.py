"""`auto` precision: what it resolves to, the override, and `bf16: auto` in recipes and on the command line."""

from __future__ import annotations

import pytest
import torch
from trl import SFTConfig

from align import precision
from align.configs import AlignModelConfig, DataArguments, RecipeParser


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU does (True) or does not (False) compute bf16 natively."""

    def set_native(value: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    return set_native


def test_detection_agrees_with_the_kernel_flags():
    with open("/proc/cpuinfo") as handle:
        flags = next((line for line in handle if line.startswith("flags")), "").split()
    assert precision.cpu_has_native_bf16() == any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "amx_tile"))


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_on_cpu(native, has_bf16):
    native(has_bf16)
    assert precision.auto_mixed_precision(use_cpu=True) is has_bf16
    assert precision.resolve_inference_dtype("auto", "cpu") == ("bfloat16" if has_bf16 else "float32")


def test_explicit_dtype_and_override_win(native, monkeypatch):
    native(True)
    assert precision.resolve_inference_dtype("float32", "cpu") == "float32"
    monkeypatch.setenv(precision.OVERRIDE_ENV, "fp32")
    assert precision.auto_mixed_precision(use_cpu=True) is False
    assert precision.resolve_inference_dtype("auto", "cpu") == "float32"
    native(False)
    monkeypatch.setenv(precision.OVERRIDE_ENV, "bf16")
    assert precision.resolve_inference_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setenv(precision.OVERRIDE_ENV, "half")
    with pytest.raises(ValueError, match="ALIGN_PRECISION='half': use bf16 or fp32"):
        precision.auto_mixed_precision(use_cpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("where", ["recipe", "command line"])
def test_bf16_auto_in_recipes(native, tmp_path, has_bf16, where):
    native(has_bf16)
    recipe = tmp_path / "recipe.yaml"
    body = f"output_dir: {tmp_path / 'out'}\nreport_to: none\nuse_cpu: true\n"
    recipe.write_text(body + ("bf16: auto\n" if where == "recipe" else ""))
    argv = ["--config", str(recipe)] + (["--bf16", "auto"] if where == "command line" else [])
    _, training_args, _ = RecipeParser((DataArguments, SFTConfig, AlignModelConfig)).parse_args_and_config(argv)
    assert training_args.bf16 is has_bf16


def test_explicit_bf16_false_beats_auto_in_the_recipe(native, tmp_path):
    native(True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nreport_to: none\nuse_cpu: true\nbf16: auto\n")
    parser = RecipeParser((DataArguments, SFTConfig, AlignModelConfig))
    _, training_args, _ = parser.parse_args_and_config(["--config", str(recipe), "--bf16", "false"])
    assert training_args.bf16 is False
