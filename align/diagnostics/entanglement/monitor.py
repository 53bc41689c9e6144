"""The live diagnostic: `EntanglementMonitor` (one diagnosed optimizer step at a time) and the `TrainerCallback` that
drives it.

Every `every` optimizer steps, `observe` (called from the trainer's loss, before the backward) samples up to
`num_pairs` pairs of the step's first micro-batch (each rank its own), takes their gradient geometry (`gradients`),
predicts the first-order Δlog π (`prediction`) and keeps their log-probs. After the optimizer step,
`EntanglementCallback.on_step_end` calls `complete`: a no-grad forward of the same pairs gives the measured Δlog π,
the records of all ranks are gathered and rank 0 appends them to `<output_dir>/entanglement.jsonl` (`records`); the
summary (`report`) goes to the trainer's metrics as `entanglement/*`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from align.diagnostics.entanglement.gradients import (
    PairGeometry,
    isolated_rng,
    pair_geometry,
    pair_logps,
    response_row,
)
from align.diagnostics.entanglement.prediction import first_order_prediction, measurement, update_coefficients
from align.diagnostics.entanglement.records import ENTANGLEMENT_FILE, append_records, restart_records
from align.diagnostics.entanglement.report import summarize


@dataclass
class _PendingStep:
    step: int
    pairs: list[int]
    rows: list[tuple[torch.Tensor, torch.Tensor]]  # chosen and rejected of each pair, interleaved
    before: list[float]
    base_records: list[dict]


class EntanglementMonitor:
    """Holds the diagnostic of one optimizer step between the loss computation and the end of the step.

    Each record's `coefficients` says where its (d_w, d_l) come from (`prediction.COEFFICIENT_SOURCES`).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        num_pairs: int,
        every: int,
        output_dir: str,
        accelerator,
        seed: int = 0,
        margin_loss: str = "dpo",
    ):
        self.params = params
        self.num_pairs = num_pairs
        self.every = every
        self.path = os.path.join(output_dir, ENTANGLEMENT_FILE)
        self.accelerator = accelerator
        self.seed = seed
        self.margin_loss = margin_loss
        self._pending: _PendingStep | None = None
        self._last_step: int | None = None

    def due(self, step: int) -> bool:
        """True on the first micro-batch of every `every`-th optimizer step (step 0 included)."""
        return self.every > 0 and step % self.every == 0 and self._last_step != step

    def sample_pairs(self, num_available: int, step: int) -> list[int]:
        rng = random.Random(f"{self.seed}-{step}-{self.accelerator.process_index}")
        return sorted(rng.sample(range(num_available), min(self.num_pairs, num_available)))

    def observe(
        self,
        model: torch.nn.Module,
        inputs: dict,
        step: int,
        losses: torch.Tensor | None = None,
        d_chosen: torch.Tensor | None = None,
        d_rejected: torch.Tensor | None = None,
        pair_weight: torch.Tensor | None = None,
        geometry: PairGeometry | None = None,
    ) -> None:
        """Compute the geometry and predictions of the sampled pairs before the optimizer step.

        `losses`, `d_chosen`, `d_rejected` are per pair of the whole micro-batch (None: TRL's loss, coefficients
        unknown). With `pair_weight` the update is the normalized one. `geometry` of every pair of the micro-batch
        may be passed when it was already computed (normalized update) so it is not computed twice.
        """
        self._last_step = step
        num_pairs = inputs["input_ids"].size(0) // 2
        pairs = self.sample_pairs(num_pairs, step)
        with isolated_rng(), self.accelerator.autocast():
            if geometry is None:
                geometry = pair_geometry(model, inputs, pairs, self.params)
            else:
                geometry = geometry.select(pairs)
            rows = [response_row(inputs, p + offset) for p in pairs for offset in (0, num_pairs)]
            rows = [(ids.detach().clone(), mask.detach().clone()) for ids, mask in rows]
            before = pair_logps(model, rows)

        source, d_w, d_l = update_coefficients(pairs, geometry, d_chosen, d_rejected, pair_weight)
        predictions = first_order_prediction(geometry, d_w, d_l)
        known = source != "assumed_equal"
        lengths = inputs["completion_mask"].sum(dim=1).cpu()
        rank = self.accelerator.process_index
        base_records = [
            {
                "step": step + 1,  # the optimizer step whose update is measured, as the Trainer counts it
                "rank": rank,
                "pair": pair,
                "margin_loss": self.margin_loss,
                "coefficients": source,
                "loss": None if losses is None else float(losses.detach()[pair]),
                "d_chosen": float(d_w[k]) if known else None,
                "d_rejected": float(d_l[k]) if known else None,
                "chosen_length": int(lengths[pair]),
                "rejected_length": int(lengths[pair + num_pairs]),
                **predictions[k],
            }
            for k, pair in enumerate(pairs)
        ]
        self._pending = _PendingStep(step, pairs, rows, before, base_records)

    def complete(self, model: torch.nn.Module) -> dict[str, float]:
        """After the optimizer step: measure Δlog π, gather all ranks' records, append them (rank 0), summarize."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        with torch.no_grad(), isolated_rng(), self.accelerator.autocast():
            after = pair_logps(model, pending.rows)
        records = [
            {
                **base,
                **measurement(
                    base,
                    before=(pending.before[2 * k], pending.before[2 * k + 1]),
                    after=(after[2 * k], after[2 * k + 1]),
                ),
            }
            for k, base in enumerate(pending.base_records)
        ]
        records = self._gather(records)
        if self.accelerator.is_main_process:
            append_records(self.path, records)
        return summarize(records)

    def _gather(self, records: list[dict]) -> list[dict]:
        if self.accelerator.num_processes == 1:
            return records
        from accelerate.utils import gather_object

        return gather_object(records)

    def start_run(self, global_step: int) -> None:
        """At train begin: forget any pending step; rank 0 empties or trims the record file (`restart_records`)."""
        self._pending, self._last_step = None, None
        if self.accelerator.is_main_process:
            restart_records(self.path, global_step)


class EntanglementCallback(TrainerCallback):
    """Resets the record file at train begin and completes the pending diagnostic at the end of each step.

    `metrics` is the trainer's `_metrics["train"]` (lists averaged at the next log), so the summary appears in the
    logs, TensorBoard and W&B under `entanglement/*` at the step it was measured.
    """

    def __init__(self, monitor: EntanglementMonitor, metrics: dict[str, list]):
        self.monitor = monitor
        self.metrics = metrics

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor.start_run(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.monitor.accelerator.unwrap_model(model)
        for key, value in self.monitor.complete(model).items():
            self.metrics[key].append(value)
