"""Accuracy-against-k curves on a log-2 axis: one run's metric families, or several runs' one family.

`plot_curves` is the one implementation; `align.evaluation.report.plot_passk` (passk.png of `align eval`) and
`plot_family` (`align.pipeline.plot_pass_curves`: `align demo`, `align repro`) only choose which curves to draw.
`plot_exact_coverage` draws exact-coverage curves (N = 1..10^4, log-10 axis) of one or several runs.
"""

from __future__ import annotations

from pathlib import Path


MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")
DODGE_OCTAVES = 0.04  # horizontal distance between neighbouring curves' points, in octaves of k


def draw_curves(
    axis, curves: dict[str, tuple[list[int], list[float]]], errors: dict[str, list[float]] | None = None
) -> None:
    """One line per `label: (ks, values)` on `axis`, with ±1 standard error bars where `errors[label]` is given.

    Curves that coincide (pass@k = maj@k = bon@k is common at small k) would hide each other: each gets its own
    marker and line style, and its points are moved a few hundredths of an octave sideways (dodged, centred on k)
    so that every curve and its error bars stay visible; the ticks stay at the true k.
    """
    errors = errors or {}
    count = len(curves)
    for index, (label, (ks, values)) in enumerate(curves.items()):
        shift = 2.0 ** ((index - (count - 1) / 2) * DODGE_OCTAVES)
        axis.errorbar(
            [k * shift for k in ks],
            values,
            yerr=errors.get(label),
            marker=MARKERS[index % len(MARKERS)],
            linestyle=LINESTYLES[index % len(LINESTYLES)],
            markersize=4,
            capsize=2,
            label=label,
        )


def plot_curves(
    curves: dict[str, tuple[list[int], list[float]]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    errors: dict[str, list[float]] | None = None,
) -> Path:
    """`draw_curves` on a log-2 k axis with every k of the longest curve as a tick, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    draw_curves(axis, curves, errors)
    ticks = max((ks for ks, _ in curves.values()), key=len, default=[1])
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(k) for k in ticks])
    axis.set_xlabel("k (samples per problem)")
    axis.set_ylabel(ylabel)
    return _save(figure, axis, path, title)


def curve_errors(summary: dict, family: str) -> list[float] | None:
    """The standard errors of `family@k` for every k of a summary, or None when its `stderr` lacks any of them."""
    stderr = summary.get("stderr") or {}
    values = [stderr.get(f"{family}@{k}") for k in summary["ks"]]
    return values if all(value is not None for value in values) else None


def plot_family(summaries: dict[str, dict], path: Path, *, title: str, family: str = "pass") -> Path:
    """One `family@k` curve per run (`name: summary`) against k, with error bars from each summary's `stderr`."""
    curves = {
        name: (summary["ks"], [summary["metrics"][f"{family}@{k}"] for k in summary["ks"]])
        for name, summary in summaries.items()
    }
    errors = {name: curve_errors(summary, family) for name, summary in summaries.items()}
    return plot_curves(curves, path, title=title, ylabel=f"{family}@k", errors=errors)


def plot_exact_coverage(blocks: dict[str, dict], path: Path, *, title: str) -> Path:
    """Exact-coverage curves (`align.evaluation.exact_coverage.coverage_block`), one per run (`name: block`): the
    pass@N lower bound against N = 1..10^4 on a log-10 axis, with 95 % bootstrap intervals at the key N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, (name, block) in enumerate(blocks.items()):
        (line,) = axis.plot(
            block["curve"]["n"], block["curve"]["pass"], linestyle=LINESTYLES[index % len(LINESTYLES)], label=name
        )
        ns = [int(n) for n in block["ci95"]]
        values = [block["pass_at"][str(n)] for n in ns]
        below = [value - block["ci95"][str(n)][0] for n, value in zip(ns, values)]
        above = [block["ci95"][str(n)][1] - value for n, value in zip(ns, values)]
        axis.errorbar(
            ns, values, yerr=[below, above], fmt=MARKERS[index % len(MARKERS)], color=line.get_color(), capsize=2
        )
    axis.set_xscale("log")
    axis.set_xlabel("N (samples per problem)")
    axis.set_ylabel("pass@N lower bound (exact)")
    return _save(figure, axis, path, title)


def _save(figure, axis, path: Path, title: str) -> Path:
    """The finish every align curve figure shares: a 0-1 y axis, grid, legend, title; written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    axis.set_ylim(0, 1)
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
