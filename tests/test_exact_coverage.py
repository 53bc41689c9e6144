"""Exact coverage: the pass@N lower bound from one forward pass, its numerics, its harness run, and a cross-check
against sampled pass@k of the same model on the same problems."""

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from align.data.prompts import render_prompt
from align.data.schema import Problem
from align.data.synthetic import generate_problems
from align.data.training import completion_text
from align.evaluation import exact_coverage_run
from align.evaluation.config import EvalConfig
from align.evaluation.exact_coverage import (
    CURVE_NS,
    DEFAULT_FORMAT,
    KEY_NS,
    CanonicalAnswerError,
    canonical_completion,
    compare_exact_coverage,
    completion_log_probs,
    completion_token_ids,
    coverage_block,
    pass_at_n_lower_bound,
    sampler_log_probs,
)
from align.evaluation.harness import run_eval
from align.evaluation.runs import RunConfigMismatchError
from align.evaluation.sampling import SeededSampler
from align.grading import Grader


DIRECT = "Give only the final answer, as \\boxed{ANSWER}."


def test_the_default_completion_is_the_direct_answer_training_target():
    problem = generate_problems(1, "test", [4])[0]
    assert canonical_completion(problem.answer) == completion_text(problem, "answer")
    assert DEFAULT_FORMAT.replace("ANSWER", "7") == "$\\boxed{7}$"
    assert canonical_completion("7", prompt_style="plain") == " $\\boxed{7}$"  # plain training puts a space first


def test_the_bound_is_exact_at_tiny_and_large_p():
    ns = [1, 16, 10_000]
    bound = pass_at_n_lower_bound([math.log(1e-30), math.log(0.5), 0.0, None, -math.inf], ns)
    assert bound[0] == pytest.approx([1e-30, 16e-30, 1e-26], rel=1e-12)  # 1 - (1 - p)^N = Np at tiny p
    exact = [float(1 - (1 - Fraction(1, 2)) ** n) for n in ns]
    np.testing.assert_allclose(bound[1], exact, rtol=1e-15)
    assert bound[2].tolist() == [1.0] * 3 and bound[3].tolist() == bound[4].tolist() == [0.0] * 3
    one_minus = pass_at_n_lower_bound([math.log1p(-1e-12)], [1])  # p a hair below 1: 1 - 1e-12, not 1
    assert one_minus[0, 0] == pytest.approx(1 - 1e-12, abs=1e-15)
    assert set(KEY_NS) <= set(CURVE_NS) and CURVE_NS[0] == 1 and CURVE_NS[-1] == 10_000


def _nucleus_brute_force(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The distribution SeededSampler draws from, token by token in pure Python."""
    if temperature == 0:
        best = max(range(len(logits)), key=logits.__getitem__)
        return [1.0 if i == best else 0.0 for i in range(len(logits))]
    weights = [math.exp(value / temperature) for value in logits]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, before = set(), 0.0
    for i in order:
        if before < top_p:
            kept.add(i)
        before += probs[i]
    mass = sum(probs[i] for i in kept)
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.5), (0.0, 1.0)])
def test_sampler_log_probs_are_the_seeded_samplers_distribution(temperature, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    targets = torch.arange(6).expand(2, 6)
    got = sampler_log_probs(logits, targets, temperature, top_p).exp()
    for row in range(2):
        expected = _nucleus_brute_force(logits[row].tolist(), temperature, top_p)
        np.testing.assert_allclose(got[row].numpy(), expected, atol=1e-6)
    if temperature > 0:  # and the sampler's draws follow it
        draws = 20_000
        sampler = SeededSampler(list(range(draws)), temperature, top_p)
        counts = np.bincount(sampler.choose(logits[:1].expand(draws, 6)).numpy(), minlength=6) / draws
        np.testing.assert_allclose(counts, got[0].numpy(), atol=4 * math.sqrt(0.25 / draws))


def _prompts(tokenizer, problems, instruction=DIRECT):
    return [render_prompt(p.problem, tokenizer, instruction, "chat") for p in problems]


def test_log_p_is_the_teacher_forced_log_likelihood_whatever_the_batching(tiny_model_dir):
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype="float32", device="cpu", padding_side="left")
    problems = generate_problems(3, "test", [1, 3, 5])  # different prompt and answer lengths: padding differs
    prompts = _prompts(tokenizer, problems)
    completions = [canonical_completion(p.answer) for p in problems]
    eos = [tokenizer.eos_token_id]
    batched = {i: lp for i, lp, _ in completion_log_probs(model, tokenizer, prompts, completions, eos_ids=eos)}
    alone = {}
    for i in range(3):
        ((_, alone[i], num_tokens),) = completion_log_probs(
            model, tokenizer, prompts[i : i + 1], completions[i : i + 1], eos_ids=eos
        )
        prompt_ids, completion_ids = completion_token_ids(tokenizer, prompts[i], completions[i])
        assert num_tokens == len(completion_ids) + 1
        ids = torch.tensor([prompt_ids + completion_ids + eos])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        manual = log_probs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum()
        assert alone[i] == pytest.approx(float(manual), abs=1e-4)
        assert tokenizer.decode(completion_ids) == completions[i]
    assert batched == pytest.approx(alone, abs=1e-4)


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1, timeout_s=3.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def trained_tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model after ~50 steps of cross-entropy on the canonical direct answers of 6 held-out problems,
    so that p is between ~0.05 and ~0.6: where exact coverage and sampling can be compared."""
    from align.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype="float32", device="cpu", padding_side="left")
    problems = generate_problems(6, "test", [1])
    rows = []
    for prompt, problem in zip(_prompts(tokenizer, problems), problems):
        prompt_ids, completion_ids = completion_token_ids(tokenizer, prompt, canonical_completion(problem.answer))
        rows.append((prompt_ids, completion_ids + [tokenizer.eos_token_id]))
    width = max(len(a) + len(b) for a, b in rows)
    pad = [[tokenizer.pad_token_id] * (width - len(a) - len(b)) for a, b in rows]
    ids = torch.tensor([a + b + p for (a, b), p in zip(rows, pad)])
    labels = torch.tensor([[-100] * len(a) + b + [-100] * len(p) for (a, b), p in zip(rows, pad)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(52):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("tiny-direct")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    problems_file = path / "problems.jsonl"
    problems_file.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    return str(path), problems_file


def _config(output_dir, model, problems_file, **overrides):
    fields = dict(
        model=model,
        dataset=str(problems_file),
        exact_coverage=True,
        prompt_instruction=DIRECT,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=12,
        backend="hf",
        batch_size=64,
        output_dir=str(output_dir),
        progress=False,
        grader_workers=1,
    )
    return EvalConfig(**{**fields, **overrides})


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), pytest.param(0.8, 0.9, marks=pytest.mark.slow)])
def test_exact_coverage_agrees_with_sampled_pass_at_k_on_the_same_problems(trained_tiny, tmp_path, temperature, top_p):
    """p against n = 64 samples per problem: the samples equal to the canonical completion are Binomial(n, p), and
    sampled pass@k (graded by math-verify) agrees with the bound within sampling error (the answers are canonical)."""
    model, problems_file = trained_tiny
    n = 64
    summary = run_eval(_config(tmp_path, model, problems_file, n=n, temperature=temperature, top_p=top_p))
    block = summary["exact_coverage"]
    p = np.exp([block["log_p"][pid] for pid in sorted(block["log_p"])])
    assert 0.02 < p.mean() < 0.8, p  # the fixture's training put p where both estimates are informative
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "samples.jsonl").open()}
    canonical = {r["id"]: canonical_completion(r["answer"]) for r in records.values()}
    matches = np.array(
        [
            sum(s["completion"] == canonical[pid] and s["finish_reason"] == "stop" for s in records[pid]["samples"])
            for pid in sorted(block["log_p"])
        ]
    )
    z = (matches.sum() - n * p.sum()) / math.sqrt((n * p * (1 - p)).sum())
    assert abs(z) < 4, (matches, n * p)
    for k in (1, 16):
        sampled, bound = summary["metrics"][f"pass@{k}"], block["pass_at"][str(k)]
        error = 4 * summary["stderr"][f"pass@{k}"] + 0.02
        assert bound - error <= sampled <= bound + error, (k, sampled, bound)


def test_align_eval_exact_coverage_writes_resumes_and_refuses_other_settings(trained_tiny, tmp_path, monkeypatch):
    model, problems_file = trained_tiny
    summary = run_eval(_config(tmp_path, model, problems_file))
    assert summary["n"] == 0 and "samples" not in summary and summary["num_problems"] == 6
    assert {"exact_coverage.jsonl", "exact_coverage.png", "exact_coverage_config.json", "summary.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    block = summary["exact_coverage"]
    assert "LOWER bound" in block["note"] and list(block["pass_at"]) == [str(n) for n in KEY_NS]
    assert block["curve"]["n"] == list(CURVE_NS) and len(block["curve"]["pass"]) == len(CURVE_NS)
    assert all(a <= b for a, b in zip(block["curve"]["pass"], block["curve"]["pass"][1:]))
    assert all(lo <= block["pass_at"][n] <= hi for n, (lo, hi) in block["ci95"].items())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # a killed run (4 records kept, one torn) scores only what is missing
    records = (tmp_path / "exact_coverage.jsonl").read_text().splitlines()
    (tmp_path / "exact_coverage.jsonl").write_text("\n".join(records[:4]) + '\n{"id": "torn", "lo')
    scored = []
    original = exact_coverage_run.exact_coverage_records

    def counting(model, tokenizer, problems, **kwargs):
        scored.append(model is not None)
        return original(model, tokenizer, problems, **kwargs)

    monkeypatch.setattr(exact_coverage_run, "exact_coverage_records", counting)
    again = run_eval(_config(tmp_path, model, problems_file))
    assert again["exact_coverage"]["log_p"] == pytest.approx(block["log_p"], abs=1e-6) and scored == [True]
    assert len((tmp_path / "exact_coverage.jsonl").read_text().splitlines()) == 6
    run_eval(_config(tmp_path, model, problems_file))
    assert scored == [True, False]  # nothing left: the model is not loaded
    with pytest.raises(RunConfigMismatchError, match=r"temperature: 1\.0 \(existing\) vs 0\.5 \(now\)"):
        run_eval(_config(tmp_path, model, problems_file, temperature=0.5))


def test_a_row_without_a_canonical_answer_is_one_line_naming_it(tiny_model_dir, tmp_path, grader):
    problems = [
        Problem(id="fine", problem="What is $2 + 2$?", solution="", answer="4"),
        Problem(id="broken", problem="What is it?", solution="", answer="{"),  # `$\boxed{{}$` has no answer
    ]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    with pytest.raises(CanonicalAnswerError, match=r"problem 1 \(from 0, id 'broken'\).*--skip-invalid") as error:
        run_eval(_config(tmp_path / "run", tiny_model_dir, path))
    assert "\n" not in str(error.value)
    summary = run_eval(_config(tmp_path / "skipping", tiny_model_dir, path, skip_invalid=True))
    block = summary["exact_coverage"]
    assert block["num_problems"] == 1 and [row["id"] for row in block["skipped"]] == ["broken"]
    assert list(block["log_p"]) == ["fine"]


def test_two_runs_are_compared_per_problem_with_the_paired_bootstrap():
    ids = [f"p{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    log_p_a = np.log(rng.uniform(0.01, 0.3, size=40))
    records_a = [{"id": i, "log_p": float(v)} for i, v in zip(ids, log_p_a)]
    records_b = [{"id": i, "log_p": float(v + 0.5)} for i, v in zip(ids, log_p_a)]  # B is e^0.5 times as likely
    a, b = coverage_block(records_a), coverage_block(records_b)
    result = compare_exact_coverage(a, b, ns=(1, 16))
    assert result["pass@1"]["shown"] and result["pass@1"]["low"] > 0
    assert result["pass@1"]["diff"] == pytest.approx(b["pass_at"]["1"] - a["pass_at"]["1"], abs=1e-6)
    with pytest.raises(ValueError, match="different problems"):
        compare_exact_coverage(a, coverage_block(records_b[:-1]))


def test_exact_coverage_options_are_checked(tmp_path):
    assert EvalConfig(output_dir=str(tmp_path)).n == 1  # as before
    assert EvalConfig(output_dir=str(tmp_path), exact_coverage=True).n == 0
    with pytest.raises(ValueError, match=r"n must be >= 1 \(or 0 with --exact-coverage\), got 0"):
        EvalConfig(output_dir=str(tmp_path), n=0)
    with pytest.raises(ValueError, match="no ANSWER slot"):
        EvalConfig(output_dir=str(tmp_path), exact_coverage=True, exact_coverage_format="$\\boxed{x}$")
    with pytest.raises(ValueError, match="without --samples"):
        EvalConfig(samples="s.jsonl", exact_coverage=True)


def test_the_command_prints_the_bound_and_says_it_is_a_lower_bound(trained_tiny, tmp_path, capsys):
    from align.commands import eval as eval_command

    model, problems_file = trained_tiny
    shutil.copy(problems_file, tmp_path / "problems.jsonl")
    argv = [
        "--model", model, "--dataset", str(tmp_path / "problems.jsonl"), "--exact-coverage", "--temperature", "1",
        "--top-p", "1", "--prompt-instruction", DIRECT, "--output-dir", str(tmp_path / "run"), "--progress", "false",
        "--grader-workers", "1",
    ]  # fmt: skip
    assert eval_command.main(argv) == 0
    out = capsys.readouterr().out
    assert "exact pass: @1=" in out and "@10000=" in out and "LOWER bound" in out and "samples:" not in out
