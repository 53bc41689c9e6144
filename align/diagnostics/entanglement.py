"""Live gradient-entanglement diagnostics for margin-based preference training.

Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement" (ICLR 2025,
arXiv 2410.13828): with g_w = ∇θ log π(y_w|x) and g_l = ∇θ log π(y_l|x), a margin loss whose negative gradient is
d_w g_w − d_l g_l raises the chosen log-prob only while ⟨g_w, g_l⟩ < (d_w/d_l)‖g_w‖² and lowers the rejected one only
while ⟨g_w, g_l⟩ < (d_l/d_w)‖g_l‖² (algebra in `align.losses.margin`).

Every `every` optimizer steps, `EntanglementMonitor.observe` takes up to `num_pairs` pairs of the step's first
micro-batch (each rank its own) and computes, over the selected parameters, g_w and g_l of the *sequence log-probs*
(two `torch.autograd.grad` calls per pair, one unpadded forward per response), their inner product and norms, the
paper's condition ratio ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²) and the first-order predicted signs of Δlog π_w and Δlog π_l.
`EntanglementCallback.on_step_end` runs after the optimizer step (the Trainer calls it after `optimizer.step()` and
`zero_grad()`): a no-grad forward of the same pairs gives the measured Δlog π, the records of all ranks are gathered
and rank 0 appends one JSON line per pair to `<output_dir>/entanglement.jsonl`; the summary goes to the trainer's
metrics as `entanglement/*`.

The diagnostics never change the update: gradients are taken with `torch.autograd.grad` (nothing is accumulated into
`.grad`, so DDP's reducer and the optimizer never see them), on the unwrapped module, under a forked RNG, and the
pair sampling uses its own seeded generator.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from align.losses.margin import condition_ratio, cosine, first_order_deltas, normalized_update_coefficients


ENTANGLEMENT_FILE = "entanglement.jsonl"
# Predicted-regime names, from the signs of the first-order Δlog π_w and Δlog π_l.
REGIMES = ("ideal", "both_up", "both_down", "inverted", "inactive")


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters to differentiate: all of them (`trainable`: LoRA under PEFT) or those whose name matches
    the regular expression `spec` (`re.search`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters, so there is no gradient to diagnose.")
    if spec == "trainable":
        return trainable
    pattern = re.compile(spec)
    selected = [(name, p) for name, p in trainable if pattern.search(name)]
    if not selected:
        examples = ", ".join(name for name, _ in trainable[:5])
        raise ValueError(
            f"entanglement_params={spec!r} matches none of the {len(trainable)} trainable parameters (e.g. "
            f"{examples}). Use `trainable`, or a regular expression that matches some of these names."
        )
    return selected


def response_row(inputs: dict, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `row` of a right-padded preference batch without its padding: (input_ids, completion_mask), 1-D."""
    length = int(inputs["attention_mask"][row].sum())
    return inputs["input_ids"][row, :length], inputs["completion_mask"][row, :length]


def sequence_logp(model: torch.nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) summed over the completion tokens of one sequence, through TRL's fused LM head."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    outputs = model(input_ids=input_ids[None], labels=labels[None], use_cache=False, fused_lm_head=True)
    # Prompt-learning adapters prepend virtual tokens; the real tokens are the last ones (as in TRL).
    return outputs.log_probs[0, -(input_ids.numel() - 1) :].sum()


@contextmanager
def isolated_rng():
    """Run extra forwards without consuming the training RNG (dropout masks of the real step stay the same)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class PairGeometry:
    """Per pair (1-D float64 tensors): the log-probs at which the gradients were taken, ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖²."""

    logp_chosen: torch.Tensor
    logp_rejected: torch.Tensor
    inner: torch.Tensor
    chosen_norm_sq: torch.Tensor
    rejected_norm_sq: torch.Tensor

    def select(self, indices: Sequence[int]) -> PairGeometry:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PairGeometry(*(getattr(self, f).index_select(0, index) for f in self.__dataclass_fields__))


def _flat_grads(value: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    # A parameter the sequence does not reach (e.g. an unused embedding) has a zero gradient.
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b, strict=True))


def pair_geometry(
    model: torch.nn.Module, inputs: dict, pairs: Iterable[int], params: list[torch.nn.Parameter]
) -> PairGeometry:
    """Gradient geometry of the given pairs (indices into the first half of a [chosen; rejected] batch).

    Each response gets its own unpadded forward and its own `torch.autograd.grad`, so g_w and g_l are exact per-pair
    gradients (a batched backward would sum them). Cost per pair: two forwards and two backwards of one sequence.
    """
    num_pairs = inputs["input_ids"].size(0) // 2
    values = {name: [] for name in PairGeometry.__dataclass_fields__}
    for pair in pairs:
        logp_w = sequence_logp(model, *response_row(inputs, pair))
        grads_w = _flat_grads(logp_w, params)
        logp_l = sequence_logp(model, *response_row(inputs, pair + num_pairs))
        grads_l = _flat_grads(logp_l, params)
        values["logp_chosen"].append(logp_w.detach().double())
        values["logp_rejected"].append(logp_l.detach().double())
        values["inner"].append(_dot(grads_w, grads_l))
        values["chosen_norm_sq"].append(_dot(grads_w, grads_w))
        values["rejected_norm_sq"].append(_dot(grads_l, grads_l))
        del grads_w, grads_l
    return PairGeometry(**{name: torch.stack(v).cpu() for name, v in values.items()})


@torch.no_grad()
def pair_logps(model: torch.nn.Module, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    return [float(sequence_logp(model, ids, mask)) for ids, mask in rows]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _sign_correct(predicted: float, measured: float) -> bool | None:
    if predicted == 0:  # no gradient on this response (e.g. an inactive hinge): nothing was predicted
        return None
    return (predicted > 0) == (measured > 0)


def regime(predicted_chosen: float, predicted_rejected: float) -> str:
    if predicted_chosen == 0 and predicted_rejected == 0:
        return "inactive"
    up_w, up_l = predicted_chosen > 0, predicted_rejected > 0
    if up_w and not up_l:
        return "ideal"
    if up_w and up_l:
        return "both_up"
    if not up_w and not up_l:
        return "both_down"
    return "inverted"


@dataclass
class _PendingStep:
    step: int
    pairs: list[int]
    rows: list[tuple[torch.Tensor, torch.Tensor]]  # chosen and rejected of each pair, interleaved
    before: list[float]
    base_records: list[dict]


class EntanglementMonitor:
    """Holds the diagnostic of one optimizer step between the loss computation and the end of the step.

    `coefficients` says where (d_w, d_l) come from: `loss` (the margin loss's closed form), `normalized` (the pairwise
    normalized update, d = c/‖g‖), or `assumed_equal` (TRL's own `loss_type`, whose coefficients are unknown here:
    d_w = d_l, the DPO-family condition of the paper).
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

        if pair_weight is not None:
            coefficients = "normalized"
            c = pair_weight.detach().double().cpu()[pairs]
            d_w, d_l = normalized_update_coefficients(c, geometry.chosen_norm_sq, geometry.rejected_norm_sq)
        elif d_chosen is not None:
            coefficients = "loss"
            d_w, d_l = d_chosen.detach().double().cpu()[pairs], d_rejected.detach().double().cpu()[pairs]
        else:
            coefficients = "assumed_equal"
            d_w = d_l = torch.ones(len(pairs), dtype=torch.float64)
        pred_w, pred_l = first_order_deltas(
            d_w, d_l, geometry.inner, geometry.chosen_norm_sq, geometry.rejected_norm_sq
        )
        ratio = condition_ratio(geometry.inner, geometry.chosen_norm_sq, geometry.rejected_norm_sq)
        cos = cosine(geometry.inner, geometry.chosen_norm_sq, geometry.rejected_norm_sq)
        lengths = inputs["completion_mask"].sum(dim=1).cpu()
        rank = self.accelerator.process_index
        base_records = []
        for k, pair in enumerate(pairs):
            base_records.append(
                {
                    "step": step + 1,  # the optimizer step whose update is measured, as the Trainer counts it
                    "rank": rank,
                    "pair": pair,
                    "margin_loss": self.margin_loss,
                    "coefficients": coefficients,
                    "loss": None if losses is None else float(losses.detach()[pair]),
                    "d_chosen": None if coefficients == "assumed_equal" else float(d_w[k]),
                    "d_rejected": None if coefficients == "assumed_equal" else float(d_l[k]),
                    "chosen_length": int(lengths[pair]),
                    "rejected_length": int(lengths[pair + num_pairs]),
                    "inner": float(geometry.inner[k]),
                    "norm_chosen_sq": float(geometry.chosen_norm_sq[k]),
                    "norm_rejected_sq": float(geometry.rejected_norm_sq[k]),
                    "cosine": _finite(float(cos[k])),
                    "condition_ratio": _finite(float(ratio[k])),
                    "pred_delta_chosen": float(pred_w[k]),
                    "pred_delta_rejected": float(pred_l[k]),
                    "regime": regime(float(pred_w[k]), float(pred_l[k])),
                }
            )
        self._pending = _PendingStep(step, pairs, rows, before, base_records)

    def complete(self, model: torch.nn.Module) -> dict[str, float]:
        """After the optimizer step: measure Δlog π, gather all ranks' records, append them (rank 0), summarize."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        with torch.no_grad(), isolated_rng(), self.accelerator.autocast():
            after = pair_logps(model, pending.rows)
        records = []
        for k, base in enumerate(pending.base_records):
            before_w, before_l = pending.before[2 * k], pending.before[2 * k + 1]
            after_w, after_l = after[2 * k], after[2 * k + 1]
            delta_w, delta_l = after_w - before_w, after_l - before_l
            records.append(
                {
                    **base,
                    "logp_chosen": before_w,
                    "logp_rejected": before_l,
                    "logp_chosen_after": after_w,
                    "logp_rejected_after": after_l,
                    "delta_chosen": delta_w,
                    "delta_rejected": delta_l,
                    "measured_regime": regime(delta_w, delta_l),
                    "sign_correct_chosen": _sign_correct(base["pred_delta_chosen"], delta_w),
                    "sign_correct_rejected": _sign_correct(base["pred_delta_rejected"], delta_l),
                }
            )
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
        """At train begin (rank 0): a fresh run empties the file; a resumed run drops records past its checkpoint."""
        self._pending, self._last_step = None, None
        if not self.accelerator.is_main_process:
            return
        if global_step == 0 or not os.path.exists(self.path):
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            open(self.path, "w").close()
            return
        kept = [record for record in read_records(self.path) if record["step"] <= global_step]
        with open(self.path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)


def append_records(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def read_records(path: str) -> list[dict]:
    """Records of an `entanglement.jsonl`; a malformed line is reported with its line number."""
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg}); was the file truncated?") from None
            missing = {"step", "delta_chosen", "delta_rejected", "regime"} - set(record)
            if missing:
                raise ValueError(
                    f"{path}:{number}: missing fields {sorted(missing)}; is this an entanglement.jsonl written by "
                    "`align train margin` with entanglement_steps > 0?"
                )
            records.append(record)
    return records


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict[str, float]:
    """`entanglement/*` metrics over a set of pair records (one optimizer step, or a whole run)."""
    if not records:
        return {}
    active = [r for r in records if r["regime"] != "inactive"]
    predictions = [r["sign_correct_chosen"] for r in records] + [r["sign_correct_rejected"] for r in records]
    metrics = {
        "entanglement/inner_product": _mean([r["inner"] for r in records]),
        "entanglement/cosine": _mean([r["cosine"] for r in records]),
        "entanglement/condition_ratio": _mean([r["condition_ratio"] for r in records]),
        "entanglement/grad_norm_chosen": _mean([math.sqrt(r["norm_chosen_sq"]) for r in records]),
        "entanglement/grad_norm_rejected": _mean([math.sqrt(r["norm_rejected_sq"]) for r in records]),
        "entanglement/delta_logp_chosen": _mean([r["delta_chosen"] for r in records]),
        "entanglement/delta_logp_rejected": _mean([r["delta_rejected"] for r in records]),
        "entanglement/frac_chosen_down": _mean([float(r["delta_chosen"] < 0) for r in records]),
        "entanglement/frac_rejected_up": _mean([float(r["delta_rejected"] > 0) for r in records]),
        "entanglement/sign_accuracy": _mean([float(c) for c in predictions if c is not None]),
        "entanglement/sign_accuracy_chosen": _mean(
            [float(r["sign_correct_chosen"]) for r in records if r["sign_correct_chosen"] is not None]
        ),
        "entanglement/sign_accuracy_rejected": _mean(
            [float(r["sign_correct_rejected"]) for r in records if r["sign_correct_rejected"] is not None]
        ),
    }
    if active:
        for name in ("ideal", "both_up", "both_down"):
            metrics[f"entanglement/frac_{name}"] = sum(r["regime"] == name for r in active) / len(active)
        metrics["entanglement/frac_entangled"] = (
            metrics["entanglement/frac_both_up"] + metrics["entanglement/frac_both_down"]
        )
    return {key: value for key, value in metrics.items() if value is not None}


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


def plot_entanglement(records: list[dict], output: str) -> str:
    """Four panels: chosen/rejected log-prob trajectories, condition ratio, regime fractions, prediction accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("No entanglement records to plot.")
    by_step: dict[int, list[dict]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    steps = sorted(by_step)
    per_step = [summarize(by_step[s]) for s in steps]

    def series(key: str) -> list[float]:
        return [m.get(key, math.nan) for m in per_step]

    def mean_of(field: str) -> list[float]:
        return [_mean([r[field] for r in by_step[s]]) for s in steps]

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    # Each step diagnoses different pairs, so their absolute log-probs are not comparable across steps; the running
    # sum of the per-step mean measured change is the trajectory the sampled pairs trace.
    for field, label in (("delta_chosen", "chosen"), ("delta_rejected", "rejected")):
        ax.plot(steps, list(itertools.accumulate(mean_of(field))), marker="o", label=f"{label}: Σ Δlog π")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_title("Cumulative measured Δlog π (mean over the diagnosed pairs)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[0][1]
    ratios = [r["condition_ratio"] for r in records if r["condition_ratio"] is not None]
    ax.scatter(
        [r["step"] for r in records if r["condition_ratio"] is not None], ratios, s=10, alpha=0.5, label="pairs"
    )
    ax.plot(steps, series("entanglement/condition_ratio"), color="black", label="mean")
    ax.axhline(1.0, color="red", linestyle="--", label="ratio = 1")
    ax.set_title("⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[1][0]
    for name in ("ideal", "both_up", "both_down"):
        ax.plot(steps, series(f"entanglement/frac_{name}"), marker="o", label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Fraction of pairs per predicted regime")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[1][1]
    ax.plot(steps, series("entanglement/sign_accuracy_chosen"), marker="o", label="chosen")
    ax.plot(steps, series("entanglement/sign_accuracy_rejected"), marker="o", label="rejected")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Sign of Δlog π: predicted (first order) vs measured")
    ax.set_xlabel("optimizer step")
    ax.legend()

    overall = summarize(records)
    fig.suptitle(
        f"Gradient entanglement ({len(records)} pair measurements, {len(steps)} steps): "
        f"entangled {overall.get('entanglement/frac_entangled', math.nan):.0%}, "
        f"sign accuracy {overall.get('entanglement/sign_accuracy', math.nan):.0%}"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
