"""The report of `align repro prime`: held-out pass@1 / pass@8 per arm, paired-bootstrap differences, reward curves
per sampled completion (results.json, report.md, repro-prime.png)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


COMPARISONS = (("prime", "grpo"), ("prime", "rloo"), ("rloo", "grpo"))
METRICS = ("pass@1", "pass@8")


def _metrics(size) -> tuple[str, ...]:
    return tuple(metric for metric in METRICS if int(metric.split("@")[1]) <= size.n)


def comparisons(output_dir: Path, seeds: list[int], size) -> dict:
    """`{"prime-s0 - grpo-s0": {"pass@1": paired_bootstrap, ...}, "prime-s0 - start": ...}`."""
    from align.evaluation.paired import compare_runs

    samples = lambda name: output_dir / "eval" / name / "samples.jsonl"  # noqa: E731
    results = {}
    for seed in seeds:
        pairs = [(f"{a}-s{seed}", f"{b}-s{seed}") for a, b in COMPARISONS]
        pairs += [(f"{arm}-s{seed}", "start") for arm in ("prime", "rloo", "grpo")]
        for b_name, a_name in pairs:
            results[f"{b_name} - {a_name}"] = compare_runs(samples(a_name), samples(b_name), metrics=_metrics(size))
    return results


def sample_efficiency(curves: dict, arm: str, baseline: str, seeds: list[int]) -> dict:
    """PRIME's Fig. 3 at this scale: the samples `arm` needed to reach the training reward `baseline` ended at.

    Both curves are smoothed by a trailing mean over w = max(1, steps // 4) steps (single steps of 16 samples are
    too noisy: a lucky first step would "reach" anything). Target = baseline's mean over its last w steps; reached =
    samples drawn at the first step i >= w whose trailing mean is at least the target; None when it never is."""
    out = {}
    for seed in seeds:
        a, b = curves.get(f"{arm}-s{seed}", []), curves.get(f"{baseline}-s{seed}", [])
        if not a or not b:
            continue
        window = max(1, len(b) // 4)
        target = sum(point["reward"] for point in b[-window:]) / len(b[-window:])
        reached = None
        for index in range(window, len(a) + 1):
            if sum(point["reward"] for point in a[index - window : index]) / window >= target:
                reached = a[index - 1]["samples"]
                break
        out[str(seed)] = {
            "window_steps": window,
            "target_final_reward": target,
            "samples_to_reach": reached,
            "baseline_samples": b[-1]["samples"],
        }
    return out


def _fmt(result: dict) -> str:
    return f"{100 * result['diff']:+.1f} [{100 * result['low']:+.1f}, {100 * result['high']:+.1f}]" + (
        "" if result["shown"] else " (not shown)"
    )


def write_report(output_dir: Path, results: dict) -> None:
    metrics = results["metrics_names"]
    lines = ["# PRIME proving ground", "", f"Model: {results['model']}; seeds {results['seeds']}.", ""]
    lines += ["## Held-out (test split)", "", "| run | " + " | ".join(metrics) + " | mean train reward |"]
    lines += ["|---" * (len(metrics) + 2) + "|"]
    for name, summary in results["summaries"].items():
        curve = results["curves"].get(name)
        reward = f"{sum(p['reward'] for p in curve) / len(curve):.3f}" if curve else "-"
        lines.append(f"| {name} | " + " | ".join(f"{100 * summary[m]:.1f}" for m in metrics) + f" | {reward} |")
    lines += ["", "## Paired differences (points, 95 % paired-bootstrap interval over problems)", ""]
    lines += ["| difference | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, by_metric in results["comparisons"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(by_metric[m]) for m in metrics) + " |")
    lines += ["", "## Sample efficiency (training reward)", ""]
    for label, table in results["sample_efficiency"].items():
        for seed, row in table.items():
            reached = row["samples_to_reach"]
            lines.append(
                f"- {label}, seed {seed}: {label.split(' vs ')[0]}'s {row['window_steps']}-step trailing mean reward "
                + ("reached" if reached else "never reached")
                + f" {label.split(' vs ')[1]}'s final {row['target_final_reward']:.3f}"
                + (f" (after {reached} of {row['baseline_samples']} samples)" if reached else "")
            )
    lines += ["", "## Stage times (s)", "", json.dumps(results["timings"], indent=1), ""]
    (output_dir / "report.md").write_text("\n".join(lines))


def plot(output_dir: Path, curves: dict, seeds: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 3.6), squeeze=False)
    colors = {"prime": "tab:red", "rloo": "tab:blue", "grpo": "tab:gray"}
    for axis, seed in zip(axes[0], seeds):
        for arm, color in colors.items():
            curve = curves.get(f"{arm}-s{seed}")
            if not curve:
                continue
            samples = [p["samples"] for p in curve]
            running = [sum(p["reward"] for p in curve[: i + 1]) / (i + 1) for i in range(len(curve))]
            axis.plot(samples, [p["reward"] for p in curve], color=color, alpha=0.3, lw=1)
            axis.plot(samples, running, color=color, lw=2, label=f"{arm} (running mean)")
        axis.set(title=f"seed {seed}", xlabel="sampled completions", ylabel="training reward (verifier)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = output_dir / "repro-prime.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(output_dir: Path, *, summaries: dict, curves: dict, size, seeds: list[int], timings: dict) -> dict:
    metrics = _metrics(size)
    results = {
        "model": summaries["start"].get("model", ""),
        "seeds": seeds,
        "size": {**asdict(size), "levels": list(size.levels)},
        "metrics_names": list(metrics),
        "summaries": {name: {m: s["metrics"][m] for m in metrics} for name, s in summaries.items()},
        "comparisons": comparisons(output_dir, seeds, size),
        "curves": curves,
        "sample_efficiency": {
            "prime vs rloo": sample_efficiency(curves, "prime", "rloo", seeds),
            "prime vs grpo": sample_efficiency(curves, "prime", "grpo", seeds),
        },
        "timings": timings,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(output_dir, results)
    plot(output_dir, curves, seeds)
    return results
