"""JSON over HTTP to an OpenAI-compatible server, with retries, and the one-line errors `align eval` reports.

The stdlib (`urllib.request`) is enough: one request per prompt, each on its own connection, from a bounded thread
pool (`align.evaluation.openai_backend`), so no HTTP client library joins align's dependencies.

Transient failures are retried with exponential backoff (`retry_backoff_s`, doubled each time, at most
`MAX_BACKOFF_S`, or the server's `Retry-After` when longer): no connection (refused, reset, dropped: a server still
starting or restarting), a timeout, and HTTP 429/500/502/503/504 (overloaded, or a proxy in front of it). Anything
else the server refuses (4xx) is the request's fault and is reported at once with the server's own message. All of
them are `ServerError`s, `align.errors.InputError`s, which `align` prints as one line with exit status 2.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from align.errors import InputError


logger = logging.getLogger("align.eval")

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})


class ServerError(InputError):
    """A problem with the server `--backend openai` samples from (see the subclasses)."""


class ServerUnavailableError(ServerError):
    """Nothing answers at the base URL, or it keeps timing out, after every retry."""


class ServedModelError(ServerError):
    """The server does not serve the model asked for (or serves several and none was named)."""


class ServerRequestError(ServerError):
    """The server refused a request (4xx, or 5xx after every retry) or answered something unusable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ServerClient:
    """GET/POST JSON under `base_url` (e.g. `http://127.0.0.1:8000/v1`), retrying transient failures."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 4
    retry_backoff_s: float = 1.0
    api_key_env: str = "OPENAI_API_KEY"  # only to name it in an error message
    _opener: urllib.request.OpenerDirector = field(init=False, repr=False)

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # a local server is never reached through the http_proxy of the environment (which urllib would use)
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, path: str) -> dict:
        return self._request(path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._request(path, body)

    def _request(self, path: str, body: dict | None) -> dict:
        url = f"{self.base_url}/{path}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        tries = self.max_retries + 1
        for attempt in range(tries):
            retry_after, status, timed_out = None, None, False
            try:
                request = urllib.request.Request(
                    url, data=data, headers=headers, method="GET" if data is None else "POST"
                )
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    text = response.read().decode("utf-8", errors="replace")
                return _parse(text, url)
            except urllib.error.HTTPError as error:  # before OSError: an HTTPError is one, but the server answered
                status, failure = error.code, f"HTTP {error.code}: {server_message(error)}"
                if status not in TRANSIENT_STATUS:
                    raise ServerRequestError(f"{url} answered {failure}{self._hint(status)}", status) from None
                retry_after = _seconds(error.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut off, unknown host
                reason = getattr(error, "reason", error)
                timed_out = isinstance(reason, TimeoutError)
                failure = f"no answer within {self.timeout_s:g} s" if timed_out else _describe(reason)
            if attempt + 1 < tries:
                delay = min(MAX_BACKOFF_S, self.retry_backoff_s * 2**attempt)
                delay = max(delay, min(MAX_BACKOFF_S, retry_after or 0.0))
                logger.warning("%s: %s; retrying in %.3g s (try %d of %d)", url, failure, delay, attempt + 2, tries)
                time.sleep(delay)
        if status is not None:
            raise ServerRequestError(f"{url} answered {failure} ({tries} tries)", status)
        if timed_out:
            raise ServerUnavailableError(
                f"{url}: {failure} ({tries} tries): raise --backend-kwargs timeout_s=SECONDS, or lower max_concurrency"
            )
        raise ServerUnavailableError(
            f"no server at {self.base_url} ({failure}; {tries} tries): start one with `vllm serve MODEL --port PORT` "
            "(eval/README.md, `--backend openai`), or point --base-url at it"
        )

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return f" (the API key is read from ${self.api_key_env}; --api-key-env names another variable)"
        if status == 404:
            return f" (is {self.base_url} the server's OpenAI API root, ending in /v1?)"
        return ""


def server_message(error: urllib.error.HTTPError) -> str:
    """The error message in a server's error answer, on one line: OpenAI's `{"error": {"message": ...}}`, vLLM's
    older `{"message": ...}`, FastAPI's `{"detail": ...}`, or the start of the text."""
    try:
        text = error.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    message = text
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        inner = answer.get("error")
        inner = inner.get("message", inner) if isinstance(inner, dict) else inner
        message = inner or answer.get("message") or answer.get("detail") or text
    message = " ".join(str(message).split()) or error.reason or "no message"
    return message[:500]


def _parse(text: str, url: str) -> dict:
    try:
        answer = json.loads(text)
    except ValueError:
        raise ServerRequestError(f"{url} answered text that is not JSON: {' '.join(text.split())[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ServerRequestError(f"{url} answered {type(answer).__name__} JSON, not an object")
    return answer


def _describe(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ConnectionError):
        return "connection dropped"
    return " ".join(str(reason).split()) or type(reason).__name__


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff alone will do
