"""Exact coverage: pass@N without sampling, for problems whose answer is one short canonical string.

For a problem with prompt x and gold answer a, let y* be the canonical completion (`canonical_completion`: the
form the model is trained to emit, `$\\boxed{a}$` for align's direct-answer task) tokenized as the model emits it
after x, and p = π(y* · EOS | x) the probability that ONE sample is exactly y* and then stops, under the
distribution the harness samples from (`align.evaluation.sampling.SeededSampler`: logits / T, nucleus top-p,
renormalized). One teacher-forced forward pass gives it:

    log p = Σ_t log π_{T,top-p}(y*_t | x, y*_<t) + log Σ_{e ∈ EOS ids} π_{T,top-p}(e | x, y*)

N independent samples all miss y* with probability (1 − p)^N, so for every N at once, with no sampling noise,

    pass@N ≥ 1 − (1 − p)^N = −expm1(N · log(1 − p)),

with log(1 − p) from log p by `log1mexp` (Mächler 2012, "Accurately computing log(1 − exp(−|a|))"), so that p =
1e−30 still gives pass@10⁴ = 1e−26 and p near 1 gives 1. It is a LOWER bound: other strings (`$\\boxed{ 42}$`,
`42`, an equivalent fraction) and other tokenizations of y* can also be graded correct. The benchmark score is the
mean over problems (the curve, `coverage_block`), with percentile-bootstrap intervals over problems; two runs on the
same problems are compared per problem with `align.evaluation.paired.paired_bootstrap` (`compare_exact_coverage`).

The per-problem records (`exact_coverage.jsonl`: id, answer, completion, num_tokens, log_p; log_p None when p = 0)
are appended and flushed batch by batch, so a killed run resumes without redoing work (`exact_coverage_records`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from align.errors import InputError
from align.evaluation.bootstrap import DEFAULT_RESAMPLES, percentile_interval
from align.evaluation.generation import encode_prompt
from align.evaluation.records import append_record, drop_torn_tail, read_records


DEFAULT_FORMAT = "$\\boxed{ANSWER}$"  # = align.data.training.completion_text(problem, "answer"): the demo's target
ANSWER_SLOT = "ANSWER"
RECORDS_FILE = "exact_coverage.jsonl"
KEY_NS = (1, 16, 256, 4096, 10_000)
# N = 1..10^4 on a log grid (10 points per decade) plus the key values
CURVE_NS = tuple(sorted({round(10 ** (i / 10)) for i in range(41)} | set(KEY_NS)))
LOWER_BOUND_NOTE = (
    "exact coverage is a LOWER bound on pass@N: 1 - (1 - p)^N with p = the probability of the canonical completion "
    "(then end of sequence); other strings and tokenizations can also be correct"
)


class CanonicalAnswerError(InputError):
    """A problem's canonical completion is not graded correct against its own answer."""


def canonical_completion(answer: str, completion_format: str = DEFAULT_FORMAT, prompt_style: str = "chat") -> str:
    """`completion_format` with ANSWER replaced by the gold answer. A plain prompt ends in "Solution:", after which
    training places one space (align.data.training.PLAIN_REFERENCE_SEPARATOR): the plain completion starts with it."""
    text = completion_format.replace(ANSWER_SLOT, answer.strip(), 1)
    return text if prompt_style == "chat" else " " + text


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a sample: the generation config's end-of-sequence id(s) and the tokenizer's (as the `hf`
    backend stops)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model defines no end-of-sequence token, so no sample ever ends: p is 0")
    return sorted(ids)


def completion_token_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as training tokenized them: TRL tokenizes prompt + completion as one text, so
    the completion's ids are the tail of that tokenization when the prompt's ids are its prefix (they are across a
    chat template's "assistant\\n"); otherwise the completion is tokenized on its own."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    joint = encode_prompt(tokenizer, prompt + completion)
    if joint[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids) :]
    return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"]


def sampler_log_probs(logits, targets, temperature: float, top_p: float):
    """log π_{T,top-p}(target) per row: `logits` (rows, vocab), `targets` (rows, m) ids -> (rows, m), float64.

    The distribution SeededSampler draws from: softmax(logits / T), the smallest set of most probable tokens whose
    mass reaches top_p kept (a token is kept when the mass before it is below top_p), renormalized; -inf outside it.
    T = 0 is greedy: log-prob 0 for the argmax, -inf for every other token.
    """
    import torch

    if temperature == 0:
        best = logits.argmax(dim=-1, keepdim=True)
        return torch.where(targets == best, 0.0, -math.inf).double()
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1).double()
    chosen = log_probs.gather(1, targets)
    if top_p >= 1.0:
        return chosen
    sorted_log_probs, order = log_probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_log_probs.exp()
    keep_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    kept_mass = (sorted_probs * keep_sorted).sum(dim=-1, keepdim=True)
    kept = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted).gather(1, targets)
    return torch.where(kept, chosen - kept_mass.log(), -math.inf)


def completion_log_probs(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    eos_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
):
    """Yield (index, log p, num_tokens) for every (prompt, completion), batch by batch: p = π(completion · EOS |
    prompt) under the sampling distribution (module docstring), from one forward pass per batch.

    Rows are sorted by length and left-padded, with position ids counted from each row's first real token (as
    `generate` does), so every completion ends at the last position; only the len + 1 positions that predict a
    completion token or the end of sequence get logits (`_completion_logits`). log p is -inf when p = 0 (T = 0 or
    top-p cut a token).
    """
    import torch

    encoded = [completion_token_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
    order = sorted(range(len(encoded)), key=lambda i: -sum(map(len, encoded[i])))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    eos = torch.tensor(list(eos_ids), device=device)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        sequences = [encoded[i][0] + encoded[i][1] for i in rows]
        width = max(map(len, sequences))
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
        counts = [len(encoded[i][1]) + 1 for i in rows]
        with torch.no_grad():
            per_row = _completion_logits(model, input_ids, mask, counts)
        for scores, index in zip(per_row, rows):
            ids = encoded[index][1]
            token_lp = sampler_log_probs(scores[:-1], torch.tensor(ids, device=device)[:, None], temperature, top_p)
            eos_lp = sampler_log_probs(scores[-1:], eos[None, :], temperature, top_p)
            total = float(token_lp.sum() + torch.logsumexp(eos_lp, dim=-1).sum())
            yield index, total, len(ids) + 1


def _completion_logits(model, input_ids, mask, counts: list[int]) -> list:
    """Per row, the logits (counts[row], vocab) of its last counts[row] positions.

    A boolean `logits_to_keep` (transformers >= 5) projects exactly those positions, as one 2-D matrix product. An
    integer `logits_to_keep=K` slices the last K positions of (batch, length, hidden) into a non-contiguous view,
    which torch 2.13 multiplies with a head weight that does not require grad (a frozen head under LoRA) as a
    batched product copying the weight per row: SmolLM2's head on 32 rows x 9 positions took 14.5 s in bf16 (4.1 s in
    float32) against 0.16 s (0.56 s) for the masked rows, 2 shared cores. Models whose forward cannot take a mask
    get the slice.
    """
    import torch

    width = input_ids.shape[1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for row, count in enumerate(counts):
        keep[row, width - count :] = True
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except (TypeError, IndexError):  # a forward that cannot take a boolean mask
        logits = model(**inputs, logits_to_keep=max(counts)).logits
    if logits.ndim == 2 and logits.shape[0] == sum(counts):
        return list(logits.split(counts))
    # (batch, positions, vocab) ending at the last position: a slice, or a forward that ignored the mask (its
    # logits are used as they are rather than computed a second time)
    return [logits[row, -count:] for row, count in enumerate(counts)]


def log1mexp(log_p: np.ndarray) -> np.ndarray:
    """log(1 - exp(log_p)) for log_p <= 0, accurate at both ends (Mächler 2012): log(-expm1(.)) above -log 2,
    log1p(-exp(.)) below."""
    log_p = np.asarray(log_p, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(log_p > -math.log(2), np.log(-np.expm1(np.minimum(log_p, 0.0))), np.log1p(-np.exp(log_p)))


def pass_at_n_lower_bound(log_p: Sequence[float | None], ns: Sequence[int] = CURVE_NS) -> np.ndarray:
    """(problems, len(ns)): 1 - (1 - p)^N = -expm1(N log(1 - p)) per problem and N; None / -inf (p = 0) gives 0."""
    values = np.array([-math.inf if v is None else v for v in log_p], dtype=float)
    return -np.expm1(np.outer(log1mexp(values), np.asarray(ns, dtype=float)))


def check_canonical(problems, completions: list[str], grader, skip_invalid: bool) -> tuple[list[int], list[dict]]:
    """(indices of the usable problems, skipped rows): a problem whose canonical completion the grader does not
    accept against its own answer has no canonical answer exact coverage could count; it raises
    `CanonicalAnswerError` naming the row, or with `skip_invalid` is skipped and reported."""
    results = grader.grade_many([(c, p.answer) for p, c in zip(problems, completions)])
    kept, skipped = [], []
    for index, (problem, completion, result) in enumerate(zip(problems, completions, results)):
        if result.verdict == "correct":
            kept.append(index)
            continue
        reason = (
            f"problem {index} (from 0, id {problem.id!r}): its canonical completion {completion!r} is graded "
            f"{result.verdict} against its answer {problem.answer!r}, so exact coverage has no string to score"
        )
        if not skip_invalid:
            raise CanonicalAnswerError(
                f"{reason}. Give the row an answer that is one canonical string, set --exact-coverage-format to the "
                "form the model emits (ANSWER marks the answer), or pass --skip-invalid to skip and count such rows."
            )
        skipped.append({"id": problem.id, "answer": problem.answer, "completion": completion, "skipped": reason})
    return kept, skipped


def exact_coverage_records(
    model,
    tokenizer,
    problems,
    *,
    grader,
    prompt_style: str = "chat",
    instruction: str | None = None,
    completion_format: str = DEFAULT_FORMAT,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    output_path: str | Path | None = None,
    skip_invalid: bool = False,
    progress: bool = False,
) -> list[dict]:
    """One record per problem, in problem order: its canonical completion and log p (module docstring), or, for a
    row skipped by `check_canonical`, its `skipped` reason. With `output_path`, records already there are reused
    (`model` is not touched when nothing is left) and new ones are appended and flushed batch by batch."""
    from tqdm.auto import tqdm

    from align.data.prompts import render_prompt

    done = done_records(output_path)
    todo = [problem for problem in problems if problem.id not in done]
    completions = [canonical_completion(p.answer, completion_format, prompt_style) for p in todo]
    kept, skipped = check_canonical(todo, completions, grader, skip_invalid) if todo else ([], [])
    handle = open(output_path, "a", encoding="utf-8") if output_path is not None and todo else None  # noqa: SIM115
    try:
        for row in skipped:
            _keep(done, handle, row)
        todo, completions = [todo[i] for i in kept], [completions[i] for i in kept]
        if todo:
            prompts = [render_prompt(p.problem, tokenizer, instruction, prompt_style) for p in todo]
            eos_ids = eos_token_ids(model, tokenizer)
            scored = completion_log_probs(
                model, tokenizer, prompts, completions, eos_ids=eos_ids, temperature=temperature, top_p=top_p,
                batch_size=batch_size,
            )  # fmt: skip
            began = time.perf_counter()
            for index, log_p, num_tokens in tqdm(
                scored, total=len(todo), desc="exact coverage", unit="problem", disable=not progress
            ):
                record = {
                    "id": todo[index].id,
                    "answer": todo[index].answer,
                    "completion": completions[index],
                    "num_tokens": num_tokens,
                    "log_p": None if log_p == -math.inf else round(log_p, 8),
                    "forward_s": round(time.perf_counter() - began, 4),  # since this run's first batch
                }
                _keep(done, handle, record)
    finally:
        if handle is not None:
            handle.close()
    return [done[problem.id] for problem in problems]


def done_records(output_path: str | Path | None) -> dict[str, dict]:
    """`{id: record}` of an exact-coverage records file (a torn last line, from a killed run, is dropped)."""
    path = Path(output_path) if output_path is not None else None
    if path is None or not path.exists():
        return {}
    drop_torn_tail(path)
    return {record["id"]: record for record in read_records(path)}


def _keep(done: dict, handle, record: dict) -> None:
    done[record["id"]] = record
    if handle is not None:
        append_record(handle, record)


def coverage_block(records: list[dict], *, seed: int = 0) -> dict:
    """summary.json's `exact_coverage`: the mean lower bound at every N of CURVE_NS and at KEY_NS, bootstrap 95 %
    intervals at KEY_NS, every problem's log p, and the rows skipped (no canonical answer)."""
    skipped = [{"id": r["id"], "reason": r["skipped"]} for r in records if "skipped" in r]
    records = [record for record in records if "skipped" not in record]
    if not records:
        raise ValueError("no exact-coverage records to summarize")
    log_p = [record["log_p"] for record in records]
    curve = pass_at_n_lower_bound(log_p, CURVE_NS)
    key = pass_at_n_lower_bound(log_p, KEY_NS)
    low, high = percentile_interval(key, seed=seed)
    finite = [value for value in log_p if value is not None]
    return {
        "note": LOWER_BOUND_NOTE,
        "num_problems": len(records),
        "pass_at": {str(n): _significant(v) for n, v in zip(KEY_NS, key.mean(axis=0))},
        "ci95": {str(n): [_significant(lo), _significant(hi)] for n, lo, hi in zip(KEY_NS, low, high)},
        "curve": {"n": list(CURVE_NS), "pass": [_significant(v) for v in curve.mean(axis=0)]},
        "mean_log_p": round(sum(finite) / len(finite), 6) if finite else None,
        "zero_p": len(log_p) - len(finite),
        "log_p": {record["id"]: record["log_p"] for record in records},
        "skipped": skipped,
        "estimator": "mean over problems of 1 - (1 - p)^N, p = π(canonical completion + EOS | prompt); ci95: "
        f"percentile bootstrap over problems, {DEFAULT_RESAMPLES} resamples (seed {seed})",
        "forward_s": round(max((record.get("forward_s") or 0.0) for record in records), 3),
    }


def _significant(value) -> float:
    """8 significant digits (not decimals: a bound of 1e-20 at tiny p is a value, not 0)."""
    return float(f"{float(value):.8g}")


def compare_exact_coverage(block_a: dict, block_b: dict, ns: Sequence[int] = KEY_NS, seed: int = 0) -> dict:
    """`{"pass@N": paired_bootstrap(...)}`: run B minus run A at each N, paired by problem (both blocks from
    `coverage_block`, on the same problems)."""
    from align.evaluation.paired import paired_bootstrap

    ids_a, ids_b = set(block_a["log_p"]), set(block_b["log_p"])
    if ids_a != ids_b:
        raise ValueError(
            f"the two exact-coverage runs hold different problems ({len(ids_a ^ ids_b)} ids differ); evaluate both "
            "on the same problems"
        )
    order = sorted(ids_a)
    a = pass_at_n_lower_bound([block_a["log_p"][i] for i in order], ns)
    b = pass_at_n_lower_bound([block_b["log_p"][i] for i in order], ns)
    return {f"pass@{n}": paired_bootstrap(a[:, j], b[:, j], seed=seed) for j, n in enumerate(ns)}


def format_exact_coverage(block: dict) -> str:
    """Two console lines: the key values and the lower-bound note."""
    values = "  ".join(f"@{n}={value:.4f}" for n, value in block["pass_at"].items())
    return f"  exact pass: {values}  ({block['num_problems']} problems)\n  ({block['note']})"
