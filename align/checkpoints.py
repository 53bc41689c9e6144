"""Atomic checkpoints, and resuming from the newest complete one.

transformers' Trainer (5.x `_save_checkpoint`) writes `checkpoint-N/` in place, file by file: the weights (with the
files align's trainers add next to them: `attention_entropy.safetensors`, the implicit PRM's settings), then the
optimizer, scheduler, scaler and RNG states, then `trainer_state.json`, then TRL's extras. A process killed or a disk
filling up in between leaves a directory that `transformers.trainer_utils.get_last_checkpoint` still picks, and every
rerun then fails on it (`FileNotFoundError: .../trainer_state.json`, or "Can't find a valid checkpoint").

- `AtomicCheckpointsMixin` (composed into every method's trainer by `with_atomic_checkpoints`, in
  `align.training.run`) lets the Trainer write the whole checkpoint into `tmp-checkpoint-N/checkpoint-N` and renames
  it to `checkpoint-N` once every rank has written its part (ZeRO shards, per-rank RNG states). A rename within one
  filesystem is atomic, so `checkpoint-N` either holds everything or does not exist, whatever kills the process.
  (Atomic against process death and full disks; surviving a power loss would also need fsyncs.)
- `is_complete(checkpoint)`: `trainer_state.json` is present and parses, and transformers' JIT-checkpoint sentinel
  is absent. The Trainer writes the state after the weights and the optimizer, so this also recognizes the complete
  checkpoints of runs saved without the mixin, and rejects the torn ones they may have left.
- `newest_complete_checkpoint(output_dir)`: what a run resumes from; it logs every newer incomplete checkpoint and
  every interrupted save (a `tmp-checkpoint-N` directory) it skips.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil


logger = logging.getLogger("align.train")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers' `checkpoint-<global step>` folders
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N/checkpoint-N: a save in progress (or interrupted)
TRAINER_STATE_FILE = "trainer_state.json"
JIT_SENTINEL_FILE = "checkpoint-is-incomplete.txt"  # transformers' JIT (SIGTERM) checkpoint, removed when done


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when the Trainer finished writing `checkpoint` (see the module docstring)."""
    if os.path.exists(os.path.join(checkpoint, JIT_SENTINEL_FILE)):
        return False
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_FILE), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-N` of `output_dir` with the largest N (None if none), logging what it skips."""
    if not os.path.isdir(output_dir):
        return None
    names = os.listdir(output_dir)
    for name in sorted(n for n in names if n.startswith(STAGING_PREFIX + "checkpoint-")):
        logger.warning("skipping %s: a checkpoint save that was interrupted", os.path.join(output_dir, name))
    steps = {
        int(match.group(1)): name
        for name in names
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    }
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, steps[step])
        if is_complete(path):
            return path
        logger.warning(
            "skipping incomplete checkpoint %s (no readable %s: its save was interrupted)", path, TRAINER_STATE_FILE
        )
    return None


class AtomicCheckpointsMixin:
    """A Trainer mixin (first in the bases) that stages every checkpoint and renames it into place when complete.

    The Trainer derives the checkpoint path from `_get_output_dir`; during a save it returns the staging directory
    `tmp-checkpoint-N`, so everything any class in the MRO writes into "the checkpoint" (TRL's extras included)
    lands there. Afterwards the staged checkpoint is renamed to `<output_dir>/checkpoint-N`, and the rotation
    (`save_total_limit`) runs on the real directory, since the one inside the save only saw the staging directory.
    """

    _staging_dir: str | None = None

    def _get_output_dir(self, trial):
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_dir = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            # Only one save is ever in progress, so any staging directory left is from an interrupted one.
            for leftover in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
                if leftover.startswith(STAGING_PREFIX + "checkpoint-"):
                    shutil.rmtree(os.path.join(run_dir, leftover))
        self.accelerator.wait_for_everyone()  # no rank writes into a staging directory that is being removed
        self._staging_dir = staging_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank's files are in
        staged, final = os.path.join(staging_dir, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))
        if self.args.should_save:
            if os.path.exists(final):  # torn by an earlier run, or an older save of this step being redone
                shutil.rmtree(final)
            os.rename(staged, final)
            shutil.rmtree(staging_dir)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # no rank goes on (to a callback reading it) before the rename


_ATOMIC: dict[type, type] = {}


def with_atomic_checkpoints(trainer_cls: type) -> type:
    """`trainer_cls` with `AtomicCheckpointsMixin` first in its bases (same name; the same class on every call)."""
    if issubclass(trainer_cls, AtomicCheckpointsMixin):
        return trainer_cls
    if trainer_cls not in _ATOMIC:
        _ATOMIC[trainer_cls] = type(
            trainer_cls.__name__,
            (AtomicCheckpointsMixin, trainer_cls),
            {
                "__module__": trainer_cls.__module__,
                "__qualname__": trainer_cls.__qualname__,
                "__doc__": trainer_cls.__doc__,
            },
        )
    return _ATOMIC[trainer_cls]
