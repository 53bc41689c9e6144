"""What the `align repro` experiments share: the configuration record of a run directory, and directory names.

An experiment writes its configuration to `repro_config.json` and refuses to mix its results into a directory that
holds results of another configuration (`check_repro_config`), so that a rerun can reuse every finished stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from align.errors import InputError


REPRO_CONFIG_FILE = "repro_config.json"


class ReproConfigMismatchError(InputError):
    """The output directory holds results of an experiment with another configuration."""


def slug(method: str) -> str:
    """A directory name for a method label: "DCO N'=16" -> "dco_n16" (no quotes or spaces to escape in a shell)."""
    return re.sub(r"[^a-z0-9]+", "_", method.lower().replace("'=", "")).strip("_")


def has_results(output_dir: Path) -> bool:
    """Any trained checkpoint or model, any recorded sample or exact-coverage record, any measured confidence."""
    from align.checkpoints import is_complete
    from align.evaluation.records import read_jsonl
    from align.pipeline import is_trained

    runs = [path for path in (output_dir / "train").glob("*") if path.is_dir()]
    if any(is_trained(run) or any(map(is_complete, run.glob("checkpoint-*"))) for run in runs):
        return True
    records = [*(output_dir / "eval").glob("*/samples*.jsonl"), *(output_dir / "eval").glob("*/exact_coverage.jsonl")]
    if any(read_jsonl(path) for path in records):
        return True
    return any((output_dir / "confidence").glob("*.json"))


def check_repro_config(output_dir: Path, config: dict) -> None:
    """Record the experiment's configuration in `repro_config.json`; refuse a different one once results exist.

    A directory whose earlier run produced nothing (it failed first, say on a misspelt --model) takes the new one.
    """
    path = output_dir / REPRO_CONFIG_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        differences = [
            f"{key}: {stored.get(key)!r} (existing) vs {config.get(key)!r} (now)"
            for key in sorted(set(stored) | set(config))
            if stored.get(key) != config.get(key)
        ]
        if differences and has_results(output_dir):
            raise ReproConfigMismatchError(
                f"{output_dir} holds results of a different configuration ({'; '.join(differences)}); use another "
                f"--output-dir, or delete {output_dir} to start over"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
