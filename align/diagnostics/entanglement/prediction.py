"""First-order prediction of Δlog π_w and Δlog π_l from a pair's gradient geometry, and its comparison with the change
measured after the optimizer step.

Yuan et al. 2024 (arXiv 2410.13828): an update d_w g_w − d_l g_l changes the log-probs, to first order per unit step,
by Δlog π_w = d_w ‖g_w‖² − d_l ⟨g_w, g_l⟩ and Δlog π_l = d_w ⟨g_w, g_l⟩ − d_l ‖g_l‖² (`first_order_deltas` in
`align.losses.margin`). The signs of the two give the pair's regime.
"""

from __future__ import annotations

import math

import torch

from align.diagnostics.entanglement.gradients import PairGeometry
from align.losses.margin import condition_ratio, cosine, first_order_deltas, normalized_update_coefficients


# Predicted-regime names, from the signs of the first-order Δlog π_w and Δlog π_l.
REGIMES = ("ideal", "both_up", "both_down", "inverted", "inactive")
# Where (d_w, d_l) come from: the margin loss's closed form, the pairwise normalized update (d = c/‖g‖), or TRL's own
# `loss_type`, whose coefficients are unknown here (d_w = d_l = 1 assumed, the DPO-family condition of the paper).
COEFFICIENT_SOURCES = ("loss", "normalized", "assumed_equal")


def regime(predicted_chosen: float, predicted_rejected: float) -> str:
    """One of `REGIMES` from the signs of Δlog π_w and Δlog π_l (predicted or measured)."""
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


# A measured |Δlog π| below this is not resolved, and its sign is not scored. The measurement is the difference of two
# float32 sequence log-probs (sums of up to a few hundred per-token terms of magnitude ≲ 10, each rounded to ~1e-6
# relative); 1e-4 nats is above that rounding by an order of magnitude. Under bf16 autocast the forwards round at
# ~4e-3 relative and small changes are not resolved at all: diagnose in float32 to score the signs.
SIGN_RESOLUTION_NATS = 1e-4


def sign_correct(predicted: float | None, measured: float) -> bool | None:
    """Whether the predicted Δlog π has the measured sign; None where nothing was predicted (no gradient on the
    response, e.g. an inactive hinge) or the measured change is below `SIGN_RESOLUTION_NATS`."""
    if predicted is None or predicted == 0 or abs(measured) < SIGN_RESOLUTION_NATS:
        return None
    return (predicted > 0) == (measured > 0)


def update_coefficients(
    pairs: list[int],
    geometry: PairGeometry,
    d_chosen: torch.Tensor | None = None,
    d_rejected: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(source, d_w, d_l) of the sampled `pairs` (float64, CPU), with source one of `COEFFICIENT_SOURCES`.

    `d_chosen`, `d_rejected`, `pair_weight` are per pair of the whole micro-batch; `geometry` is of the sampled pairs.
    With `pair_weight` the update is the normalized one, d = c/‖g‖; with neither, TRL's loss (d_w = d_l = 1).
    """
    if pair_weight is not None:
        c = pair_weight.detach().double().cpu()[pairs]
        d_w, d_l = normalized_update_coefficients(c, geometry.chosen_norm_sq, geometry.rejected_norm_sq)
        return "normalized", d_w, d_l
    if d_chosen is not None:
        return "loss", d_chosen.detach().double().cpu()[pairs], d_rejected.detach().double().cpu()[pairs]
    ones = torch.ones(len(pairs), dtype=torch.float64)
    return "assumed_equal", ones, ones


def _defined(value: float, both_norms_positive: bool) -> float | None:
    return value if both_norms_positive and math.isfinite(value) else None


def first_order_prediction(geometry: PairGeometry, d_w: torch.Tensor, d_l: torch.Tensor) -> list[dict]:
    """Per pair: the geometry (inner product, squared norms, cosine, condition ratio), the first-order Δlog π_w and
    Δlog π_l per unit step, and the predicted regime.

    Cosine and condition ratio are None for a pair with a zero gradient norm (and where not finite): the pure
    functions define them as 0 there, but a record's None keeps such pairs out of the run's mean cosine and ratio
    (`report.summarize`) instead of pulling the means toward 0.
    """
    inner, norm_w, norm_l = geometry.inner, geometry.chosen_norm_sq, geometry.rejected_norm_sq
    pred_w, pred_l = first_order_deltas(d_w, d_l, inner, norm_w, norm_l)
    ratio = condition_ratio(inner, norm_w, norm_l)
    cos = cosine(inner, norm_w, norm_l)
    positive = ((norm_w > 0) & (norm_l > 0)).tolist()
    return [
        {
            "inner": float(inner[k]),
            "norm_chosen_sq": float(norm_w[k]),
            "norm_rejected_sq": float(norm_l[k]),
            "cosine": _defined(float(cos[k]), positive[k]),
            "condition_ratio": _defined(float(ratio[k]), positive[k]),
            "pred_delta_chosen": float(pred_w[k]),
            "pred_delta_rejected": float(pred_l[k]),
            "regime": regime(float(pred_w[k]), float(pred_l[k])),
        }
        for k in range(inner.numel())
    ]


def measurement(
    prediction: dict, before: tuple[float, float], after: tuple[float, float]
) -> dict[str, float | str | bool | None]:
    """The measured change of one pair, (log π_w, log π_l) before and after the step, against its `prediction`."""
    delta_w, delta_l = after[0] - before[0], after[1] - before[1]
    return {
        "logp_chosen": before[0],
        "logp_rejected": before[1],
        "logp_chosen_after": after[0],
        "logp_rejected_after": after[1],
        "delta_chosen": delta_w,
        "delta_rejected": delta_l,
        "measured_regime": regime(delta_w, delta_l),
        "sign_correct_chosen": sign_correct(prediction["pred_delta_chosen"], delta_w),
        "sign_correct_rejected": sign_correct(prediction["pred_delta_rejected"], delta_l),
    }


UPDATE_PARTS = ("own", "other_pairs", "momentum", "weight_decay")


def update_measurement(updates, record: dict, decomposition: str | None, clip_scale: float | None) -> dict:
    """The update-based prediction g·Δθ of one pair and its parts (`update.decompose`), scored against the measured
    change in `record`. `updates` is (chosen, rejected) `PairUpdate`, or None when the step was not observed."""
    fields: dict = {"update_decomposition": decomposition, "clip_scale": clip_scale}
    for side, index in (("chosen", 0), ("rejected", 1)):
        update = None if updates is None else updates[index]
        predicted = None if update is None else update.predicted
        fields[f"predicted_update_{side}"] = predicted
        for part in UPDATE_PARTS:
            fields[f"update_{part}_{side}"] = None if update is None else getattr(update, part)
        fields[f"update_sign_correct_{side}"] = sign_correct(predicted, record[f"delta_{side}"])
    return fields
