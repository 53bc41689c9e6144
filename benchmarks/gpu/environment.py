"""What the GPU kit ran on: Python, the packages align needs (with any installed version outside align's or TRL's
requirements), the GPU and its driver. It is the first line of gpu.jsonl and the header of gpu.md."""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import shutil
import subprocess


PACKAGES = (
    "align", "torch", "transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "huggingface-hub",
    "tokenizers", "pyarrow", "fsspec", "math-verify", "numpy",
)  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


DISTRIBUTIONS = ("align", "trl", "datasets", "peft", "deepspeed", "pydantic", "math-verify", "latex2sympy2_extended")


def requirement_mismatches(distributions=DISTRIBUTIONS) -> list[str]:
    """Requirements of these distributions that the installed packages do not meet (wheels travel with
    `--no-deps`, so pip checks none of them there)."""
    from packaging.requirements import Requirement

    problems = []
    for distribution in distributions:
        if _version(distribution) is None:
            problems.append(f"{distribution}: not installed")
            continue
        for line in metadata.requires(distribution) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            installed = _version(requirement.name)
            if installed is None:
                problems.append(f"{distribution} needs {requirement}: not installed")
            elif not requirement.specifier.contains(installed, prereleases=True):
                problems.append(f"{distribution} needs {requirement}: {installed} installed")
    return problems


def gpu() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(0)
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    return info


def describe() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "packages": {name: _version(name) for name in PACKAGES},
        "requirement_mismatches": requirement_mismatches(),
        "gpu": gpu(),
    }
