"""Summaries of entanglement records: the `entanglement/*` training metrics and the four-panel plot of a run."""

from __future__ import annotations

import itertools
import math
import os


def _mean(values: list[float | None]) -> float | None:
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
    for side in ("", "_chosen", "_rejected"):
        sides = ("chosen", "rejected") if not side else (side[1:],)
        scored = [r.get(f"update_sign_correct_{s}") for r in records for s in sides]
        metrics[f"entanglement/update_sign_accuracy{side}"] = _mean([float(c) for c in scored if c is not None])
    for part in ("own", "other_pairs", "momentum", "weight_decay"):
        metrics[f"entanglement/update_{part}_chosen"] = _mean([r.get(f"update_{part}_chosen") for r in records])
    if active:
        for name in ("ideal", "both_up", "both_down"):
            metrics[f"entanglement/frac_{name}"] = sum(r["regime"] == name for r in active) / len(active)
        metrics["entanglement/frac_entangled"] = (
            metrics["entanglement/frac_both_up"] + metrics["entanglement/frac_both_down"]
        )
    return {key: value for key, value in metrics.items() if value is not None}


def plot_entanglement(records: list[dict], output: str) -> str:
    """Six panels: chosen/rejected log-prob trajectories, condition ratio, regime fractions, the sign accuracy of both
    predictions, measured against update-predicted Δlog π, and where the chosen log-prob's change came from."""
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

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
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
    ax.plot(steps, series("entanglement/sign_accuracy_chosen"), marker="o", label="pairwise (paper), chosen")
    ax.plot(steps, series("entanglement/sign_accuracy_rejected"), marker="o", label="pairwise (paper), rejected")
    ax.plot(steps, series("entanglement/update_sign_accuracy_chosen"), marker="s", label="g·Δθ, chosen")
    ax.plot(steps, series("entanglement/update_sign_accuracy_rejected"), marker="s", label="g·Δθ, rejected")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Sign of Δlog π: predicted (first order) vs measured")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    for side, marker in (("chosen", "o"), ("rejected", "x")):
        scored = [r for r in records if r.get(f"predicted_update_{side}") is not None]
        ax.scatter(
            [r[f"predicted_update_{side}"] for r in scored],
            [r[f"delta_{side}"] for r in scored],
            s=14,
            marker=marker,
            alpha=0.6,
            label=side,
        )
    limits = [r.get(f"predicted_update_{s}") for r in records for s in ("chosen", "rejected")]
    limits = [abs(v) for v in limits if v is not None] + [
        abs(r[f"delta_{s}"]) for r in records for s in ("chosen", "rejected")
    ]
    bound = max(limits) if limits else 1.0
    ax.plot([-bound, bound], [-bound, bound], color="gray", linestyle="--", linewidth=0.8, label="y = x")
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.axvline(0.0, color="gray", linewidth=0.5)
    ax.set_title("Measured Δlog π vs predicted from the real update g·Δθ")
    ax.set_xlabel("g·Δθ (nats)")
    ax.set_ylabel("measured Δlog π (nats)")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    # Where the chosen log-prob's change came from: the update's parts, mean over the step's diagnosed pairs.
    parts = (("own", "own pair"), ("other_pairs", "other pairs"), ("momentum", "momentum"), ("weight_decay", "decay"))
    positive, negative = [0.0] * len(steps), [0.0] * len(steps)
    for part, label in parts:
        values = [_mean([r.get(f"update_{part}_chosen") for r in by_step[s]]) or 0.0 for s in steps]
        bottoms = [p if v >= 0 else n for v, p, n in zip(values, positive, negative, strict=True)]
        ax.bar(steps, values, bottom=bottoms, label=label, alpha=0.8)
        positive = [p + max(v, 0.0) for v, p in zip(values, positive, strict=True)]
        negative = [n + min(v, 0.0) for v, n in zip(values, negative, strict=True)]
    ax.plot(steps, mean_of("delta_chosen"), color="black", marker="o", label="measured")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_title("Chosen Δlog π by source (first order, mean over pairs)")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)

    overall = summarize(records)
    fig.suptitle(
        f"Gradient entanglement ({len(records)} pair measurements, {len(steps)} steps): "
        f"entangled {overall.get('entanglement/frac_entangled', math.nan):.0%}, "
        f"sign accuracy: pairwise {overall.get('entanglement/sign_accuracy', math.nan):.0%}, "
        f"from the update {overall.get('entanglement/update_sign_accuracy', math.nan):.0%}"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
