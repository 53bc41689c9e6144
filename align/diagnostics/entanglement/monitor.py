"""The live diagnostic: `EntanglementMonitor`, one diagnosed optimizer step at a time.

Every `every` optimizer steps, `observe` (called before the step's first backward) samples up to `num_pairs` pairs of
the step's first micro-batch (each rank its own), takes their gradients g_w, g_l and geometry (`gradients`), predicts
the paper's first-order Δlog π (`prediction`), keeps the log-probs and a copy of θ. Around `optimizer.step()` it
keeps the batch gradient G the optimizer saw and, after the step, projects the real update Δθ and its parts (own pair,
other pairs, momentum, weight decay) on g_w and g_l (`update`). After the step `complete` measures Δlog π with a
no-grad forward of the same pairs; the records of all ranks are gathered and rank 0 appends them to
`<output_dir>/entanglement.jsonl` (`records`); the summary (`report`) goes to the trainer's metrics as
`entanglement/*`. `callback.EntanglementCallback` drives these calls from the Trainer's events.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from align.diagnostics.entanglement.gradients import isolated_rng, pair_gradients, pair_logps, response_row
from align.diagnostics.entanglement.prediction import (
    first_order_prediction,
    measurement,
    update_coefficients,
    update_measurement,
)
from align.diagnostics.entanglement.records import ENTANGLEMENT_FILE, append_records, restart_records
from align.diagnostics.entanglement.report import summarize
from align.diagnostics.entanglement.update import (
    PairUpdate,
    Vectors,
    decompose,
    pair_loss_gradient,
    sgd_buffers_exist,
    unsupported_reason,
    update_model,
)


# (pairs, geometry of those pairs, inputs) -> (losses, d_chosen, d_rejected) of those pairs: coefficients that can
# only be computed once the pairs are chosen (e.g. from TRL's loss type and the policy log-probs at the gradient).
CoefficientFn = Callable[[list[int], object, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class _PendingStep:
    step: int
    pairs: list[int]
    rows: list[tuple[torch.Tensor, torch.Tensor]]  # chosen and rejected of each pair, interleaved
    before: list[float]
    base_records: list[dict]
    gradients: list[tuple[Vectors, Vectors]]
    own_gradients: list[Vectors | None]  # scale · ∇ℓ_k before clipping, None when the coefficients are unknown
    theta_before: Vectors
    clip_scale: float | None = None
    batch_gradient: Vectors | None = None
    buffers_existed: list[bool] | None = None
    updates: list[tuple[PairUpdate, PairUpdate]] | None = None
    decomposition: str | None = None


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
        loss_scale: float | None = None,
        coefficient_fn: CoefficientFn | None = None,
    ) -> None:
        """Gradients, geometry and the paper's prediction for the sampled pairs, before the step's first backward.

        `losses`, `d_chosen`, `d_rejected` are per pair of the whole micro-batch (None: coefficients unknown, or given
        by `coefficient_fn` for the sampled pairs only). With `pair_weight` the update is the normalized one.
        `loss_scale` is the factor with which a pair's loss gradient enters the parameters' `.grad` before clipping,
        1/(B·GA·W) for a mean over B pairs, GA accumulation steps and W processes; None leaves the update's
        own-pair/other-pairs split out.
        """
        self._last_step = step
        num_pairs = inputs["input_ids"].size(0) // 2
        pairs = self.sample_pairs(num_pairs, step)
        with isolated_rng(), self.accelerator.autocast():
            geometry, gradients = pair_gradients(model, inputs, pairs, self.params)
            rows = [response_row(inputs, p + offset) for p in pairs for offset in (0, num_pairs)]
            rows = [(ids.detach().clone(), mask.detach().clone()) for ids, mask in rows]
            before = pair_logps(model, rows)
        theta_before = [p.detach().float().clone() for p in self.params]

        if coefficient_fn is not None:
            pair_losses, d_w, d_l = coefficient_fn(pairs, geometry, inputs)
            source = "loss"
        else:
            source, d_w, d_l = update_coefficients(pairs, geometry, d_chosen, d_rejected, pair_weight)
            pair_losses = None if losses is None else losses.detach().double().cpu()[pairs]
        predictions = first_order_prediction(geometry, d_w, d_l)
        known = source != "assumed_equal"
        own_gradients = [
            pair_loss_gradient(g_w, g_l, float(d_w[k]), float(d_l[k]), loss_scale)
            if known and loss_scale is not None
            else None
            for k, (g_w, g_l) in enumerate(gradients)
        ]
        lengths = inputs["completion_mask"].sum(dim=1).cpu()
        rank = self.accelerator.process_index
        base_records = [
            {
                "step": step + 1,  # the optimizer step whose update is measured, as the Trainer counts it
                "rank": rank,
                "pair": pair,
                "margin_loss": self.margin_loss,
                "coefficients": source,
                "loss": None if pair_losses is None else float(pair_losses[k]),
                "d_chosen": float(d_w[k]) if known else None,
                "d_rejected": float(d_l[k]) if known else None,
                "chosen_length": int(lengths[pair]),
                "rejected_length": int(lengths[pair + num_pairs]),
                **predictions[k],
            }
            for k, pair in enumerate(pairs)
        ]
        self._pending = _PendingStep(step, pairs, rows, before, base_records, gradients, own_gradients, theta_before)

    def before_optimizer_step(self, optimizer, clip_scale: float | None) -> None:
        """Keep the batch gradient G the optimizer is about to use (clipped, reduced across processes).

        `clip_scale` is the gradient-clipping factor s of this step (1 without clipping; None if unknown).
        """
        pending = self._pending
        if pending is None:
            return
        pending.clip_scale = clip_scale
        if all(p.grad is None for p in self.params):
            return  # e.g. DeepSpeed keeps its gradients partitioned, away from `.grad`
        pending.batch_gradient = [
            torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float().clone()
            for p in self.params
        ]
        pending.buffers_existed = sgd_buffers_exist(optimizer, self.params)

    def after_optimizer_step(self, optimizer) -> None:
        """Project the real update Δθ, and its parts where the optimizer allows (`update.decompose`), on g_w, g_l."""
        pending = self._pending
        if pending is None:
            return
        delta = [p.detach().float() - before for p, before in zip(self.params, pending.theta_before, strict=True)]
        reason = unsupported_reason(optimizer)
        model = None
        if reason is None and pending.batch_gradient is not None:
            model = update_model(optimizer, self.params, pending.theta_before, pending.buffers_existed)
            pending.decomposition = model.optimizer
        else:
            pending.decomposition = f"not decomposed: {reason or 'no gradient in .grad'}"
        scale = pending.clip_scale
        own = [None if g is None or scale is None else [t * scale for t in g] for g in pending.own_gradients]
        pending.updates = decompose(delta, pending.gradients, own, pending.batch_gradient, model)
        # The vectors are large (one per parameter); only the projections are needed from here on.
        pending.gradients = pending.own_gradients = []
        pending.theta_before, pending.batch_gradient = [], None

    def complete(self, model: torch.nn.Module) -> dict[str, float]:
        """After the optimizer step: measure Δlog π, gather all ranks' records, append them (rank 0), summarize."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        with torch.no_grad(), isolated_rng(), self.accelerator.autocast():
            after = pair_logps(model, pending.rows)
        records = []
        for k, base in enumerate(pending.base_records):
            before_k, after_k = (pending.before[2 * k], pending.before[2 * k + 1]), (after[2 * k], after[2 * k + 1])
            record = {**base, **measurement(base, before=before_k, after=after_k)}
            updates = None if pending.updates is None else pending.updates[k]
            record.update(update_measurement(updates, record, pending.decomposition, pending.clip_scale))
            records.append(record)
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
