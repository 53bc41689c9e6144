"""`align diagnose steps --prm PATH --samples RUN/samples.jsonl --id X`: a solution with its implicit step rewards.

Prints, for the samples of one problem, each step's reward r^k = q^k − q^(k−1), the running q^k and the step text,
marking the lowest step (the one the `min` aggregate, the paper's best-of-N score, picks). `--tokens` also lists
each step's tokens with their rewards, which shows where inside a step the PRM's opinion changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


HELP = "Print a solution's implicit PRM step rewards: --prm PATH --samples RUN/samples.jsonl --id X"


def build_parser() -> argparse.ArgumentParser:
    from align.losses.implicit_reward import AGGREGATES  # here, not at import: `align diagnose --help` needs no torch

    parser = argparse.ArgumentParser(prog="align diagnose steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", required=True, help="PRM directory (from align train prm).")
    parser.add_argument("--samples", required=True, help="samples.jsonl written by `align eval` or `align data`.")
    parser.add_argument("--id", required=True, help="Problem id (the record's `id`).")
    parser.add_argument("--sample", type=int, action="append", help="Sample index (repeatable; default: all).")
    parser.add_argument("--prm-ref", default=None, help="Reference model of a full-model PRM.")
    parser.add_argument("--prm-beta", type=float, default=None, help="β (default: the PRM's own).")
    parser.add_argument("--aggregate", default="min", choices=AGGREGATES, help="Step rewards -> sample score.")
    parser.add_argument("--tokens", action="store_true", help="Also print each step's tokens and their rewards.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per sample instead of a table.")
    parser.add_argument("--width", type=int, default=100, help="Characters of step text shown per step.")
    return parser


def find_record(path: Path, problem_id: str) -> dict:
    from align.evaluation.records import normalize_record, read_jsonl

    if not path.is_file():
        raise SystemExit(f"align diagnose steps: no samples file at {path}")
    rows = read_jsonl(path)
    for line, record in rows:
        if str(record.get("id")) == problem_id:
            return normalize_record(record, str(path), line)
    shown = ", ".join(repr(str(record.get("id"))) for _, record in rows[:5])
    raise SystemExit(
        f"align diagnose steps: no record with id {problem_id!r} in {path} ({len(rows)} records; first ids: {shown})"
    )


def prompt_of(record: dict, tokenizer) -> str:
    if record.get("prompt"):
        return record["prompt"]
    if not record.get("problem"):
        raise SystemExit(f"align diagnose steps: record {record['id']!r} has neither 'prompt' nor 'problem'")
    from align.data.prompts import render_prompt

    # Records produced elsewhere may lack the rendered prompt: render it as training did, with the PRM's template.
    return render_prompt(record["problem"], tokenizer)


def _shown(text: str, width: int) -> str:
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_result(result, sample: dict, index: int, width: int, tokens: bool) -> str:
    verdict = sample.get("verdict", "ungraded")
    extracted = sample.get("extracted")
    lines = [
        f"sample {index}: {verdict}"
        + (f" (answer {extracted})" if extracted is not None else "")
        + f", score({result.aggregate}) = {result.score:+.4f}, outcome reward = {result.outcome_reward:+.4f}"
        + (", TRUNCATED" if result.truncated else ""),
        f"  {'step':>4}  {'reward':>9}  {'q':>9}  text",
    ]
    lowest = min(range(len(result.step_rewards)), key=result.step_rewards.__getitem__) if result.step_rewards else -1
    for k, (reward, q, text) in enumerate(zip(result.step_rewards, result.q_values, result.steps)):
        marker = "  <- lowest" if k == lowest and len(result.step_rewards) > 1 else ""
        lines.append(f"  {k + 1:>4}  {reward:>+9.4f}  {q:>+9.4f}  {_shown(text, width)}{marker}")
        if tokens:
            first, last = result.step_token_spans[k]
            pieces = [
                f"{_shown(result.text[s:e], 20)!s}:{value:+.3f}"
                for (s, e), value in zip(result.token_spans[first:last], result.token_rewards[first:last])
            ]
            lines.append("        " + "  ".join(pieces))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    record = find_record(Path(args.samples), args.id)
    samples = record["samples"]
    indices = args.sample if args.sample else list(range(len(samples)))
    bad = [i for i in indices if not 0 <= i < len(samples)]
    if bad:
        raise SystemExit(f"align diagnose steps: sample index {bad[0]} out of range: problem has {len(samples)}")

    from align.prm import ImplicitPRM

    kwargs = {} if args.prm_beta is None else {"beta": args.prm_beta}
    scorer = ImplicitPRM.from_pretrained(args.prm, ref_model=args.prm_ref, **kwargs)
    prompt = prompt_of(record, scorer.tokenizer)
    chosen = [samples[i] for i in indices]
    results = scorer.score([prompt] * len(chosen), [s["completion"] for s in chosen], aggregate=args.aggregate)
    if args.json:
        for index, sample, result in zip(indices, chosen, results):
            payload = {"id": record["id"], "sample": index, "verdict": sample.get("verdict"), **result.to_dict()}
            print(json.dumps(payload, ensure_ascii=False))
        return 0
    print(f"problem {record['id']} (gold answer {record['answer']}), PRM {args.prm}, β = {scorer.beta}")
    for index, sample, result in zip(indices, chosen, results):
        print()
        print(format_result(result, sample, index, args.width, args.tokens))
    sys.stdout.flush()
    return 0
