"""What `auto` precision means on this machine: bf16 where the hardware computes in it natively, float32 elsewhere.

Training (`bf16: auto` in a recipe) resolves to bf16 *mixed* precision — autocast around forward and backward, with
float32 master weights and optimizer state, i.e. TRL/transformers' `bf16=True` with the model loaded in float32 —
on a CUDA GPU that supports bf16 and on a CPU whose processor has native bf16 arithmetic; float32 otherwise.
Inference (`dtype: auto` in `align eval` and the PRM scorer) resolves to bf16 weights on the same hardware, float16
on a CUDA GPU without bf16, float32 otherwise.

A CPU computes bf16 natively when it has AVX-512 BF16 (`vdpbf16ps`, Cooper Lake / Zen 4 and later) or AMX tiles
(Sapphire Rapids and later): oneDNN then runs bf16 matmuls at 2-3x the float32 rate (measured on SmolLM2-135M, 2
threads: sampling 3.6x, a training step 1.85x under autocast). Without them bf16 is emulated and slower than float32.
torch reports both through `torch.cpu._is_avx512_bf16_supported()` / `torch.cpu._is_amx_tile_supported()` (the CPU
feature detection of its own kernels, via cpuinfo); where those private helpers are missing, the kernel's
`/proc/cpuinfo` flags `avx512_bf16` / `amx_bf16` are read instead.

`ALIGN_PRECISION=fp32` (or `bf16`) overrides what `auto` picks, for a whole run; a recipe's explicit `bf16: false` or
`--dtype float32` always wins over `auto`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


AUTO = "auto"
OVERRIDE_ENV = "ALIGN_PRECISION"
_CPUINFO_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this processor executes bf16 matmuls in hardware (AVX-512 BF16 or AMX)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return any(flag in flags for flag in _CPUINFO_FLAGS)


def _override() -> str | None:
    value = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in {"bf16", "fp32"}:
        raise ValueError(f"{OVERRIDE_ENV}={value!r}: use bf16 or fp32 (or unset it for auto)")
    return value


def bf16_is_native(device: str) -> bool:
    """Whether bf16 is the fast choice on `device` ("cpu", "cuda", "cuda:1", ...), before any override."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_native_bf16()


def auto_mixed_precision(use_cpu: bool) -> bool:
    """`bf16: auto` for training: True for bf16 autocast (float32 master weights), False for float32."""
    override = _override()
    if override is not None:
        return override == "bf16"
    import torch

    device = "cpu" if use_cpu or not torch.cuda.is_available() else "cuda"
    return bf16_is_native(device)


def resolve_inference_dtype(dtype: str, device: str) -> str:
    """`dtype: auto` for sampling and scoring: the torch dtype name to load weights in on `device`."""
    if dtype != AUTO:
        return dtype
    override = _override()
    if override is not None:
        return "bfloat16" if override == "bf16" else "float32"
    if bf16_is_native(device):
        return "bfloat16"
    if device.startswith("cuda"):
        return "float16"  # a CUDA GPU without bf16 (pre-Ampere) still computes fp16 natively
    return "float32"


def describe() -> dict:
    """What `auto` resolves to here, for `align env`, logs and summaries."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "override": os.environ.get(OVERRIDE_ENV) or None,
        "train_auto": "bf16 mixed" if auto_mixed_precision(use_cpu=not cuda) else "float32",
        "inference_auto": resolve_inference_dtype(AUTO, "cuda" if cuda else "cpu"),
    }
