"""`align eval --exact-coverage`: exact coverage of a model on a run directory's problems, resumable.

`run_exact_coverage(config, problems, output_dir)` scores every problem (`align.evaluation.exact_coverage`) into
`output_dir/exact_coverage.jsonl`, reusing the records already there, and refuses to mix in records computed under
another configuration (`exact_coverage_config.json`: model, problems, prompt, dtype, temperature, top-p, completion
format; a sampling run's `run_config.json` is separate, since exact coverage draws no samples). The model is loaded
as the `hf` backend loads it (dtype, merged adapter, end-of-sequence ids), and only when something is left to score.
It runs on the main process (rank 0) alone: one forward pass per problem is cheap next to sampling.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.evaluation.exact_coverage import RECORDS_FILE, coverage_block, done_records, exact_coverage_records
from align.evaluation.records import SUMMARY_FILE, write_json_atomic
from align.evaluation.runs import RunConfigMismatchError, process_rank


logger = logging.getLogger("align.eval")

CONFIG_FILE = "exact_coverage_config.json"
PLOT_FILE = "exact_coverage.png"


def exact_identity(config) -> dict:
    """What makes stored exact-coverage records reusable: the run's identity without its sampling count and
    backend, plus the distribution scored (temperature, top-p) and the completion format."""
    identity = config.identity(1, "hf")
    del identity["sampling"], identity["backend"]
    return {
        **identity,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "completion_format": config.exact_coverage_format,
    }


def _check_identity(output_dir: Path, identity: dict, has_records: bool) -> None:
    path = output_dir / CONFIG_FILE
    if path.exists() and has_records:
        stored = json.loads(path.read_text())
        differences = [
            f"{key}: {stored.get(key)!r} (existing) vs {identity.get(key)!r} (now)"
            for key in sorted(set(stored) | set(identity))
            if stored.get(key) != identity.get(key)
        ]
        if differences:
            raise RunConfigMismatchError(
                f"{output_dir} holds exact coverage computed with a different configuration ({'; '.join(differences)}"
                f"); use another --output-dir, or delete {output_dir / RECORDS_FILE} to start over"
            )
    write_json_atomic(path, identity)


def run_exact_coverage(config, problems, output_dir: Path) -> dict | None:
    """The `exact_coverage` block of summary.json for `problems` (an `EvalConfig` run); None on ranks other than 0.

    Writes exact_coverage.jsonl (per-problem log p) and, with `config.plot`, exact_coverage.png.
    """
    if process_rank()[0] != 0:
        return None
    from align.evaluation.backends import resolve_backend_name
    from align.evaluation.batching import AUTO, batch_cap
    from align.evaluation.plots import plot_exact_coverage
    from align.grading import Grader

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RECORDS_FILE
    done = done_records(path)
    _check_identity(output_dir, exact_identity(config), has_records=bool(done))
    left = sum(problem.id not in done for problem in problems)
    logger.info("exact coverage: %d problems to score, %d already done", left, len(problems) - left)
    backend = None
    if left:
        from align.evaluation.hf_backend import HFBackend

        device = config.backend_kwargs.get("device") if resolve_backend_name(config.backend) == "hf" else None
        backend = HFBackend(config.model, dtype=config.dtype, batch_size=config.batch_size, device=device)
    try:
        with Grader(num_workers=config.grader_workers, timeout_s=config.grading_timeout) as grader:
            records = exact_coverage_records(
                backend.model if backend else None,
                backend.tokenizer if backend else None,
                problems,
                grader=grader,
                prompt_style=config.prompt_style,
                instruction=config.prompt_instruction,
                completion_format=config.exact_coverage_format,
                temperature=config.temperature,
                top_p=config.top_p,
                # `auto`: the sampling cap (no KV cache here, and only the last few positions' logits)
                batch_size=batch_cap(backend.device if backend else "cpu")
                if config.batch_size == AUTO
                else config.batch_size,
                output_path=path,
                skip_invalid=config.skip_invalid,
                progress=config.progress,
            )
    finally:
        if backend is not None:
            backend.close()
    block = coverage_block(records, seed=config.seed)
    if block["skipped"]:
        logger.warning(
            "exact coverage skipped %d problems without a canonical answer (first: %s)",
            len(block["skipped"]), block["skipped"][0]["reason"],
        )  # fmt: skip
    if config.plot:
        plot_exact_coverage(
            {config.model: block},
            output_dir / PLOT_FILE,
            title=f"{config.model} on {config.dataset} ({block['num_problems']} problems, exact, "
            f"temperature {config.temperature}, top-p {config.top_p})",
        )
    return block


def exact_only_summary(config, loaded, block: dict) -> dict:
    """summary.json of `align eval --exact-coverage` without sampling (`--n 0`, the default with exact coverage)."""
    from align.evaluation.report import package_versions

    summary = {
        **exact_identity(config),
        "source": loaded.source,
        "skipped_rows": loaded.skipped,
        "num_problems": block["num_problems"],
        "n": 0,
        "exact_coverage": block,
        "versions": package_versions(),
    }
    write_json_atomic(Path(config.output_dir) / SUMMARY_FILE, summary)
    return summary
