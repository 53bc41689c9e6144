"""Per-sample scores for bon@k and weighted maj@k: from an implicit PRM (`align.prm`: a `score` and `step_rewards`
per sample; imported only when one is asked for, and any object with a `score` method works), or read from a field
of a samples file that an external ORM/PRM scored (`--score-field`).
"""

from __future__ import annotations

import math

from align.data.prompts import render_prompt
from align.evaluation.records import SamplesFileError


SCORE_CALL_BATCHES = 32  # forward batches' worth of completions handed to the scorer per call


def prm_descriptor(path: str, ref: str | None, aggregate: str, beta: float | None) -> dict:
    """What a record's scores were computed with (`scored_with`): records scored alike are not scored again."""
    return {"prm": path, "ref": ref, "aggregate": aggregate, "beta": beta}


def check_scorer_paths(path: str, ref: str | None = None) -> None:
    """A `--prm` / `--prm-ref` that is no model (a missing path, a data directory, a .jsonl file) raises
    `InputError` naming the flag; `align eval` checks this before it samples or grades anything."""
    from align.errors import InputError
    from align.models import check_model_name

    for flag, location in (("--prm", path), ("--prm-ref", ref)):
        if location is not None:
            try:
                check_model_name(location, offline_copy=True)
            except InputError as error:
                hint = ". A PRM is the output directory of `align train prm`." if flag == "--prm" else ""
                raise type(error)(f"{flag}: {error}{hint}") from None


def load_scorer(path: str, ref: str | None = None, beta: float | None = None):
    """`align.prm.ImplicitPRM.from_pretrained`, imported only when a PRM is asked for (then its paths are checked)."""
    try:
        from align.prm import ImplicitPRM
    except ImportError as error:
        raise ImportError(
            f"--prm needs align.prm (the implicit PRM), which cannot be imported here ({error}). Update align, or "
            "evaluate without --prm."
        ) from error
    check_scorer_paths(path, ref)
    kwargs = {"ref_model": ref}
    if beta is not None:  # otherwise the PRM's own beta (from its saved config)
        kwargs["beta"] = beta
    return ImplicitPRM.from_pretrained(path, **kwargs)


def score_records(
    records: list[dict],
    scorer,
    *,
    aggregate: str = "min",
    batch_size: int = 8,
    descriptor: dict | None = None,
    progress: bool = True,
) -> int:
    """Give every sample a `score` and `step_rewards` from `scorer.score(prompts, completions, aggregate=...)`.

    Any object with that method works (it returns one object with `.score` and `.step_rewards` per completion).
    Records already scored with the same `descriptor` are kept. Returns the number of samples scored.
    """
    from tqdm.auto import tqdm

    todo = [
        (record, sample)
        for record in records
        if record.get("scored_with") != descriptor or any("score" not in s for s in record["samples"])
        for sample in record["samples"]
    ]
    if hasattr(scorer, "batch_size"):
        scorer.batch_size = batch_size  # completions per forward pass
    # Calls of many completions (whole problems' samples together), so that an ImplicitPRM encodes each prompt once
    # for all its samples and sorts the completions by length across problems; the bar moves per call.
    per_call = batch_size * SCORE_CALL_BATCHES
    bar = tqdm(total=len(todo), desc="score", unit="sample", disable=not progress)
    try:
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            results = scorer.score(
                [r["prompt"] for r, _ in chunk], [s["completion"] for _, s in chunk], aggregate=aggregate
            )
            if len(results) != len(chunk):
                raise RuntimeError(f"the scorer returned {len(results)} results for {len(chunk)} completions")
            for (record, sample), result in zip(chunk, results):
                score = float(result.score)
                if score != score:  # NaN: refuse it here rather than let it poison bon@k silently
                    raise ValueError(f"the scorer returned NaN for a completion of problem {record['id']!r}")
                sample["score"] = score
                sample["step_rewards"] = [float(value) for value in result.step_rewards]
            bar.update(len(chunk))
    finally:
        bar.close()
    for record in records:
        record["scored_with"] = descriptor
    return len(todo)


def score_if_asked(config, records: list[dict]) -> dict | None:
    """With `config.prm` (an `EvalConfig`), score the records not yet scored alike; returns the descriptor."""
    if not config.prm:
        return None
    descriptor = prm_descriptor(config.prm, config.prm_ref, config.prm_aggregate, config.prm_beta)
    if all(record.get("scored_with") == descriptor for record in records):
        return descriptor
    scorer = load_scorer(config.prm, config.prm_ref, config.prm_beta)
    score_records(
        records,
        scorer,
        aggregate=config.prm_aggregate,
        batch_size=config.prm_batch_size,
        descriptor=descriptor,
        progress=config.progress,
    )
    return descriptor


def scores_from_field(record: dict, field: str, where: str) -> None:
    """`--score-field FIELD`: every sample's `score` is its number in `field`, scored elsewhere; `where` names the
    record's file and line for the error a missing or non-numeric value gets (none is guessed: a missing score would
    silently rank a sample last or first)."""
    for index, sample in enumerate(record["samples"]):
        if field not in sample:
            raise SamplesFileError(
                f"{where}: problem {record['id']!r}, sample index {index} (from 0) has no field {field!r}; "
                f"--score-field {field} needs a number there in every sample (or leave out --score-field)"
            )
        value = sample[field]
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise SamplesFileError(
                f"{where}: problem {record['id']!r}, sample index {index} (from 0): field {field!r} is "
                f"{value!r:.60} ({type(value).__name__}), not a number; --score-field needs a number in every sample"
            )
        sample["score"] = float(value)
    record["scored_with"] = {"score_field": field}


def fill_missing_prompts(records: list[dict], config) -> None:
    """Records produced elsewhere may lack the rendered prompt a PRM needs: render it as training would."""
    missing = [record for record in records if not record.get("prompt")]
    if not missing:
        return
    tokenizer = None
    if config.prompt_style == "chat":
        from align.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    for record in missing:
        if not record.get("problem"):
            raise ValueError(
                f"record {record['id']!r} has neither 'prompt' nor 'problem'; the PRM needs the prompt it was given"
            )
        record["prompt"] = render_prompt(record["problem"], tokenizer, config.prompt_instruction, config.prompt_style)
