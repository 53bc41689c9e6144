"""Score ProcessBench-format rows step by step and evaluate the earliest-error predictions (`align eval-steps`).

Rows: {"problem": str, "steps": [str, ...], "label": int (earliest wrong step, −1 = all right), ...}, the format of
ProcessBench's public splits and of `align.data.step_errors.step_error_rows`. A solution is scored as the completion
"\\n\\n".join(steps) after the rendered prompt, with its step boundaries given explicitly, so a step is exactly a
row's step whatever the scorer's separator.

Scorers (each gives one number per step; lower = more likely wrong):
- `prm`: the implicit PRM's step reward r^k (`align.prm.ImplicitPRM`);
- `likelihood`: the policy's own mean token log-probability in the step (the PRM's reference scored alone, no PRM
  needed), the baseline a PRM must beat to be worth training;
- `random`: an independent U(0, 1) per step (`align.evaluation.step_benchmark.random_step_scores`).
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import InputError


STEP_SEPARATOR = "\n\n"


class StepRowError(InputError):
    """A step-benchmark row lacks a field or has a bad value; the message names the file, row and field."""


def validate_rows(rows: list[dict], source: str) -> list[dict]:
    """Check every row (problem, steps, label) and return them; one clear error for the first bad one."""
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        if not isinstance(row, dict):
            raise StepRowError(f"{where} is {type(row).__name__}, not a JSON object")
        if not isinstance(row.get("problem"), str) or not row["problem"].strip():
            raise StepRowError(f"{where}, field 'problem' = {row.get('problem')!r:.60}: must be a non-empty string")
        steps = row.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise StepRowError(
                f"{where}, field 'steps' = {steps!r:.60}: must be a non-empty list of non-empty strings"
            )
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
            raise StepRowError(
                f"{where}, field 'label' = {label!r}: must be an int, -1 (no wrong step) or the index (from 0) of "
                f"the earliest wrong step, below {len(steps)} (its number of steps)"
            )
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl file (one row per line) or a .json list, validated."""
    path = Path(path)
    if not path.is_file():
        raise StepRowError(f"no step-benchmark file at {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise StepRowError(f"{path}: not valid JSON ({error}); expected one ProcessBench row per line") from error
    if not isinstance(rows, list) or not rows:
        raise StepRowError(f"{path}: no rows")
    return validate_rows(rows, str(path))


def completion_and_ends(steps: list[str]) -> tuple[str, list[int]]:
    """The completion text of a row's steps and the character offset where each step (with its separator) ends."""
    ends, offset = [], 0
    for index, step in enumerate(steps):
        offset += len(step) + (len(STEP_SEPARATOR) if index < len(steps) - 1 else 0)
        ends.append(offset)
    return STEP_SEPARATOR.join(steps), ends


def score_rows(scorer, rows: list[dict], prompts: list[str], *, kind: str = "prm") -> list[list]:
    """Per row, one score per step: `kind` "prm" (the step rewards of an `ImplicitPRM`) or "likelihood" (mean token
    log-prob per step from a reference-free scorer: its token rewards are β·log π). One `score` call for all rows,
    so the scorer sorts them by length across the whole set before batching (`scorer.batch_size`)."""
    texts = [completion_and_ends(row["steps"]) for row in rows]
    results = scorer.score(prompts, [c for c, _ in texts], step_ends=[e for _, e in texts])
    scores: list[list[float]] = []
    for (_, ends), result in zip(texts, results):
        if len(result.step_rewards) != len(ends):
            raise RuntimeError(f"the scorer returned {len(result.step_rewards)} steps for {len(ends)}")
        if kind == "prm":
            scores.append([float(value) for value in result.step_rewards])
        else:
            spans = result.step_token_spans
            scores.append([sum(result.token_rewards[a:b]) / scorer.beta / max(b - a, 1) for a, b in spans])
    return scores


def likelihood_scorer(prm, batch_size: int):
    """A reference-free scorer over the PRM's reference (the policy): its token rewards are β·log π_ref.

    Returns (scorer, a function giving a fresh context manager to score under, entered once per use): for a LoRA PRM
    the reference is its adapter-disabled base."""
    from contextlib import nullcontext

    from align.prm import ImplicitPRM

    if prm.ref_model is not None:
        model, context = prm.ref_model, nullcontext
    else:
        model, context = prm.model, prm.model.disable_adapter
    scorer = ImplicitPRM(
        model,
        prm.tokenizer,
        beta=prm.beta,
        reference_free=True,
        end_of_completion=prm.suffix or None,
        batch_size=batch_size,
    )
    return scorer, context


def run_step_benchmark(
    prm,
    rows: list[dict],
    calibration_rows: list[dict] | None,
    *,
    instruction: str | None,
    style: str = "chat",
    batch_size: int = 16,
    seed: int = 0,
    likelihood: bool = True,
) -> dict:
    """ProcessBench metrics of the PRM, of the policy-likelihood baseline and of a random flag on `rows`, each at
    its best threshold there and at the threshold chosen on `calibration_rows` (when given). Sets
    `prm.batch_size` to `batch_size` (completions per forward pass)."""
    from align.data.prompts import render_prompt
    from align.evaluation.step_benchmark import evaluate_step_scores, random_step_scores

    def prompts_of(items):
        return [
            render_prompt(row["problem"], prm.tokenizer if style == "chat" else None, instruction, style)
            for row in items
        ]

    sets = {"test": rows, **({"calibration": calibration_rows} if calibration_rows else {})}
    prm.batch_size = batch_size
    reference = likelihood_scorer(prm, batch_size) if likelihood else None
    scores: dict[str, dict[str, list]] = {"prm": {}, "likelihood": {}, "random": {}}
    for name, items in sets.items():
        prompts = prompts_of(items)
        scores["prm"][name] = score_rows(prm, items, prompts, kind="prm")
        if reference is not None:
            scorer, context = reference
            with context():
                scores["likelihood"][name] = score_rows(scorer, items, prompts, kind="likelihood")
        seed_of_set = seed + (name == "calibration")
        scores["random"][name] = random_step_scores([row["steps"] for row in items], seed=seed_of_set)
    labels = {name: [row["label"] for row in items] for name, items in sets.items()}
    results = {}
    for scorer_name, by_set in scores.items():
        if not by_set:
            continue
        calibration = (by_set["calibration"], labels["calibration"]) if "calibration" in by_set else None
        results[scorer_name] = evaluate_step_scores(by_set["test"], labels["test"], calibration=calibration)
    return {
        "num_rows": len(rows),
        "num_calibration_rows": len(calibration_rows or []),
        "scorers": results,
        "step_scores": scores,
    }


def format_results(results: dict) -> str:
    """A markdown table: scorer x (best-threshold and calibrated) error acc, correct acc, F1."""
    lines = [
        "| scorer | threshold | error acc | correct acc | F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in results["scorers"].items():
        for mode in ("best", "calibrated"):
            if mode in result:
                entry = result[mode]
                lines.append(
                    f"| {name} ({'best on test' if mode == 'best' else 'chosen on calibration'}) | "
                    f"{entry['threshold']:.4g} | {100 * entry['error_accuracy']:.1f} | "
                    f"{100 * entry['correct_accuracy']:.1f} | {100 * entry['f1']:.1f} |"
                )
    return "\n".join(lines)


def synthetic_rows(num: int, num_calibration: int | None, levels, seed: int) -> tuple[list[dict], list[dict]]:
    """(test rows from the synthetic test split, calibration rows from the train split): `align eval-steps
    --synthetic`."""
    from align.data.step_errors import step_error_rows

    levels = tuple(levels)
    test = step_error_rows(num, split="test", levels=levels, seed=seed)
    return test, step_error_rows(num_calibration or num, split="train", levels=levels, seed=seed)


def write_results(output_dir: str | Path, prm_name: str, results: dict) -> Path:
    """summary.json (metrics) and step_scores.json (every scorer's per-step scores) in `output_dir`; returns the
    summary's path. `results` is `run_step_benchmark`'s."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {key: value for key, value in results.items() if key != "step_scores"}
    (out / "summary.json").write_text(json.dumps({"prm": prm_name, **metrics}, indent=2))
    (out / "step_scores.json").write_text(json.dumps(results["step_scores"]))
    return out / "summary.json"
