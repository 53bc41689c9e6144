"""Generation backends by name: a registry (`hf`, `vllm`, `openai`, any registered later), `auto`, engine options.

`get_backend("auto", model)` picks vLLM when it is importable and a GPU is present, else transformers. Models are
anything `align.models.load_model_and_tokenizer` accepts: an alias (`smollm2-135m-instruct`), a local directory,
a Hub id, or a PEFT adapter directory (`openai` loads only its tokenizer and samples from a server). A new backend
is a `GenerationBackend` subclass with a `name`, made available with `register_backend(cls)`; `--backend NAME`
then builds it.

Each backend declares the engine options it accepts (`GenerationBackend.options`: name -> (type, help)). They are
passed as `--backend_kwargs key=value,key=value` or a YAML mapping (`backend_kwargs:` in an eval config); a name
the backend does not accept is refused with the list of those it does.
"""

from __future__ import annotations

from align.errors import InputError
from align.evaluation.generation import GenerationBackend
from align.evaluation.hf_backend import HFBackend
from align.evaluation.openai_backend import OpenAIBackend
from align.evaluation.vllm_backend import VLLMBackend


BACKEND_REGISTRY: dict[str, type[GenerationBackend]] = {
    backend.name: backend for backend in (HFBackend, VLLMBackend, OpenAIBackend)
}


def register_backend(cls: type[GenerationBackend]) -> type[GenerationBackend]:
    """Make a backend buildable as `get_backend(cls.name, ...)` / `--backend NAME` (usable as a class decorator)."""
    BACKEND_REGISTRY[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    """What `--backend` accepts: `auto` and every registered backend."""
    return ("auto", *BACKEND_REGISTRY)


def resolve_backend_name(name: str) -> str:
    """`auto` -> `vllm` if vLLM is importable and a GPU is present, else `hf`."""
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    if name != "auto":
        return name
    import torch

    return "vllm" if VLLMBackend.available() and torch.cuda.is_available() else "hf"


class BackendOptionsError(InputError):
    """`backend_kwargs` names an option the backend does not accept, or gives it a value of the wrong type."""


def parse_backend_kwargs(value: dict | str | None) -> dict:
    """`"tensor_parallel_size=2,enforce_eager=true"`, a YAML mapping as text (`"{max_model_len: 4096}"`), or a
    dict (from a YAML config) -> a dict. Values from `key=value` text stay strings: `check_backend_options`
    converts them to the option's type."""
    if not value:
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        import yaml

        value = yaml.safe_load(value)
    if isinstance(value, dict):
        return {str(key): item for key, item in value.items()}
    if not isinstance(value, str):
        raise BackendOptionsError(f"backend_kwargs must be a mapping or key=value,... text, got {value!r}")
    options = {}
    for item in value.split(","):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BackendOptionsError(f"backend_kwargs item {item!r} is not KEY=VALUE (e.g. tensor_parallel_size=2)")
        options[key.strip()] = text.strip()
    return options


_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def _typed(key: str, value, kind: type):
    """`value` as `kind`: text (from the command line) is converted; a YAML value must already have the type (an
    int is a float too, a bool is no int)."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool and text in _BOOLEANS:
            return _BOOLEANS[text]
        if kind is not bool:
            try:
                return kind(text)
            except ValueError:
                pass
    elif isinstance(value, bool):
        if kind is bool:
            return value
    elif isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return kind(value)
    raise BackendOptionsError(f"backend_kwargs: {key} must be {kind.__name__}, got {value!r}")


def check_backend_options(name: str, options: dict) -> dict:
    """`options` with each value converted to its declared type; refuses a name backend `name` does not accept.

    For `auto`, which is resolved only when the model is loaded, the option of any registered backend passes here;
    `get_backend` checks again against the backend that `auto` chose.
    """
    backends = BACKEND_REGISTRY.values() if name == "auto" else [BACKEND_REGISTRY[resolve_backend_name(name)]]
    accepted = {key: spec for backend in backends for key, spec in backend.options.items()}
    checked = {}
    for key, value in options.items():
        if key not in accepted:
            raise BackendOptionsError(
                f"backend_kwargs: backend {name!r} has no option {key!r}; it accepts: {', '.join(accepted) or 'none'}"
            )
        checked[key] = _typed(key, value, accepted[key][0])
    return checked


def get_backend(
    name: str, model: str, *, dtype="auto", batch_size: int | str = "auto", **options
) -> GenerationBackend:
    """Build the backend `name` (`auto` or a registered one) for `model`, with its engine `options`."""
    resolved = resolve_backend_name(name)
    backend = BACKEND_REGISTRY[resolved]
    if not backend.available():
        raise ImportError(backend.unavailable)
    try:
        options = check_backend_options(resolved, options)
    except BackendOptionsError as error:
        if resolved == name:
            raise
        raise BackendOptionsError(f"{error} (--backend {name} chose {resolved!r} here)") from None
    return backend(model, dtype=dtype, batch_size=batch_size, **options)
