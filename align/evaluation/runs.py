"""Run directories: sampling resumable across restarts and sharded across processes.

`collect_samples(problems, run, n, output_dir)` samples and grades every problem into `output_dir/samples.jsonl`.
Rerunning it with the same directory skips the problems already there, and refuses to mix in samples drawn with a
different configuration (`run_config.json` holds the identity of the run that drew them; `RunConfigMismatchError`).
A directory holding no samples yet (its first run failed before sampling) accepts any configuration.

Under `accelerate launch` / `torchrun` (environment RANK / WORLD_SIZE), problem i belongs to rank i % world_size;
each rank appends to its own `samples.part-RANK.jsonl`, and rank 0 waits for all problems, merges the parts into
samples.jsonl in problem order and returns the records. Because sampling is seeded per sequence, the samples (so
the summary) do not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from align.errors import InputError
from align.evaluation.backends import get_backend, resolve_backend_name
from align.evaluation.generation import GenerationBackend
from align.evaluation.records import (
    RUN_CONFIG_FILE,
    SAMPLES_FILE,
    read_jsonl,
    read_records,
    write_json_atomic,
    write_records_atomic,
)
from align.evaluation.sample_and_grade import check_unique_ids, sample_and_grade
from align.grading import Grader


logger = logging.getLogger("align.eval")

_PART_GLOB = "samples.part-*.jsonl"
_WAIT_POLL_S = 2.0


class RunConfigMismatchError(InputError):
    """The output directory holds samples drawn with a different configuration."""


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / accelerate); (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_run_config(output_dir: Path, identity: dict, write: bool, has_samples: bool) -> None:
    """Refuse to resume a run whose samples were drawn with another configuration; record the configuration.

    The identity binds the samples, so it binds only once there are some: a directory whose earlier run recorded
    none (it failed before its first sample, say on a misspelt --model) takes the new configuration, with a warning.
    """
    path = output_dir / RUN_CONFIG_FILE
    if path.exists():
        differences = _differences(json.loads(path.read_text()), identity)
        if not differences:
            return
        if has_samples:
            raise RunConfigMismatchError(
                f"{output_dir} holds samples drawn with a different configuration ({'; '.join(differences)}); use "
                f"another --output-dir, or delete {output_dir / SAMPLES_FILE} (and {RUN_CONFIG_FILE}) to start over"
            )
        logger.warning(
            "%s recorded no samples: replacing its %s (%s)", output_dir, RUN_CONFIG_FILE, "; ".join(differences)
        )
    elif has_samples:
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
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_unique_ids(problems)
    rank, world = process_rank()
    backend_name = resolve_backend_name(run.backend)
    done = _done_ids(output_dir)
    check_run_config(output_dir, run.identity(n, backend_name), write=rank == 0, has_samples=bool(done))
    own_path = output_dir / (SAMPLES_FILE if world == 1 else f"samples.part-{rank}.jsonl")
    mine = [problem for index, problem in enumerate(problems) if index % world == rank and problem.id not in done]
    logger.info("rank %d/%d: %d problems to sample, %d already done", rank, world, len(mine), len(done))
    if mine:
        backend = (backend_factory or get_backend)(
            backend_name, run.model, dtype=run.dtype, batch_size=run.batch_size, **run.backend_kwargs
        )
        try:
            with Grader(num_workers=run.grader_workers, timeout_s=run.grading_timeout) as grader:
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
