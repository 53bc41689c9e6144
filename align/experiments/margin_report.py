"""The report of `align repro margin`: per arm and seed the claim's quantities with bootstrap intervals, the paired
differences against DPO, the verdicts, the entanglement sign agreement and the CHES correlations (results.json,
report.md, repro-margin.png). Definitions: `align.experiments.margin_stats`."""

from __future__ import annotations

import json
from pathlib import Path

from align.experiments.margin_stats import (
    ARMS,
    BASELINE,
    LABELS,
    QUANTITIES,
    SIGN_FIELDS,
    SPLIT_FIELDS,
    claim_verdicts,
    intervals,
    paired_differences,
    per_pair,
    sign_agreement,
    spearman,
)


SPLITS = {"train": "training pairs", "test": "held-out pairs"}
FRACTIONS = ("chosen_fell", "reward_correct")


def compute_results(*, config: dict, start: dict, after: dict, entanglement: dict, ches: dict, timings: dict) -> dict:
    """results.json from the measurements: `start[split]` and `after[name][split]` are `sequence_log_probs` lists,
    `entanglement[name]` a run's records, `ches` `ches_scores`' result; names are `<arm>-s<seed>`."""
    seeds = config["seeds"]
    values = {split: {name: per_pair(start[split], m[split]) for name, m in after.items()} for split in SPLITS}
    results = {"config": config, "seeds": seeds, "arms": list(ARMS), "summaries": {}, "differences": {}}
    results["verdicts"] = {}
    for split in SPLITS:
        results["summaries"][split] = {name: intervals(v) for name, v in values[split].items()}
        results["differences"][split], results["verdicts"][split] = {}, {}
        for seed in seeds:
            base = values[split].get(f"{BASELINE}-s{seed}")
            for arm in ARMS[1:]:
                other = values[split].get(f"{arm}-s{seed}")
                if base is not None and other is not None:
                    results["differences"][split][f"{arm}-s{seed} - {BASELINE}-s{seed}"] = paired_differences(
                        base, other
                    )
            key = f"dpo_normalized-s{seed} - {BASELINE}-s{seed}"
            if key in results["differences"][split]:
                results["verdicts"][split][str(seed)] = claim_verdicts(results["differences"][split][key])
    results["sign_agreement"] = {name: sign_agreement(records) for name, records in entanglement.items()}
    for arm in ARMS:
        pooled = [r for name, records in entanglement.items() if name.rsplit("-s", 1)[0] == arm for r in records]
        results["sign_agreement"][f"{arm} (all seeds)"] = sign_agreement(pooled)
    if "records" in ches:
        results["ches"] = {}
        for seed in seeds:
            dpo = values["train"].get(f"{BASELINE}-s{seed}")
            if dpo is not None:
                results["ches"][str(seed)] = {
                    key: spearman([r[key] for r in ches["records"]], dpo["delta_chosen"])
                    for key in ("ches", "ln_ches")
                }
    else:
        results["ches"] = {"skipped": ches.get("skipped", "no CHES scores")}
    results["timings"] = timings
    return results


def _cell(row: dict, quantity: str, key: str = "mean") -> str:
    digits = 2 if quantity in FRACTIONS else 3
    return f"{row[key]:+.{digits}f} [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"


def _rho(row: dict) -> str:
    return f"{row['rho']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]" + ("" if row["shown"] else " (not shown)")


def _verdict_lines(results: dict) -> list[str]:
    lines = []
    for split, label in SPLITS.items():
        for seed, parts in results["verdicts"][split].items():
            difference = results["differences"][split][f"dpo_normalized-s{seed} - {BASELINE}-s{seed}"]
            fell, up, margin = (difference[q] for q in ("chosen_fell", "delta_chosen", "margin"))
            lines.append(f"- **seed {seed}, {label}: (a) {parts['a']}, (b) {parts['b']}.**")
            lines.append(
                "  (a1) fraction of pairs whose chosen log-prob fell, normalized − dpo: "
                f"{_cell(fell, 'chosen_fell', 'diff')} → {parts['a1']}; (a2) mean Δlog π_w, normalized − dpo: "
                f"{_cell(up, 'delta_chosen', 'diff')} nats → {parts['a2']}."
            )
            if parts["b"] == "refuted":
                text = f"the normalized update lost margin ({-margin['diff']:.3f} nats, interval below 0)"
            elif parts["b"] == "shown":
                text = "the normalized update gained margin (interval above 0)"
            else:
                text = f"no loss of margin is shown; a loss of up to {max(-margin['low'], 0):.3f} nats is not excluded"
            lines.append(f"  (b) margin, normalized − dpo: {_cell(margin, 'margin', 'diff')} nats: {text}.")
    return lines


def _summary_lines(results: dict) -> list[str]:
    lines = []
    for split, label in SPLITS.items():
        verdicts = results["verdicts"][split]
        for part, claim in (("a", "chosen kept from falling (a)"), ("b", "margin not lost (b)")):
            counts = {
                v: sum(parts[part] == v for parts in verdicts.values()) for v in ("shown", "not shown", "refuted")
            }
            lines.append(
                f"- {label}, {claim}: shown in {counts['shown']} of {len(verdicts)} seeds, not shown in "
                f"{counts['not shown']}, refuted in {counts['refuted']}."
            )
    return lines


def write_report(output_dir: Path, results: dict) -> None:
    config = results["config"]
    lines = ["# Margin proving ground: does the pairwise normalized update keep chosen log-probs up?", ""]
    lines += [
        f"Model {config['model']} + fresh LoRA (the recipes' r=16, all linear layers); {config['num_train']} training "
        f"pairs, {config['steps']} steps of {config['batch_size']}, AdamW lr {config['learning_rate']} constant after "
        f"{config['warmup_steps']} warm-up steps, max_length {config['max_length']}, float32; {config['num_test']} "
        f"held-out pairs (other problems, never trained on); seeds {results['seeds']}. Arms: "
        + "; ".join(f"`{arm}` {json.dumps(fields)}" for arm, fields in config["arms"].items())
        + ".",
        "",
        "Claim: pairwise normalized gradients keep chosen log-probs from falling (a) without losing the margin (b).",
        "",
        "Definitions (one for every arm): Δw = log π(y_w) − log π_0(y_w) over the response tokens, π_0 the start "
        "model (Δl likewise); chosen fell: Δw < −1e-4 nats; margin = Δw − Δl, the DPO implicit reward relative to the "
        "start (β left out); reward acc = fraction of pairs with margin > 0; ln-margin = Δw/|y_w| − Δl/|y_l|, the "
        "change of the length-normalized margin SimPO optimizes. Intervals: 95 % percentile bootstrap over pairs; "
        "differences: paired bootstrap (same pairs in both arms). Verdict: shown when the interval excludes 0 in the "
        "claimed direction, refuted when it excludes 0 in the other, not shown otherwise.",
        "",
        "## Verdicts",
        "",
        *_summary_lines(results),
        "",
        *_verdict_lines(results),
    ]
    for split, label in SPLITS.items():
        lines += ["", f"## Per arm, {label}", ""]
        lines += ["| run | " + " | ".join(LABELS[q] for q in QUANTITIES) + " |", "|---" * (len(QUANTITIES) + 1) + "|"]
        for name, row in results["summaries"][split].items():
            lines.append(f"| {name} | " + " | ".join(_cell(row[q], q) for q in QUANTITIES) + " |")
        lines += ["", f"## Paired differences, {label}", ""]
        lines += ["| difference | " + " | ".join(LABELS[q] for q in QUANTITIES) + " |"]
        lines += ["|---" * (len(QUANTITIES) + 1) + "|"]
        for name, row in results["differences"][split].items():
            lines.append(f"| {name} | " + " | ".join(_cell(row[q], q, "diff") for q in QUANTITIES) + " |")
    lines += ["", "## Entanglement diagnostics: first-order sign agreement (entanglement.jsonl)", ""]
    lines += [
        "Fraction of measured Δlog π whose sign the prediction got right (n scored; unresolved changes and missing "
        "fields are not scored): `sign_correct_*` is the paper's pairwise prediction, `update_sign_correct_*` the "
        "prediction from the real parameter update g·Δθ; then the mean split of the chosen log-prob's predicted "
        "change by source (nats).",
        "",
        "| run | records | " + " | ".join(SIGN_FIELDS) + " | " + " | ".join(SPLIT_FIELDS[:4]) + " |",
        "|---" * (2 + len(SIGN_FIELDS) + 4) + "|",
    ]
    for name, row in results["sign_agreement"].items():
        signs = [
            "-" if row[f]["frac_correct"] is None else f"{row[f]['frac_correct']:.2f} ({row[f]['n']})"
            for f in SIGN_FIELDS
        ]
        split = ["-" if row[f]["mean"] is None else f"{row[f]['mean']:+.2e}" for f in SPLIT_FIELDS[:4]]
        lines.append(f"| {name} | {row['records']} | " + " | ".join(signs + split) + " |")
    lines += ["", "## CHES (likelihood displacement, Razin et al. 2025) vs DPO's Δlog π_w, training pairs", ""]
    if "skipped" in results["ches"]:
        lines.append(f"Not computed: {results['ches']['skipped']}.")
    else:
        lines.append("Spearman ρ over pairs, 95 % bootstrap interval (expected negative: high CHES → chosen falls).")
        lines.append("")
        for seed, row in results["ches"].items():
            lines.append(f"- seed {seed}: CHES ρ = {_rho(row['ches'])}; ln-CHES ρ = {_rho(row['ln_ches'])}")
    lines += ["", "## Stage times (s)", "", json.dumps(results["timings"], indent=1), ""]
    (output_dir / "report.md").write_text("\n".join(lines))


def plot(output_dir: Path, results: dict, values: dict) -> Path:
    """Top: Δlog π_w against Δlog π_l per training pair, one panel per arm; bottom: bars with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results["seeds"]
    colors = [f"C{i}" for i in range(len(seeds))]
    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    for axis, arm in zip(axes[0], ARMS):
        for seed, color in zip(seeds, colors):
            pairs = values.get(f"{arm}-s{seed}")
            if pairs is not None:
                axis.scatter(
                    pairs["delta_chosen"], pairs["delta_rejected"], s=10, alpha=0.6, color=color, label=f"s{seed}"
                )
        axis.axhline(0, color="gray", lw=0.8)
        axis.axvline(0, color="gray", lw=0.8)
        axis.axline((0, 0), slope=1, color="gray", lw=0.8, ls=":")  # below it: the margin grew
        axis.set(title=f"{arm}: training pairs", xlabel="Δlog π_w (nats)", ylabel="Δlog π_l (nats)")
        axis.legend(fontsize=8)
    for axis, quantity in zip(axes[1], ("chosen_fell", "delta_chosen", "margin")):
        for offset, (seed, color) in enumerate(zip(seeds, colors)):
            for index, arm in enumerate(ARMS):
                row = results["summaries"]["train"].get(f"{arm}-s{seed}")
                if row is None:
                    continue
                row = row[quantity]
                x = index + (offset - (len(seeds) - 1) / 2) * 0.8 / len(seeds)
                error = [[row["mean"] - row["low"]], [row["high"] - row["mean"]]]
                axis.bar(x, row["mean"], width=0.8 / len(seeds), color=color, yerr=error, capsize=3,
                         label=f"s{seed}" if index == 0 else None)  # fmt: skip
        axis.set_xticks(range(len(ARMS)), ARMS)
        axis.axhline(0, color="gray", lw=0.8)
        axis.set(title=f"{LABELS[quantity]} (training pairs, 95 % CI)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = output_dir / "repro-margin.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(output_dir: Path, *, config, start, after, entanglement, ches, timings) -> dict:
    results = compute_results(
        config=config, start=start, after=after, entanglement=entanglement, ches=ches, timings=timings
    )
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(output_dir, results)
    plot(output_dir, results, {name: per_pair(start["train"], m["train"]) for name, m in after.items()})
    return results
