"""The numbers of `align repro margin`: per-pair changes, bootstrap intervals, paired differences, verdicts, the
sign agreement of the entanglement predictions and the CHES rank correlations. Pure numpy, no model.

Per pair, with log-probs of the start model (π_0) and of the trained one (π), summed over the completion's tokens:
Δw = log π(y_w) − log π_0(y_w), Δl likewise; the pair's chosen log-prob *fell* when Δw < −1e-4 nats (float32
sequence log-probs round far below that; the entanglement diagnostics score signs above the same resolution);
margin = Δw − Δl (the DPO implicit reward relative to the start, β left out: one definition for every arm, SimPO's
included); reward correct = margin > 0; ln-margin = Δw/|y_w| − Δl/|y_l| (the change of SimPO's length-normalized
margin). Every mean has a percentile-bootstrap 95 % interval over pairs, every difference between two arms a paired
one (the same pairs resampled in both arms), 10,000 resamples (`align.evaluation.bootstrap`).
"""

from __future__ import annotations

import numpy as np


ARMS = ("dpo", "dpo_normalized", "simpo")
BASELINE = "dpo"
FELL_NATS = 1e-4
QUANTITIES = ("chosen_fell", "delta_chosen", "delta_rejected", "reward_correct", "margin", "ln_margin")
LABELS = {
    "chosen_fell": "frac chosen fell",
    "delta_chosen": "mean Δlog π_w",
    "delta_rejected": "mean Δlog π_l",
    "reward_correct": "reward acc",
    "margin": "margin",
    "ln_margin": "ln-margin",
}
# name -> (quantity, direction the claim asserts for dpo_normalized − dpo)
CLAIM_A = {"a1": ("chosen_fell", -1), "a2": ("delta_chosen", +1)}
SIGN_FIELDS = (
    "sign_correct_chosen",
    "sign_correct_rejected",
    "update_sign_correct_chosen",
    "update_sign_correct_rejected",
)
SPLIT_FIELDS = tuple(
    f"update_{part}_{side}"
    for side in ("chosen", "rejected")
    for part in ("own", "other_pairs", "momentum", "weight_decay")
)


def per_pair(start: list[dict], after: list[dict]) -> dict[str, np.ndarray]:
    """Every quantity of the module docstring, one value per pair (pairs in the same order in both lists)."""
    if len(start) != len(after):
        raise ValueError(f"{len(start)} start measurements against {len(after)} after training: not the same pairs")
    get = lambda rows, key: np.array([row[key] for row in rows], dtype=float)  # noqa: E731
    delta_w = get(after, "logp_chosen") - get(start, "logp_chosen")
    delta_l = get(after, "logp_rejected") - get(start, "logp_rejected")
    margin = delta_w - delta_l
    return {
        "chosen_fell": (delta_w < -FELL_NATS).astype(float),
        "delta_chosen": delta_w,
        "delta_rejected": delta_l,
        "reward_correct": (margin > 0).astype(float),
        "margin": margin,
        "ln_margin": delta_w / np.maximum(get(start, "len_chosen"), 1)
        - delta_l / np.maximum(get(start, "len_rejected"), 1),
    }


def intervals(values: dict[str, np.ndarray], resamples: int = 10_000) -> dict[str, dict]:
    """`{quantity: {"mean", "low", "high"}}`: each mean with its 95 % bootstrap interval (one set of resamples)."""
    from align.evaluation.bootstrap import percentile_interval

    matrix = np.stack([values[name] for name in QUANTITIES], axis=1)
    low, high = percentile_interval(matrix, resamples=resamples)
    return {
        name: {"mean": float(matrix[:, i].mean()), "low": float(low[i]), "high": float(high[i])}
        for i, name in enumerate(QUANTITIES)
    }


def paired_differences(base: dict[str, np.ndarray], other: dict[str, np.ndarray], resamples: int = 10_000) -> dict:
    """`{quantity: {"diff", "low", "high"}}` of other − base, with the paired-bootstrap 95 % interval over pairs."""
    difference = {name: other[name] - base[name] for name in QUANTITIES}
    return {
        name: {"diff": row["mean"], "low": row["low"], "high": row["high"]}
        for name, row in intervals(difference, resamples).items()
    }


def verdict(low: float, high: float, direction: int) -> str:
    """`shown` when the interval excludes 0 on the claimed side, `refuted` on the other side, else `not shown`."""
    claimed, opposite = (low > 0, high < 0) if direction > 0 else (high < 0, low > 0)
    return "shown" if claimed else "refuted" if opposite else "not shown"


def claim_verdicts(difference: dict) -> dict:
    """Verdicts of the claim's parts from the dpo_normalized − dpo differences of one seed and split.

    (a) = a1 (smaller fraction of chosen-fell) and a2 (higher mean Δw): shown when both are, refuted when either is.
    (b) "does not lose margin": refuted when a loss is shown (interval below 0), shown when a gain is (above 0), and
    otherwise not shown: no loss is shown, and the interval's lower end bounds the loss the data leave possible.
    """
    parts = {name: verdict(difference[q]["low"], difference[q]["high"], sign) for name, (q, sign) in CLAIM_A.items()}
    if all(value == "shown" for value in parts.values()):
        parts["a"] = "shown"
    else:
        parts["a"] = "refuted" if "refuted" in parts.values() else "not shown"
    parts["b"] = verdict(difference["margin"]["low"], difference["margin"]["high"], +1)
    return parts


def sign_agreement(records: list[dict]) -> dict:
    """Fraction of correct first-order sign predictions over the scored (non-None) records, per prediction field,
    and the mean of each part of the update-based split (fields read with .get: older records lack them)."""
    out: dict[str, dict] = {"records": len(records)}
    for field in SIGN_FIELDS:
        values = [bool(r[field]) for r in records if r.get(field) is not None]
        out[field] = {"n": len(values), "frac_correct": sum(values) / len(values) if values else None}
    for field in SPLIT_FIELDS:
        values = [float(r[field]) for r in records if r.get(field) is not None]
        out[field] = {"n": len(values), "mean": sum(values) / len(values) if values else None}
    measured = [float(r["delta_chosen"]) for r in records if r.get("delta_chosen") is not None]
    out["frac_measured_chosen_fell"] = sum(d < -FELL_NATS for d in measured) / len(measured) if measured else None
    return out


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=float)
    n = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    positions = np.broadcast_to(np.arange(n), values.shape)
    change = ordered[..., 1:] != ordered[..., :-1]
    starts = np.where(np.concatenate([np.ones_like(change[..., :1]), change], axis=-1), positions, 0)
    ends = np.where(np.concatenate([change, np.ones_like(change[..., :1])], axis=-1), positions, n)
    first = np.maximum.accumulate(starts, axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(ends, axis=-1), axis=-1), axis=-1)
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def _rowwise_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def spearman(x, y, *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Spearman's ρ of paired values with its percentile-bootstrap 95 % interval over pairs (resamples whose ranks
    are constant, ρ undefined, are left out)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"need two equally long 1-d arrays of at least 3 paired values, got {x.shape} and {y.shape}")
    rho = float(_rowwise_correlation(average_ranks(x), average_ranks(y)))
    picks = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    boot = _rowwise_correlation(average_ranks(x[picks]), average_ranks(y[picks]))
    boot = boot[np.isfinite(boot)]
    low, high = np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan)
    return {"n": len(x), "rho": rho, "low": float(low), "high": float(high), "shown": bool(low > 0 or high < 0)}
