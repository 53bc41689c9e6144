"""Accuracy-against-k curves on a log-2 axis: one run's metric families, or several runs' one family.

`plot_curves` is the one implementation; `align.evaluation.report.plot_passk` (passk.png of `align eval`) and
`plot_family` (`align.pipeline.plot_pass_curves`: `align demo`, `align repro`) only choose which curves to draw.
"""

from __future__ import annotations

from pathlib import Path


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, *, title: str, ylabel: str) -> Path:
    """One line per `label: (ks, values)`, k on a log-2 axis with every k of the longest curve as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, (ks, values) in curves.items():
        axis.plot(ks, values, marker="o", label=label)
    ticks = max((ks for ks, _ in curves.values()), key=len, default=[1])
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(k) for k in ticks])
    axis.set_xlabel("k (samples per problem)")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_family(summaries: dict[str, dict], path: Path, *, title: str, family: str = "pass") -> Path:
    """One `family@k` curve per run (`name: summary`) against k."""
    curves = {
        name: (summary["ks"], [summary["metrics"][f"{family}@{k}"] for k in summary["ks"]])
        for name, summary in summaries.items()
    }
    return plot_curves(curves, path, title=title, ylabel=f"{family}@k")
