"""The pass@N harness: sample n completions per problem, grade them, group their answers, score them, summarize.

`run_eval(EvalConfig)` is `align eval`: problems -> prompts (`align.data.prompts.render_prompt`, exactly as in
training) -> backend -> `Grader` -> samples.jsonl (one record per problem, flushed as soon as it is graded) ->
optional PRM scores -> summary.json + passk.png. A run is resumable: rerunning it with the same output directory
skips the problems already in samples.jsonl, and refuses to mix in samples drawn with a different configuration.

Under `accelerate launch` / `torchrun` (environment RANK / WORLD_SIZE), problem i belongs to rank i % world_size;
each rank appends to its own `samples.part-RANK.jsonl`, and rank 0 waits for all problems, merges the parts into
samples.jsonl in problem order and writes the summary. Because sampling is seeded per sequence, the samples (so
the summary) do not depend on the number of processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from align.data.prompts import DEFAULT_INSTRUCTION, render_prompt
from align.evaluation.backends import GenerationBackend, SamplingConfig, get_backend, resolve_backend_name
from align.evaluation.records import (
    RUN_CONFIG_FILE,
    SAMPLES_FILE,
    append_record,
    drop_torn_tail,
    normalize_record,
    read_jsonl,
    read_records,
    write_json_atomic,
    write_records_atomic,
)


logger = logging.getLogger("align.eval")

_PART_GLOB = "samples.part-*.jsonl"
_WAIT_POLL_S = 2.0


class RunConfigMismatchError(ValueError):
    """The output directory holds samples drawn with a different configuration."""


# ---------------------------------------------------------------------------------------------------------------------
# Grading and answer grouping


def grade_records(records: list[dict], grader, progress: bool = False) -> None:
    """Fill in each sample's `verdict` / `extracted`, the record's `num_correct`, and the answer `group`s."""
    items = [(sample["completion"], record["answer"]) for record in records for sample in record["samples"]]
    results = iter(grader.grade_many(items, progress=progress))
    for record in records:
        for sample in record["samples"]:
            result = next(results)
            sample["verdict"], sample["extracted"] = result.verdict, result.extracted
        record["num_correct"] = sum(sample["verdict"] == "correct" for sample in record["samples"])
    assign_answer_groups(records, grader)


def assign_answer_groups(records: list[dict], grader) -> None:
    """Number each problem's distinct answers, equivalent answers sharing a number (for maj@k).

    Correct samples all equal the gold, so they form one group. Incorrect answers are compared pairwise with
    `grader.equivalent` (math-verify; identical strings need no check) and grouped into connected components, so
    the grouping does not depend on sample order. Samples without an answer, or whose grading timed out, get None.
    """
    plans, pairs = [], []
    for record in records:
        wrong = list(
            dict.fromkeys(
                sample["extracted"].strip()
                for sample in record["samples"]
                if sample["verdict"] == "incorrect" and sample.get("extracted") is not None
            )
        )
        plans.append((wrong, len(pairs)))
        pairs.extend((wrong[i], wrong[j]) for i in range(len(wrong)) for j in range(i + 1, len(wrong)))
    equivalent = grader.equivalent_many(pairs) if pairs else []
    for record, (wrong, start) in zip(records, plans):
        component = _components(len(wrong), equivalent[start:])
        index_of = {answer: i for i, answer in enumerate(wrong)}
        numbers: dict = {}
        for sample in record["samples"]:
            if sample["verdict"] == "correct":
                key = "correct"
            elif sample["verdict"] == "incorrect" and sample.get("extracted") is not None:
                key = component[index_of[sample["extracted"].strip()]]
            else:
                sample["group"] = None
                continue
            sample["group"] = numbers.setdefault(key, len(numbers))


def _components(size: int, equivalent) -> list[int]:
    """Connected components (as a representative index per item) of items 0..size-1, given the equivalence of
    every pair (i, j), i < j, in row-major order (only the first size*(size-1)/2 entries are read)."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = ((i, j) for i in range(size) for j in range(i + 1, size))
    for (i, j), same in zip(pairs, equivalent):
        if same:
            parent[root(j)] = root(i)
    return [root(i) for i in range(size)]


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def _check_unique_ids(problems) -> None:
    seen = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(
                f"problem id {problem.id!r} appears twice in the dataset; results are stored per id, so ids must be "
                "unique (map a unique column with --column-mapping id=COLUMN)."
            )
        seen.add(problem.id)


def sample_and_grade(
    problems,
    backend: GenerationBackend,
    grader,
    sampling: SamplingConfig,
    *,
    prompt_style: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
    output_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Sample `sampling.n` completions per problem, grade them, and return one record per problem (input order).

    With `output_path`, records already in that file are reused instead of regenerated, and every new record is
    appended and flushed as soon as its problem is graded, so a killed run loses at most the batch in flight.
    """
    from tqdm.auto import tqdm

    _check_unique_ids(problems)
    done: dict[str, dict] = {}
    path = Path(output_path) if output_path is not None else None
    if path is not None and path.exists():
        drop_torn_tail(path)
        done = {record["id"]: record for record in read_records(path)}
    todo = [problem for problem in problems if problem.id not in done]
    if todo:
        handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally, across the loop)
        per_call = max(1, backend.prompts_per_call(sampling.n))
        generate_bar = tqdm(total=len(todo) * sampling.n, desc="generate", unit="sample", disable=not progress)
        grade_bar = tqdm(total=len(todo) * sampling.n, desc="grade", unit="sample", disable=not progress)
        try:
            for start in range(0, len(todo), per_call):
                chunk = todo[start : start + per_call]
                prompts = [render_prompt(p.problem, backend.tokenizer, instruction, prompt_style) for p in chunk]
                began = time.perf_counter()
                completions = backend.generate(prompts, sampling)
                generation_s = time.perf_counter() - began
                _check_shape(completions, len(chunk), sampling.n)
                generate_bar.update(len(chunk) * sampling.n)
                began = time.perf_counter()
                records = [
                    _new_record(problem, prompt, outputs, generation_s / len(chunk))
                    for problem, prompt, outputs in zip(chunk, prompts, completions)
                ]
                grade_records(records, grader)
                grading_s = time.perf_counter() - began
                for record in records:
                    record["grading_s"] = round(grading_s / len(chunk), 4)
                    done[record["id"]] = record
                    if handle is not None:
                        append_record(handle, record)
                grade_bar.update(len(chunk) * sampling.n)
        finally:
            generate_bar.close()
            grade_bar.close()
            if handle is not None:
                handle.close()
    return [done[problem.id] for problem in problems]


def _check_shape(completions, num_prompts: int, n: int) -> None:
    if len(completions) != num_prompts or any(len(outputs) != n for outputs in completions):
        shape = [len(outputs) for outputs in completions]
        raise RuntimeError(f"the backend returned {shape} completions for {num_prompts} prompts x n={n}")


def _new_record(problem, prompt: str, outputs, generation_s: float) -> dict:
    return {
        "id": problem.id,
        "problem": problem.problem,
        "answer": problem.answer,
        "level": problem.level,
        "subject": problem.subject,
        "prompt": prompt,
        "samples": [
            {"completion": out.text, "num_tokens": out.num_tokens, "finish_reason": out.finish_reason}
            for out in outputs
        ],
        "generation_s": round(generation_s, 4),
    }


# ---------------------------------------------------------------------------------------------------------------------
# PRM scoring


def prm_descriptor(path: str, ref: str | None, aggregate: str, beta: float | None) -> dict:
    return {"prm": path, "ref": ref, "aggregate": aggregate, "beta": beta}


def load_scorer(path: str, ref: str | None = None, beta: float | None = None):
    """`align.prm.ImplicitPRM.from_pretrained`, imported only when a PRM is asked for."""
    try:
        from align.prm import ImplicitPRM
    except ImportError as error:
        raise ImportError(
            f"--prm needs align.prm (the implicit PRM), which cannot be imported here ({error}). Update align, or "
            "evaluate without --prm."
        ) from error
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
    bar = tqdm(total=len(todo), desc="score", unit="sample", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
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


# ---------------------------------------------------------------------------------------------------------------------
# Runs: resumable, sharded across processes


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, processes on this node) from the launcher's environment (torchrun / accelerate)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return int(os.environ.get("RANK", 0)), world, max(1, local_world)


def check_run_config(output_dir: Path, identity: dict, write: bool) -> None:
    """Refuse to resume a run whose stored configuration differs; record the configuration of a new run."""
    path = output_dir / RUN_CONFIG_FILE
    if path.exists():
        import json

        stored = json.loads(path.read_text())
        differences = _differences(stored, identity)
        if differences:
            raise RunConfigMismatchError(
                f"{output_dir} holds samples drawn with a different configuration:\n  "
                + "\n  ".join(differences)
                + f"\nUse another --output-dir, or delete {output_dir / SAMPLES_FILE} (and {RUN_CONFIG_FILE}) "
                "to start over."
            )
        return
    if (output_dir / SAMPLES_FILE).exists():
        logger.warning("%s has samples but no %s; cannot check they match this run", output_dir, RUN_CONFIG_FILE)
    if write:
        write_json_atomic(path, identity)


def _differences(stored, current, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == current else [f"{prefix.rstrip('.')}: {stored!r} (existing) vs {current!r} (now)"]


def _files_with_records(output_dir: Path) -> list[Path]:
    return [path for path in [output_dir / SAMPLES_FILE, *sorted(output_dir.glob(_PART_GLOB))] if path.exists()]


def _done_ids(output_dir: Path) -> set[str]:
    return {record["id"] for path in _files_with_records(output_dir) for _, record in read_jsonl(path)}


def collect_samples(
    problems,
    run,
    n: int,
    output_dir: str | os.PathLike,
    *,
    backend_factory: Callable[..., GenerationBackend] | None = None,
) -> list[dict] | None:
    """Sample and grade every problem into `output_dir` (resuming, sharded over ranks); rank 0 gets the records.

    `run` is a `SamplingRunArguments` (an `EvalConfig` or builder config); `backend_factory` defaults to
    `get_backend` and is only called when there is something left to sample. Other ranks return None.
    """
    from align.grading import Grader

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_unique_ids(problems)
    rank, world, local_world = process_rank()
    backend_name = resolve_backend_name(run.backend)
    check_run_config(output_dir, run.identity(n, backend_name), write=rank == 0)
    own_path = output_dir / (SAMPLES_FILE if world == 1 else f"samples.part-{rank}.jsonl")
    done = _done_ids(output_dir)
    mine = [problem for index, problem in enumerate(problems) if index % world == rank and problem.id not in done]
    logger.info("rank %d/%d: %d problems to sample, %d already done", rank, world, len(mine), len(done))
    if mine:
        backend = (backend_factory or get_backend)(backend_name, run.model, dtype=run.dtype, batch_size=run.batch_size)
        workers = run.grader_workers or max(1, len(os.sched_getaffinity(0)) // local_world)
        try:
            with Grader(num_workers=workers, timeout_s=run.grading_timeout) as grader:
                sample_and_grade(
                    mine,
                    backend,
                    grader,
                    run.sampling(n),
                    prompt_style=run.prompt_style,
                    instruction=run.prompt_instruction,
                    output_path=own_path,
                    progress=run.progress and rank == 0,
                )
        finally:
            backend.close()
    if rank != 0:
        return None
    wanted = {problem.id for problem in problems}
    while not wanted <= _done_ids(output_dir):
        time.sleep(_WAIT_POLL_S)  # other ranks are still sampling; the launcher stops us if one of them fails
    return _merge(output_dir, problems)


def _merge(output_dir: Path, problems) -> list[dict]:
    """Fold part files into samples.jsonl (problems in order, then records of earlier, larger runs)."""
    files = _files_with_records(output_dir)
    by_id: dict[str, dict] = {}
    for path in files:
        for record in read_records(path):
            by_id.setdefault(record["id"], record)
    order = [problem.id for problem in problems]
    ordered = [by_id[i] for i in order] + [record for i, record in by_id.items() if i not in set(order)]
    samples_path = output_dir / SAMPLES_FILE
    parts = [path for path in files if path != samples_path]
    stored = [record["id"] for record in read_records(samples_path)] if samples_path.exists() else None
    if parts or stored != [record["id"] for record in ordered]:
        write_records_atomic(samples_path, ordered)
        for path in parts:
            path.unlink()
    return ordered[: len(order)]


# ---------------------------------------------------------------------------------------------------------------------
# `align eval`


def run_eval(config) -> dict | None:
    """The `align eval` pipeline (see the module docstring); returns the summary (None on ranks other than 0)."""
    from align.data.loaders import load_problems
    from align.evaluation.report import summarize, write_report

    if config.samples:
        return regrade_samples(config)
    output_dir = Path(config.output_dir)
    loaded = load_problems(
        config.dataset,
        config.split,
        limit=config.limit,
        skip_invalid=config.skip_invalid,
        column_mapping=config.column_mapping,
        synthetic_levels=tuple(config.synthetic_levels),
        synthetic_seed=config.synthetic_seed,
        dataset_config=config.dataset_config,
        row_format=config.row_format,
    )
    if loaded.skipped:
        logger.warning(
            "skipped %d invalid rows of %s (first: %s)", loaded.skipped, loaded.source, loaded.skipped_reasons[0]
        )
    if not loaded.problems:
        raise ValueError(f"{loaded.source} has no valid problems to evaluate")
    records = collect_samples(loaded.problems, config, config.n, output_dir)
    if records is None:
        return None
    prm = _score_if_asked(config, records)
    if prm is not None:
        write_records_atomic(output_dir / SAMPLES_FILE, _with_extras(output_dir, records))
    summary = summarize(
        records,
        n=config.n,
        seed=config.seed,
        num_subsets=config.maj_num_subsets,
        meta={
            **config.identity(config.n, resolve_backend_name(config.backend)),
            "source": loaded.source,
            "skipped_rows": loaded.skipped,
            "prm": prm,
        },
    )
    write_report(summary, output_dir, plot=config.plot)
    return summary


def _with_extras(output_dir: Path, records: list[dict]) -> list[dict]:
    """`records` plus the records in samples.jsonl that are not part of this run (kept, never dropped)."""
    ids = {record["id"] for record in records}
    return records + [r for r in read_records(output_dir / SAMPLES_FILE) if r["id"] not in ids]


def _score_if_asked(config, records: list[dict]) -> dict | None:
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


def regrade_samples(config) -> dict:
    """`align eval --samples FILE`: re-grade (and with --prm re-score) existing generations; no model is loaded."""
    import json

    from align.evaluation.report import summarize, write_report
    from align.grading import Grader

    source = Path(config.samples)
    if not source.is_file():
        raise FileNotFoundError(f"--samples {source}: no such file")
    records = [normalize_record(record, str(source), line) for line, record in read_jsonl(source)]
    if not records:
        raise ValueError(f"--samples {source} holds no records")
    output_dir = Path(config.output_dir) if config.output_dir else source.parent
    n = min(len(record["samples"]) for record in records)
    if any(len(record["samples"]) != n for record in records):
        logger.warning("records have different numbers of samples; pass@k and maj@k use k <= %d", n)
    with Grader(num_workers=config.grader_workers, timeout_s=config.grading_timeout) as grader:
        grade_records(records, grader, progress=config.progress)
    prm = None
    if config.prm:
        _fill_missing_prompts(records, config)
        prm = _score_if_asked(config, records)
    write_records_atomic(output_dir / SAMPLES_FILE, records)
    stored = source.parent / RUN_CONFIG_FILE
    meta = json.loads(stored.read_text()) if stored.exists() else {}
    summary = summarize(
        records,
        n=n,
        seed=config.seed,
        num_subsets=config.maj_num_subsets,
        meta={**meta, "source": str(source), "prm": prm},
    )
    write_report(summary, output_dir, plot=config.plot)
    return summary


def _fill_missing_prompts(records: list[dict], config) -> None:
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
