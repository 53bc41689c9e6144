"""The pass@N harness end to end: records, resuming, config checks, PRM plug-in, re-grading, backends, sharding."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from align.data.loaders import load_problems
from align.data.prompts import render_prompt
from align.data.schema import Problem
from align.evaluation import runs, scoring
from align.evaluation.backends import get_backend, resolve_backend_name
from align.evaluation.config import EvalConfig
from align.evaluation.generation import SamplingConfig, encode_prompt
from align.evaluation.harness import run_eval
from align.evaluation.hf_backend import HFBackend
from align.evaluation.records import SamplesFileError
from align.evaluation.runs import RunConfigMismatchError
from align.evaluation.sample_and_grade import sample_and_grade
from align.evaluation.sampling import SeededSampler, sequence_seed
from align.grading import Grader
from tests.scripted_backend import ScriptedBackend, arithmetic_script


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=3.0) as pool:
        yield pool


def problem(pid: str, answer: str, level: int = 1, subject: str = "S") -> Problem:
    return Problem(id=pid, problem=f"Problem {pid}", solution="", answer=answer, level=level, subject=subject)


def test_records_hold_verdicts_answers_and_equivalence_groups(grader):
    completions = {
        "Problem a": [
            "$\\boxed{0.5}$",
            "$\\boxed{\\frac12}$",
            "$\\boxed{0.25}$",
            "$\\boxed{\\frac{1}{4}}$",
            "$\\boxed{3}$",
            "no idea",
        ]
    }
    backend = ScriptedBackend(lambda prompt: completions[prompt.split("\n")[0].removeprefix("Problem: ")])
    sampling = SamplingConfig(n=6)
    (record,) = sample_and_grade(
        [problem("a", "1/2")], backend, grader, sampling, prompt_style="plain", progress=False
    )
    verdicts = [s["verdict"] for s in record["samples"]]
    assert verdicts == ["correct", "correct", "incorrect", "incorrect", "incorrect", "no_answer"]
    assert [s["group"] for s in record["samples"]] == [0, 0, 1, 1, 2, None]  # 0.25 ~ 1/4, grouped by math-verify
    assert record["num_correct"] == 2 and record["prompt"].startswith("Problem: Problem a")
    assert record["samples"][4]["extracted"] == "3" and record["samples"][5]["extracted"] is None


def test_resume_skips_done_problems_even_after_a_torn_write(tmp_path, grader):
    problems = load_problems("synthetic", "test", limit=4).problems
    path = tmp_path / "samples.jsonl"
    sampling = SamplingConfig(n=4)
    first = ScriptedBackend(arithmetic_script)
    kwargs = {"prompt_style": "plain", "output_path": path, "progress": False}
    records = sample_and_grade(problems[:3], first, grader, sampling, **kwargs)
    assert first.calls == 2  # 3 problems, 2 per call
    with open(path, "a") as handle:
        handle.write('{"id": "torn", "samp')  # a run killed in the middle of writing a record
    second = ScriptedBackend(arithmetic_script)
    again = sample_and_grade(problems, second, grader, sampling, **kwargs)
    assert second.calls == 1 and len(second.prompts_seen) == 1  # only the 4th problem is new
    assert again[:3] == records
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [p.id for p in problems]


def eval_config(output_dir, **overrides) -> EvalConfig:
    fields = dict(
        dataset="synthetic",
        limit=3,
        n=4,
        max_new_tokens=8,
        backend="hf",
        output_dir=str(output_dir),
        progress=False,
        grader_workers=1,
    )
    return EvalConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """`align eval` of the tiny model: n=4 on 3 synthetic problems (shared by the tests below)."""
    output_dir = tmp_path_factory.mktemp("tiny-eval")
    summary = run_eval(eval_config(output_dir, model=tiny_model_dir))
    return output_dir, summary


def test_eval_writes_samples_summary_and_plot(tiny_run):
    output_dir, summary = tiny_run
    assert {"samples.jsonl", "summary.json", "passk.png", "run_config.json"} <= {p.name for p in output_dir.iterdir()}
    records = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["samples"]) == 4 for r in records)
    assert summary["ks"] == [1, 2, 4] and set(summary["metrics"]) == {
        f"{m}@{k}" for m in ("pass", "pass_all", "maj") for k in (1, 2, 4)
    }
    assert set(summary["ci95"]) == set(summary["stderr"]) == set(summary["metrics"])
    assert all(low <= summary["metrics"][key] <= high for key, (low, high) in summary["ci95"].items())
    assert summary["samples"]["total"] == 12 and summary["by_level"]["1"]["num_problems"] == 3
    assert summary["sampling"] == {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8, "seed": 0}
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0] or summary["versions"]["torch"]
    assert json.loads((output_dir / "summary.json").read_text()) == summary


def test_rerun_generates_nothing_and_reproduces_the_summary(tiny_run, tiny_model_dir, monkeypatch):
    output_dir, summary = tiny_run
    before = (output_dir / "summary.json").read_bytes()
    created = []
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: created.append(a) or get_backend(*a, **k))
    assert run_eval(eval_config(output_dir, model=tiny_model_dir)) == summary
    assert created == []  # nothing left to sample: the model is not even loaded
    assert (output_dir / "summary.json").read_bytes() == before


def test_rerun_with_other_sampling_settings_is_refused(tiny_run, tiny_model_dir):
    output_dir, _ = tiny_run
    with pytest.raises(RunConfigMismatchError, match=r"sampling\.temperature: 0\.6 \(existing\) vs 1\.0 \(now\)"):
        run_eval(eval_config(output_dir, model=tiny_model_dir, temperature=1.0))


def test_a_run_that_failed_before_its_first_sample_does_not_bind_its_directory(tmp_path, caplog):
    """`align eval --model <typo>` fails after writing run_config.json; the corrected command into the same
    directory must run, not be refused as "a different configuration" (the directory holds no samples)."""
    problems = load_problems("synthetic", "test", limit=2).problems

    def collect(model: str, backend_factory):
        config = eval_config(tmp_path, model=model, prompt_style="plain")
        return runs.collect_samples(problems, config, 4, tmp_path, backend_factory=backend_factory)

    def unloadable(*args, **kwargs):
        raise OSError("no such model: typo")

    def scripted(*args, **kwargs):
        return ScriptedBackend(arithmetic_script)

    with pytest.raises(OSError, match="no such model"):
        collect("typo", unloadable)
    assert json.loads((tmp_path / "run_config.json").read_text())["model"] == "typo"
    with caplog.at_level("WARNING", logger="align.eval"):
        records = collect("scripted", scripted)
    assert [record["id"] for record in records] == [problem.id for problem in problems]
    assert json.loads((tmp_path / "run_config.json").read_text())["model"] == "scripted"
    replaced = "recorded no samples: replacing its run_config.json (model: 'typo' (existing) vs 'scripted' (now))"
    assert replaced in caplog.text
    # now that samples exist, the identity binds, and the refusal is one line
    with pytest.raises(RunConfigMismatchError) as refused:
        collect("typo", scripted)
    assert "\n" not in str(refused.value) and "model: 'scripted' (existing) vs 'typo' (now)" in str(refused.value)


class OracleScorer:
    """Scores 1 for a completion holding the gold answer, else 0; steps = its blank-line separated parts."""

    def __init__(self, gold_by_prompt):
        self.gold_by_prompt, self.calls = gold_by_prompt, 0

    def score(self, prompts, completions, aggregate="min"):
        self.calls += 1
        results = []
        for prompt, completion in zip(prompts, completions):
            good = f"\\boxed{{{self.gold_by_prompt[prompt]}}}" in completion
            steps = [float(good)] * len(completion.split("\n\n"))
            results.append(types.SimpleNamespace(score=float(good), step_rewards=steps))
        return results


class ConstantScorer:
    def score(self, prompts, completions, aggregate="min"):
        return [types.SimpleNamespace(score=0.0, step_rewards=[0.0]) for _ in completions]


def scripted_eval(tmp_path, monkeypatch, scorer, **overrides):
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: ScriptedBackend(arithmetic_script))
    monkeypatch.setattr(scoring, "load_scorer", lambda *a, **k: scorer)
    config = eval_config(tmp_path, limit=6, prompt_style="plain", prm="any/prm", **overrides)
    return config, run_eval(config)


def test_a_prm_adds_best_of_n_and_weighted_majority(tmp_path, monkeypatch):
    problems = load_problems("synthetic", "test", limit=6).problems
    gold = {render_prompt(p.problem, None, style="plain"): p.answer for p in problems}
    _, summary = scripted_eval(tmp_path, monkeypatch, OracleScorer(gold))
    metrics = summary["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["bon@4"] == pytest.approx(1.0) == metrics["pass@4"]  # an oracle scorer picks a right sample
    assert metrics["weighted_maj@4"] == pytest.approx(1.0)
    assert summary["prm"]["aggregate"] == "min"
    record = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert [s["score"] for s in record["samples"]] == [1.0, 0.0, 0.0, 0.0]  # "42.0" is right but not "\boxed{42}"
    assert all("step_rewards" in s for s in record["samples"])


def test_a_constant_scorer_is_a_random_choice(tmp_path, monkeypatch):
    _, summary = scripted_eval(tmp_path, monkeypatch, ConstantScorer())
    for k in (1, 2, 4):
        assert summary["metrics"][f"bon@{k}"] == pytest.approx(summary["metrics"]["pass@1"])


def test_prm_without_the_prm_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "align.prm", None)
    with pytest.raises(ImportError, match="--prm needs align.prm"):
        scoring.load_scorer("some/prm")


def test_regrading_samples_produced_elsewhere(tmp_path, monkeypatch):
    source = tmp_path / "theirs.jsonl"
    rows = [
        {"id": "q1", "answer": "4", "completions": ["$\\boxed{4}$", "$\\boxed{5}$"], "level": 2},
        {"id": "q2", "answer": "\\frac12", "samples": [{"completion": "$\\boxed{0.5}$"}, {"completion": "?"}]},
    ]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "regraded"
    summary = run_eval(EvalConfig(samples=str(source), output_dir=str(out), progress=False, grader_workers=1))
    assert summary["metrics"]["pass@1"] == pytest.approx(0.5) and summary["metrics"]["pass@2"] == 1.0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["verdict"] for s in records[1]["samples"]] == ["correct", "no_answer"]
    assert (out / "passk.png").exists()
    source.write_text(json.dumps({"id": "q3", "completions": ["x"]}) + "\n")
    with pytest.raises(SamplesFileError, match="line 1, field 'answer'"):
        run_eval(EvalConfig(samples=str(source), output_dir=str(out), progress=False))


def test_hf_backend_samples_do_not_depend_on_batching(tiny_model_dir):
    backend = HFBackend(tiny_model_dir, batch_size=7)
    prompts = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "Solve 2x = 8 for x, please."]
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=5)
    batched = backend.generate(prompts, sampling)
    backend.batch_size = 1
    single = backend.generate(prompts[::-1], sampling)[::-1]
    assert [[c.text for c in row] for row in batched] == [[c.text for c in row] for row in single]
    assert len({c.text for c in batched[0]}) > 1  # samples of one prompt differ
    for row in batched:
        for c in row:
            assert c.finish_reason in ("stop", "length") and 1 <= c.num_tokens <= 10
            assert (c.num_tokens == 10) or c.finish_reason == "stop"
    other_seed = backend.generate(prompts, SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=6))
    assert [c.text for c in other_seed[0]] != [c.text for c in batched[0]]


def test_greedy_decoding_matches_transformers(tiny_model_dir):
    backend = HFBackend(tiny_model_dir, batch_size=4)
    prompt = "What is 12 + 7? First add the tens."
    (row,) = backend.generate([prompt], SamplingConfig(n=2, temperature=0.0, max_new_tokens=12))
    ids = backend.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        reference = backend.model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
    expected = backend.tokenizer.decode(reference[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert row[0].text == row[1].text == expected


def test_seeded_sampler_draws_from_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.9
    probs = torch.softmax(logits[0].double() / temperature, dim=-1)
    keep = (probs.cumsum(0) - probs) < top_p  # sorted already: the nucleus is a prefix
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    seeds = [sequence_seed(0, "p", j) for j in range(20000)]
    draws = SeededSampler(seeds, temperature, top_p).choose(logits.expand(len(seeds), -1))
    frequencies = torch.bincount(draws, minlength=6).double() / len(seeds)
    assert torch.allclose(frequencies, expected, atol=0.012), (frequencies, expected)
    assert frequencies[~keep].sum() == 0
    again = SeededSampler(seeds[:50], temperature, top_p).choose(logits.expand(50, -1))
    assert torch.equal(again, draws[:50])


def test_backend_choice(monkeypatch):
    monkeypatch.setattr("align.evaluation.vllm_backend.vllm_available", lambda: False)
    assert resolve_backend_name("auto") == "hf"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend_name("tgi")
    with pytest.raises(ImportError, match="use --backend hf"):
        get_backend("vllm", "m")


def install_fake_vllm(monkeypatch):
    """A stand-in for the parts of vLLM the backend uses (LLM, SamplingParams, LoRARequest), recording calls."""
    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm, lora_request):
            calls["params"] = [p.kwargs for p in params]
            calls["lora_request"] = lora_request
            outputs = []
            calls["prompts"] = prompts
            for index, p in enumerate(params):
                choices = [
                    types.SimpleNamespace(
                        text=f"{index}#{j}", token_ids=[1] * (j + 1), finish_reason="stop" if j else "length"
                    )
                    for j in range(p.kwargs["n"])
                ]
                outputs.append(types.SimpleNamespace(outputs=choices))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, number, path: ("lora", name, number, path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    monkeypatch.setattr("align.evaluation.vllm_backend.vllm_available", lambda: True)
    return calls


def test_vllm_backend_maps_sampling_and_outputs(monkeypatch, tiny_model_dir):
    calls = install_fake_vllm(monkeypatch)
    backend = get_backend("vllm", tiny_model_dir, dtype="bfloat16", batch_size=64, max_model_len=512)
    sampling = SamplingConfig(n=3, temperature=0.6, top_p=0.95, max_new_tokens=32, seed=1)
    rows = backend.generate(["p1", "p2"], sampling)
    assert calls["llm"] == {
        "model": tiny_model_dir,
        "tokenizer": tiny_model_dir,
        "dtype": "bfloat16",
        "max_model_len": 512,
    }
    assert [c.text for c in rows[1]] == ["1#0", "1#1", "1#2"]
    assert calls["prompts"][1] == {"prompt_token_ids": encode_prompt(backend.tokenizer, "p2")}
    assert [(c.num_tokens, c.finish_reason) for c in rows[0]] == [(1, "length"), (2, "stop"), (3, "stop")]
    first = calls["params"][0]
    assert {k: first[k] for k in ("n", "temperature", "top_p", "max_tokens")} == {
        "n": 3,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 32,
    }
    assert first["seed"] != calls["params"][1]["seed"]  # per-prompt seeds: independent of batching and sharding
    assert backend.prompts_per_call(3) == 64 and calls["lora_request"] is None


def test_vllm_backend_serves_a_peft_adapter_as_lora(monkeypatch, tiny_model_dir, tmp_path):
    calls = install_fake_vllm(monkeypatch)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir, "r": 16}))
    backend = get_backend("vllm", str(adapter))
    backend.generate(["p"], SamplingConfig(n=1))
    assert (
        calls["llm"]["model"] == tiny_model_dir and calls["llm"]["enable_lora"] and calls["llm"]["max_lora_rank"] == 16
    )
    assert calls["lora_request"] == ("lora", "align-adapter", 1, str(adapter))


def test_backend_kwargs_from_the_command_line_and_yaml_reach_vllm(monkeypatch, tiny_model_dir, tmp_path):
    import trl  # noqa: F401 (before the fake vLLM: importing TRL probes for vllm)

    from align.commands.eval import parse

    calls = install_fake_vllm(monkeypatch)
    common = ["--model", tiny_model_dir, "--dataset", "synthetic", "--limit", "2", "--n", "2", "--backend", "vllm"]
    common += ["--grader_workers", "1", "--no_progress", "--no_plot"]
    text = "tensor_parallel_size=2, gpu_memory_utilization=0.85,enforce_eager=true,max_model_len=4096"
    config = parse([*common, "--output_dir", str(tmp_path / "cli"), "--backend_kwargs", text])
    expected = {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "enforce_eager": True,
        "max_model_len": 4096,
    }
    assert config.backend_kwargs == expected
    assert [type(value) for value in config.backend_kwargs.values()] == [int, float, bool, int]
    run_eval(config)
    assert {key: calls["llm"][key] for key in expected} == expected
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("backend_kwargs:\n  tensor_parallel_size: 2\n  gpu_memory_utilization: 0.85\n")
    from_yaml = parse(["--config", str(recipe), *common, "--output_dir", str(tmp_path / "yaml")])
    assert from_yaml.backend_kwargs == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}
    assert parse([*common, "--output_dir", "o", "--backend_kwargs", "{max_num_seqs: 8}"]).backend_kwargs == {
        "max_num_seqs": 8
    }
    assert parse([*common, "--output_dir", "o"]).backend_kwargs == {}


def test_unknown_or_mistyped_backend_kwargs_are_one_clear_error(monkeypatch, capsys, tmp_path):
    from align.cli import main

    argv = ["eval", "--dataset", "synthetic", "--limit", "1", "--output_dir", str(tmp_path), "--backend", "vllm"]
    assert main([*argv, "--backend_kwargs", "tensor_paralel_size=2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "backend 'vllm' has no option 'tensor_paralel_size'" in line
    assert "accepts: tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization, max_model_len" in line
    assert main([*argv, "--backend_kwargs", "max_model_len=long"]) == 2
    assert "max_model_len must be int, got 'long'" in capsys.readouterr().err
    assert main([*argv, "--backend_kwargs", "enforce_eager"]) == 2
    assert "'enforce_eager' is not KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no option 'tensor_parallel_size'; it accepts: device"):
        EvalConfig(backend="hf", backend_kwargs={"tensor_parallel_size": 2}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="gpu_memory_utilization must be float, got True"):
        EvalConfig(backend="vllm", backend_kwargs={"gpu_memory_utilization": True}, output_dir=str(tmp_path))
    # `auto` accepts any backend's options until it has chosen one; then they must be the chosen backend's
    auto = EvalConfig(backend_kwargs="tensor_parallel_size=2", output_dir=str(tmp_path))
    assert auto.backend_kwargs == {"tensor_parallel_size": 2}
    monkeypatch.setattr("align.evaluation.vllm_backend.vllm_available", lambda: False)
    with pytest.raises(ValueError, match=r"no option 'tensor_parallel_size'.*\(--backend auto chose 'hf' here\)"):
        get_backend("auto", "never-loaded", **auto.backend_kwargs)


def test_a_registered_backend_is_a_backend_choice(monkeypatch, tmp_path):
    from align.evaluation import backends

    class EchoBackend(ScriptedBackend):
        name = "echo"
        options = {"shout": (bool, "upper-case every completion")}

        def __init__(self, model, *, dtype, batch_size, shout=False):
            super().__init__(lambda prompt: [f"{model} {dtype} {batch_size} {shout}"] * 4)

    monkeypatch.setattr(backends, "BACKEND_REGISTRY", dict(backends.BACKEND_REGISTRY))  # restored after the test
    backends.register_backend(EchoBackend)
    assert (
        backends.backend_names() == ("auto", "hf", "vllm", "openai", "echo") and resolve_backend_name("echo") == "echo"
    )
    config = EvalConfig(backend="echo", backend_kwargs="shout=yes", output_dir=str(tmp_path))
    backend = get_backend(config.backend, "m", dtype="float32", batch_size=3, **config.backend_kwargs)
    (row,) = backend.generate(["p"], SamplingConfig(n=1))
    assert row[0].text == "m float32 3 True"
    with pytest.raises(ValueError, match="backend 'echo' has no option 'device'; it accepts: shout"):
        get_backend("echo", "m", device="cpu")


@pytest.mark.distributed
def test_two_processes_give_the_single_process_summary(tiny_run, tiny_model_dir, tmp_path):
    output_dir, single = tiny_run
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "align.cli",
        "eval",
        "--model",
        tiny_model_dir,
        "--dataset",
        "synthetic",
        "--limit",
        "3",
        "--n",
        "4",
        "--max_new_tokens",
        "8",
        "--backend",
        "hf",
        "--grader_workers",
        "1",
        "--progress",
        "false",
        "--output_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads((tmp_path / "summary.json").read_text())
    assert not list(Path(tmp_path).glob("samples.part-*"))  # merged into samples.jsonl
    for summary in (single, double):
        summary.pop("timing")
    assert double == single
    ours = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert [[s["completion"] for s in r["samples"]] for r in ours] == [
        [s["completion"] for s in r["samples"]] for r in theirs
    ]


@pytest.mark.slow
def test_smollm2_eval_stops_at_end_of_turn_and_grades(smollm2_path, tmp_path):
    summary = run_eval(
        eval_config(tmp_path, model=smollm2_path, limit=2, n=2, max_new_tokens=96, batch_size=4, grader_workers=2)
    )
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    samples = [s for r in records for s in r["samples"]]
    assert records[0]["prompt"].startswith("<|im_start|>") and records[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert any(s["finish_reason"] == "stop" for s in samples)  # the model ends its turn by itself
    assert all("<|im_end|>" not in s["completion"] and 0 < s["num_tokens"] <= 96 for s in samples)
    assert all((s["finish_reason"] == "length") == (s["num_tokens"] == 96) for s in samples)
    assert summary["samples"]["total"] == 4 and summary["timing"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_smollm2_greedy_generation_does_not_depend_on_batching(smollm2_path):
    backend = HFBackend(smollm2_path, batch_size=4)
    problems = load_problems("synthetic", "test", limit=2, synthetic_levels=(1, 3)).problems
    prompts = [render_prompt(p.problem, backend.tokenizer) for p in problems]
    sampling = SamplingConfig(n=2, temperature=0.0, max_new_tokens=32)
    batched = backend.generate(prompts, sampling)
    backend.batch_size = 1
    single = backend.generate(prompts, sampling)
    assert [[c.text for c in row] for row in batched] == [[c.text for c in row] for row in single]


def test_printed_metrics_follow_the_report_families():
    from align.commands.eval import format_metrics
    from align.evaluation.report import METRIC_FAMILIES, SCORED_FAMILIES

    metrics = {f"{family}@{k}": 0.5 for family in METRIC_FAMILIES for k in (1, 2)}
    lines = format_metrics({"metrics": metrics, "ks": [1, 2]}).splitlines()
    assert [line.split(":")[0].strip() for line in lines] == list(METRIC_FAMILIES)
    unscored = {key: value for key, value in metrics.items() if key.split("@")[0] not in SCORED_FAMILIES}
    lines = format_metrics({"metrics": unscored, "ks": [1, 2]}).splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["pass", "pass_all", "maj"]


def test_prm_aggregates_are_the_losses_list(tmp_path):
    from align.commands.diagnose.steps import build_parser
    from align.losses.implicit_reward import AGGREGATES

    (action,) = [a for a in build_parser()._actions if a.dest == "aggregate"]
    assert tuple(action.choices) == AGGREGATES
    with pytest.raises(ValueError, match=re.escape(f"prm_aggregate must be one of {AGGREGATES}")):
        EvalConfig(output_dir=str(tmp_path), prm_aggregate="median")


def test_pass_curves_of_several_runs_and_of_one_run(tmp_path):
    from align.evaluation.plots import plot_family
    from align.evaluation.report import plot_passk
    from align.pipeline import plot_pass_curves

    short = {"ks": [1, 2], "metrics": {"pass@1": 0.2, "pass@2": 0.3, "maj@1": 0.2, "maj@2": 0.2}}
    long = {"ks": [1, 2, 4], "metrics": {"pass@1": 0.1, "pass@2": 0.2, "pass@4": 0.4}}
    assert plot_family({"a": short, "b": long}, tmp_path / "runs.png", title="t").stat().st_size > 0
    assert plot_pass_curves({"a": short}, tmp_path / "demo" / "pass.png", "t").stat().st_size > 0
    one = {**short, "num_problems": 2, "n": 2, "model": "m", "dataset": "d"}
    assert plot_passk(one, tmp_path / "passk.png").stat().st_size > 0


def test_bad_rows_stop_the_run_or_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    from align.cli import main

    data = tmp_path / "problems.jsonl"
    rows = [{"id": "a", "problem": "What is $1 + 2$?", "answer": "3"}, {"id": "b", "problem": "What is $2 + 2$?"}]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: ScriptedBackend(arithmetic_script))
    argv = ["eval", "--dataset", str(data), "--n", "2", "--prompt_style", "plain", "--backend", "hf", "--no_progress"]
    assert main([*argv, "--output_dir", str(tmp_path / "strict")]) == 2
    assert "row 1, field 'answer'" in capsys.readouterr().err
    assert main([*argv, "--output_dir", str(tmp_path / "lenient"), "--skip_invalid"]) == 0
    summary = json.loads((tmp_path / "lenient" / "summary.json").read_text())
    assert summary["skipped_rows"] == 1 and summary["num_problems"] == 1 and summary["metrics"]["pass@2"] == 1.0
