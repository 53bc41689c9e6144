"""The `openai` backend: sampling through an OpenAI-compatible completions server (`vllm serve`, `trl vllm-serve`,
SGLang, the llama.cpp server, TGI), `POST {base_url}/completions`.

Align still renders the prompt (chat template and all, `align.data.prompts.render_prompt`) with the tokenizer of
`--model`, and sends that exact text; the server only continues it. One request per prompt asks for its n samples
(`n`, `temperature`, `top_p`, `max_tokens`, `seed`: `align.evaluation.sampling_params`, shared with the `vllm`
backend), from a thread pool of `max_concurrency` requests in flight; the server batches them (continuous batching).

How it matches the `hf` backend's records (same fields: completion, num_tokens, finish_reason):

- Stopping: the server stops at the model's end-of-sequence tokens (vLLM: the tokenizer's EOS and the
  `eos_token_id`s of generation_config.json, the set `hf` stops at) or at `max_tokens`. No `stop` strings are
  sent: `hf` stops on tokens, not text, and servers detokenize with special tokens skipped, so an EOS *string*
  would never match anyway. `finish_reason` `stop` (TGI: `eos_token`) is `stop`, `length` is `length`.
- `num_tokens` is what `hf` records: generated tokens, the EOS included. A `length` sample generated `max_tokens`
  tokens by definition; a `stop` sample counts its text's tokens under align's tokenizer, plus the EOS. Servers'
  `usage` is per request (the sum over its n choices), and not all count the EOS, so it is not used for this.
- The prompt: a chat template writes the BOS into the text, and `hf` then adds no special tokens
  (`generation.encode_prompt`); for a tokenizer that would add a second BOS, the request says
  `add_special_tokens: false` (a vLLM field). The server's `usage.prompt_tokens` is checked against align's count
  of the prompt, with a warning when they differ (another tokenizer, a second BOS).
- Seeds: one per request, from (run seed, prompt) only (`sampling_params.request_seed`), so a resumed or sharded
  run sends every prompt the request the first run sent. With `split_n` (servers that ignore `n`) each sample is
  its own request with `n = 1`, seeded from (run seed, prompt, sample index).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from align.errors import InputError
from align.evaluation.generation import Completion, GenerationBackend, SamplingConfig, encode_prompt
from align.evaluation.openai_client import ServedModelError, ServerClient, ServerRequestError
from align.evaluation.sampling_params import sampling_fields


logger = logging.getLogger("align.eval")

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
STOP_REASONS = frozenset({"stop", "eos_token", "stop_sequence"})  # OpenAI / vLLM / SGLang / llama.cpp; TGI
LENGTH_REASONS = frozenset({"length"})


class OpenAIBackend(GenerationBackend):
    """n completions per rendered prompt from `POST {base_url}/completions` (see the module docstring)."""

    name = "openai"
    options: ClassVar[dict[str, tuple[type, str]]] = {
        "base_url": (str, f"the server's OpenAI API root (default {DEFAULT_BASE_URL})"),
        "served_model": (str, "the model name the server serves (default: the only one GET /models lists)"),
        "api_key_env": (str, f"environment variable holding the API key, if any (default {DEFAULT_API_KEY_ENV})"),
        "max_concurrency": (int, "requests in flight at once (default 8)"),
        "timeout_s": (float, "seconds to wait for one request's answer (default 600)"),
        "max_retries": (int, "retries of a request after a transient failure (default 4)"),
        "retry_backoff_s": (float, "first retry delay, doubled each retry (default 1)"),
        "split_n": (bool, "one request per sample (n = 1), for servers that ignore n (default false)"),
    }

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        batch_size: int | str = "auto",
        base_url: str = DEFAULT_BASE_URL,
        served_model: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        max_concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 4,
        retry_backoff_s: float = 1.0,
        split_n: bool = False,
    ):
        from align.models import load_tokenizer

        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise InputError(f"--base-url {base_url!r} is not an http(s) URL, e.g. {DEFAULT_BASE_URL}")
        for key, value, low in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0)):
            if value < low:
                raise InputError(f"backend_kwargs: {key} must be >= {low}, got {value}")
        if timeout_s <= 0 or retry_backoff_s < 0:
            raise InputError(
                f"backend_kwargs: timeout_s must be > 0 and retry_backoff_s >= 0, got {timeout_s}, {retry_backoff_s}"
            )
        self.client = ServerClient(
            base_url,
            api_key=os.environ.get(api_key_env) or None,
            timeout_s=timeout_s,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            api_key_env=api_key_env,
        )
        self.served_model = self._check_served_model(served_model)  # before loading anything: fail fast
        self.tokenizer = load_tokenizer(_tokenizer_location(model))
        self.max_concurrency, self.split_n = max_concurrency, split_n
        # prompts handed over per generate call (the harness writes results between calls): enough to keep every
        # connection busy past the slowest request of a call
        self.batch_size = max(64, 2 * max_concurrency) if batch_size == "auto" else int(batch_size)
        self._warned_prompt_tokens = False

    def _check_served_model(self, asked: str | None) -> str:
        url = self.client.base_url
        try:
            listing = self.client.get("models")
        except ServerRequestError as error:
            if error.status != 404:
                raise
            if asked:  # a server without GET /models: take the name on trust
                return asked
            raise ServedModelError(
                f"{url} does not list its models (GET /models: 404): name it with --served-model"
            ) from None
        served = [str(entry.get("id")) for entry in listing.get("data", []) if isinstance(entry, dict)]
        if asked is None and len(served) == 1:
            return served[0]
        if asked is not None and asked in served:
            return asked
        listed = ", ".join(served) or "no model"
        if asked is None:
            raise ServedModelError(f"the server at {url} serves {listed}: choose one with --served-model NAME")
        raise ServedModelError(
            f"the server at {url} serves {listed}, not {asked!r}: pass one of them as --served-model (an adapter is "
            "served under the name given to `vllm serve --enable-lora --lora-modules NAME=PATH`)"
        )

    def prompts_per_call(self, n: int) -> int:
        return self.batch_size

    def engine(self) -> dict:
        return {
            "backend": self.name,
            "base_url": self.client.base_url,
            "served_model": self.served_model,
            "max_concurrency": self.max_concurrency,
            "prompts_per_call": self.batch_size,
        }

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        jobs = []  # (prompt index, the sample indices it answers, request body)
        for p, prompt in enumerate(prompts):
            base = {"model": self.served_model, "prompt": prompt, **prompt_fields(self.tokenizer, prompt)}
            if self.split_n:
                jobs += [
                    (p, [j], {**base, **sampling_fields(sampling, prompt, sample_index=j)}) for j in range(sampling.n)
                ]
            else:
                jobs.append((p, list(range(sampling.n)), {**base, **sampling_fields(sampling, prompt)}))
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        if not jobs:
            return results
        # only HTTP runs on the pool's threads; tokenizing (counts, checks) stays on this one, where a fast
        # tokenizer is never used by two threads at once
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)), thread_name_prefix="openai") as pool:
            futures = {pool.submit(self._request, body, len(indices)): (p, indices, body) for p, indices, body in jobs}
            try:
                for future in as_completed(futures):
                    p, indices, body = futures[future]
                    choices, usage = future.result()
                    self._check_prompt_tokens(body["prompt"], usage)
                    for j, choice in zip(indices, choices):
                        results[p][j] = self._completion(choice, body["max_tokens"])
            except BaseException:
                for future in futures:  # a failed request (or Ctrl-C) ends the call: send no more
                    future.cancel()
                raise
        return results

    def _request(self, body: dict, expected: int) -> tuple[list[dict], dict | None]:
        """The `expected` choices of one completions request, in index order, and its usage."""
        answer = self.client.post("completions", body)
        choices = sorted(
            (c for c in answer.get("choices") or [] if isinstance(c, dict)), key=lambda c: c.get("index", 0)
        )
        if len(choices) != expected:
            raise ServerRequestError(
                f"{self.client.base_url}/completions returned {len(choices)} choices for n={expected}: for a server "
                "that ignores n, pass --backend-kwargs split_n=true (one request per sample)"
            )
        return choices, answer.get("usage")

    def _completion(self, choice: dict, max_tokens: int) -> Completion:
        text, reason = choice.get("text") or "", choice.get("finish_reason")
        if reason in LENGTH_REASONS:
            return Completion(text=text, num_tokens=max_tokens, finish_reason="length")
        if reason not in STOP_REASONS:
            raise ServerRequestError(
                f"{self.client.base_url}/completions: a choice ended with finish_reason {reason!r}, neither a stop "
                "(end of sequence) nor length (max_tokens)"
            )
        generated = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Completion(text=text, num_tokens=min(generated + 1, max_tokens), finish_reason="stop")

    def _check_prompt_tokens(self, prompt: str, usage) -> None:
        served = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if served is None or self._warned_prompt_tokens:
            return
        ours = len(encode_prompt(self.tokenizer, prompt))
        if served != ours:
            self._warned_prompt_tokens = True
            logger.warning(
                "the server counts %d prompt tokens where align's tokenizer counts %d: it tokenizes the prompt "
                "differently (another tokenizer than --model's? a second BOS?), so its samples may not match hf's",
                served, ours,
            )  # fmt: skip


def prompt_fields(tokenizer, prompt: str) -> dict:
    """Extra request fields that make the server tokenize `prompt` as `hf` does (`encode_prompt`): when the text
    already starts with the BOS (a chat template wrote it) but the tokenizer would add one more, say so."""
    bos = tokenizer.bos_token
    if not (bos and prompt.startswith(bos)):
        return {}
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return {} if tokenizer(prompt, add_special_tokens=True)["input_ids"] == plain else {"add_special_tokens": False}


def _tokenizer_location(model: str) -> str:
    """Where `model`'s tokenizer is: the model directory, or for a PEFT adapter without one, its base model."""
    from align.models import resolve_model_path

    path = Path(resolve_model_path(model))
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "tokenizer_config.json").is_file():
        return json.loads(adapter.read_text())["base_model_name_or_path"]
    return str(path)


SERVER_FLAGS = ("base_url", "served_model", "api_key_env")


@dataclass
class ServerArguments:
    """The `--backend openai` flags of `align eval` / `align data`: shorthands for its backend options."""

    base_url: str | None = field(
        default=None,
        metadata={"help": f"--backend openai: the server's OpenAI API root (default {DEFAULT_BASE_URL})."},
    )
    served_model: str | None = field(
        default=None,
        metadata={
            "help": "--backend openai: the model name the server serves (default: the only one it lists). --model "
            "still names the tokenizer and chat template align renders prompts with. Part of the run's identity "
            "(run_config.json) when given: a run resumes only from the same served model."
        },
    )
    api_key_env: str | None = field(
        default=None,
        metadata={
            "help": f"--backend openai: the environment variable holding the API key (default {DEFAULT_API_KEY_ENV}; "
            "unset: none sent). The key itself never goes on the command line."
        },
    )

    def with_server_options(self, backend: str, options: dict) -> dict:
        """`options` (backend_kwargs) plus the server flags that were given; they need `--backend openai`."""
        given = {key: getattr(self, key) for key in SERVER_FLAGS if getattr(self, key) is not None}
        for key, value in given.items():
            flag = f"--{key.replace('_', '-')}"
            if backend != OpenAIBackend.name:
                raise ValueError(f"{flag} applies to --backend openai, not --backend {backend}")
            if key in options and options[key] != value:
                raise ValueError(f"{flag} {value!r} and backend_kwargs {key}={options[key]!r} disagree: give one")
        return {**options, **given}
