"""`--backend openai`: `align eval` against a real HTTP server on 127.0.0.1 that speaks the OpenAI completions API.

The server (stdlib `http.server`, in a thread) answers deterministically: sample j of a prompt is
`arithmetic_script(prompt)[j]` (samples 0-1 right, 2 wrong, 3 unanswered and cut at max_tokens), so pass@k is
known exactly. It records every request and the most requests it had in flight at once.
"""

import json
import socket
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.cli import main
from align.evaluation import openai_backend, vllm_backend
from align.evaluation.config import EvalConfig
from align.evaluation.generation import SamplingConfig, encode_prompt
from align.evaluation.harness import run_eval
from align.evaluation.openai_backend import OpenAIBackend, prompt_fields
from align.evaluation.openai_client import ServerUnavailableError
from align.evaluation.runs import RunConfigMismatchError
from align.evaluation.sampling_params import request_seed, sampling_fields
from align.models import load_tokenizer
from tests.scripted_backend import arithmetic_script


class FakeServer(ThreadingHTTPServer):
    """`GET /v1/models`, `POST /v1/completions`; `failures` are (status, message) answered to the next requests."""

    daemon_threads = True

    def __init__(self, tokenizer, models=("tiny",), delay_s=0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.tokenizer, self.models, self.delay_s = tokenizer, list(models), delay_s
        self.requests, self.failures, self.failed = [], [], 0
        self.in_flight = self.max_in_flight = 0
        self.prompt_token_offset = 0  # > 0: usage.prompt_tokens as a server with another tokenizer counts them
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def complete(self, body: dict) -> dict:
        texts = arithmetic_script(body["prompt"])
        choices = [
            {"index": j, "text": texts[j], "finish_reason": "length" if j == 3 else "stop"} for j in range(body["n"])
        ]
        prompt_tokens = len(encode_prompt(self.tokenizer, body["prompt"])) + self.prompt_token_offset
        # total usage over the choices, as vLLM answers: no per-choice counts
        return {"choices": choices[::-1], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 99}}

    def stop(self):
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def answer(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path != "/v1/models":
            return self.answer(404, {"detail": "Not Found"})
        self.answer(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.server.models]})

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            failure = server.failures.pop(0) if server.failures else None
            server.failed += failure is not None
            if failure is None:
                server.requests.append(body)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            time.sleep(server.delay_s)
            if failure is not None:
                status, message = failure
                return self.answer(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})
            self.answer(200, server.complete(body))
        finally:
            with server.lock:
                server.in_flight -= 1


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def server(tokenizer):
    fake = FakeServer(tokenizer)
    yield fake
    fake.stop()


def argv(model, output_dir, url, *extra):
    return [
        "eval", "--model", model, "--dataset", "synthetic", "--limit", "3", "--n", "4", "--max-new-tokens", "64",
        "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--backend", "openai", "--base-url", url,
        "--output-dir", str(output_dir), "--grader_workers", "1", "--no_progress", "--no_plot", *extra,
    ]  # fmt: skip


def read_samples(output_dir):
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_records(tiny_model_dir, tmp_path_factory):
    """The same 3 problems sampled in process by the `hf` backend: the records the `openai` backend must match."""
    output_dir = tmp_path_factory.mktemp("hf")
    fields = dict(dataset="synthetic", limit=3, n=2, max_new_tokens=4, backend="hf", grader_workers=1)
    run_eval(EvalConfig(model=tiny_model_dir, output_dir=str(output_dir), progress=False, plot=False, **fields))
    return read_samples(output_dir)


def test_eval_through_a_server_gives_hf_records_and_the_scripted_pass_at_k(
    server, tiny_model_dir, tokenizer, hf_records, tmp_path
):
    assert main(argv(tiny_model_dir, tmp_path, server.url)) == 0
    records = read_samples(tmp_path)
    assert [set(record) for record in records] == [set(record) for record in hf_records]
    assert {key for r in records for s in r["samples"] for key in s} == {
        key for r in hf_records for s in r["samples"] for key in s
    }
    # the server was sent exactly the text the hf backend tokenizes (chat template applied by align), once each
    prompts = [record["prompt"] for record in hf_records]
    assert [record["prompt"] for record in records] == prompts
    assert sorted(body["prompt"] for body in server.requests) == sorted(prompts)
    sampling = SamplingConfig(n=4, temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3)
    for body in server.requests:
        assert body == {"model": "tiny", "prompt": body["prompt"], **sampling_fields(sampling, body["prompt"])}
        assert body["seed"] == request_seed(3, body["prompt"]) and "stop" not in body
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["pass@1"] == pytest.approx(0.5)
    assert summary["metrics"]["pass@2"] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2): 2 of 4 right
    assert summary["metrics"]["pass@4"] == 1.0 and summary["backend"] == "openai"
    assert summary["served_model"] is None  # not named, so found by GET /models and recorded with each record
    assert summary["engine"] == {
        "backend": "openai",
        "base_url": server.url,
        "served_model": "tiny",
        "max_concurrency": 8,
        "prompts_per_call": 64,
    }
    for record in records:
        texts = arithmetic_script(record["prompt"])
        assert [s["completion"] for s in record["samples"]] == texts  # choices put back in index order
        assert [s["finish_reason"] for s in record["samples"]] == ["stop", "stop", "stop", "length"]
        counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts[:3]]
        assert [s["num_tokens"] for s in record["samples"]] == [*counts, 64]  # the EOS counted, as hf does
        assert [s["verdict"] for s in record["samples"]] == ["correct", "correct", "incorrect", "no_answer"]


def test_resume_asks_the_server_only_for_missing_problems(server, tiny_model_dir, tmp_path):
    config = dict(
        model=tiny_model_dir, dataset="synthetic", limit=4, n=4, max_new_tokens=32, backend="openai",
        base_url=server.url, served_model="tiny", output_dir=str(tmp_path), progress=False, plot=False,
        grader_workers=1,
    )  # fmt: skip
    first = run_eval(EvalConfig(**config))
    complete = read_samples(tmp_path)
    first_requests = {body["prompt"]: body for body in server.requests}
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    # killed after two problems, in the middle of writing the third
    (tmp_path / "samples.jsonl").write_text("\n".join(lines[:2]) + '\n{"id": "torn", "sampl')
    server.requests.clear()
    again = run_eval(EvalConfig(**config))
    missing = [record["prompt"] for record in complete[2:]]
    assert sorted(body["prompt"] for body in server.requests) == sorted(missing)
    assert all(body == first_requests[body["prompt"]] for body in server.requests)  # same seeds when resumed
    assert [r["samples"] for r in read_samples(tmp_path)] == [r["samples"] for r in complete]
    assert again["metrics"] == first["metrics"]
    # the served model is part of the run's identity: --model is only the tokenizer here
    with pytest.raises(RunConfigMismatchError, match="served_model: 'tiny' \\(existing\\) vs 'other' \\(now\\)"):
        run_eval(EvalConfig(**{**config, "served_model": "other"}))


def test_transient_errors_are_retried(server, tiny_model_dir, tmp_path, caplog):
    server.failures = [(503, "overloaded"), (502, "bad gateway")]
    with caplog.at_level("WARNING", logger="align.eval"):
        assert main(argv(tiny_model_dir, tmp_path, server.url, "--backend_kwargs", "retry_backoff_s=0.01")) == 0
    assert server.failed == 2 and len(server.requests) == 3  # every problem answered once, in the end
    assert "HTTP 503: overloaded; retrying" in caplog.text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["pass@1"] == pytest.approx(0.5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("align eval:")]


def test_no_server_is_one_line_naming_the_url(tiny_model_dir, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    began = time.perf_counter()
    retries = ("--backend_kwargs", "max_retries=2,retry_backoff_s=0.01")
    assert main(argv(tiny_model_dir, tmp_path, url, *retries)) == 2
    assert time.perf_counter() - began < 10
    (line,) = error_lines(capsys)
    assert f"no server at {url} (connection refused; 3 tries)" in line and "vllm serve" in line
    with pytest.raises(ServerUnavailableError):
        OpenAIBackend(tiny_model_dir, base_url=url, max_retries=0)


def test_another_served_model_is_one_line_listing_the_served_ones(server, tiny_model_dir, tmp_path, capsys):
    assert main(argv(tiny_model_dir, tmp_path, server.url, "--served-model", "smollm2")) == 2
    (line,) = error_lines(capsys)
    assert f"the server at {server.url} serves tiny, not 'smollm2'" in line and "--served-model" in line
    server.models = ["base", "base-dco"]  # vllm serve --enable-lora --lora-modules base-dco=...: name one
    assert main(argv(tiny_model_dir, tmp_path, server.url)) == 2
    (line,) = error_lines(capsys)
    assert "serves base, base-dco: choose one with --served-model NAME" in line
    assert not server.requests


def test_a_refused_request_is_one_line_with_the_servers_message(server, tiny_model_dir, tmp_path, capsys):
    message = "This model's maximum context length is 2048 tokens. However, you requested 4096 tokens."
    server.failures = [(400, message)]
    assert main(argv(tiny_model_dir, tmp_path, server.url, "--backend_kwargs", "max_concurrency=1")) == 2
    (line,) = error_lines(capsys)
    assert f"{server.url}/completions answered HTTP 400: {message}" in line
    assert len(server.requests) <= 2  # the failed call stopped sending (at most the one in flight went on)


def test_concurrency_is_bounded_and_split_n_sends_one_request_per_sample(tokenizer, tiny_model_dir, caplog):
    slow = FakeServer(tokenizer, delay_s=0.05)
    try:
        prompts = [f"What is {a} + 1?" for a in range(6)]
        sampling = SamplingConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=7)
        backend = OpenAIBackend(tiny_model_dir, base_url=slow.url, max_concurrency=2)
        rows = backend.generate(prompts, sampling)
        assert slow.max_in_flight == 2 and len(slow.requests) == 6
        assert [[c.text for c in row] for row in rows] == [arithmetic_script(p)[:3] for p in prompts]
        slow.requests.clear()
        split = OpenAIBackend(tiny_model_dir, base_url=slow.url, max_concurrency=3, split_n=True)
        slow.max_in_flight, slow.prompt_token_offset = 0, 1
        with caplog.at_level("WARNING", logger="align.eval"):
            split.generate(prompts, sampling)
        assert slow.max_in_flight == 3 and len(slow.requests) == 18
        assert {(b["prompt"], b["seed"]) for b in slow.requests} == {
            (p, request_seed(7, p, j)) for p in prompts for j in range(3)
        }
        assert all(body["n"] == 1 for body in slow.requests)
        assert caplog.text.count("the server counts") == 1  # a different prompt tokenization is reported, once
    finally:
        slow.stop()


def test_both_engines_build_their_sampling_parameters_with_one_function(server, tiny_model_dir, monkeypatch):
    built = []

    def spy(sampling, prompt, **kwargs):
        built.append(prompt)
        return sampling_fields(sampling, prompt, **kwargs)

    given = {}
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kwargs: kwargs

    class LLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, prompts, params, use_tqdm, lora_request):
            given["params"] = params
            outputs = [types.SimpleNamespace(text="x", token_ids=[1], finish_reason="stop")]
            return [types.SimpleNamespace(outputs=outputs * p["n"]) for p in params]

    vllm.LLM = LLM
    monkeypatch.setitem(__import__("sys").modules, "vllm", vllm)
    monkeypatch.setattr(vllm_backend, "sampling_fields", spy)
    monkeypatch.setattr(openai_backend, "sampling_fields", spy)
    prompts = ["What is 1 + 2?", "What is 5 - 3?"]
    sampling = SamplingConfig(n=2, temperature=0.0, max_new_tokens=8, seed=4)
    vllm_backend.VLLMBackend(tiny_model_dir).generate(prompts, sampling)
    OpenAIBackend(tiny_model_dir, base_url=server.url).generate(prompts, sampling)
    assert sorted(built) == sorted(prompts * 2)
    sent = {
        body["prompt"]: {k: v for k, v in body.items() if k not in ("model", "prompt")} for body in server.requests
    }
    assert given["params"] == [sent[prompt] for prompt in prompts] == [sampling_fields(sampling, p) for p in prompts]
    assert given["params"][0]["top_p"] == 1.0  # greedy


def test_a_tokenizer_that_adds_a_bos_is_told_not_to_add_a_second(tiny_model_dir):
    from tokenizers.processors import TemplateProcessing

    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_fields(tokenizer, prompt) == {}  # the tiny tokenizer adds nothing: a plain OpenAI request
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert prompt_fields(tokenizer, prompt) == {"add_special_tokens": False}
    assert prompt_fields(tokenizer, "Problem: 1 + 2\nSolution:") == {}  # plain prompt: the server adds it, as hf


def test_server_flags_map_onto_backend_options(tmp_path):
    common = dict(output_dir=str(tmp_path), backend="openai")
    config = EvalConfig(**common, base_url="http://h:1/v1", served_model="m", api_key_env="MY_KEY")
    assert config.backend_kwargs == {"base_url": "http://h:1/v1", "served_model": "m", "api_key_env": "MY_KEY"}
    yaml_like = EvalConfig(**common, backend_kwargs={"served_model": "m", "max_concurrency": 4}, served_model="m")
    assert yaml_like.backend_kwargs == {"served_model": "m", "max_concurrency": 4}
    with pytest.raises(ValueError, match="--served-model 'm' and backend_kwargs served_model='n' disagree"):
        EvalConfig(**common, backend_kwargs="served_model=n", served_model="m")
    with pytest.raises(ValueError, match="--base-url applies to --backend openai, not --backend hf"):
        EvalConfig(output_dir=str(tmp_path), backend="hf", base_url="http://h:1/v1")
