"""Sample n completions per problem with a backend, grade them, and append one record per problem to a file.

One process, one samples file: records already in the file are reused, and every new record is appended and
flushed as soon as its problem is graded, so a killed run loses at most the batch in flight. Sharding over
processes and checking that a run directory was sampled with the same configuration is `align.evaluation.runs`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from align.data.prompts import DEFAULT_INSTRUCTION, render_prompt
from align.evaluation.generation import GenerationBackend, SamplingConfig
from align.evaluation.grouping import grade_records
from align.evaluation.records import append_record, drop_torn_tail, read_records


def check_unique_ids(problems) -> None:
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

    check_unique_ids(problems)
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
                engine = backend.engine()
                records = [
                    {**_new_record(problem, prompt, outputs, generation_s / len(chunk)), "engine": engine}
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
