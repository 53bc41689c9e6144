"""The proving ground's outputs: paired comparisons with GRPO, the papers' claims checked, report.md, results.json,
and the figure (exact pass@N curves, N = 1..10⁴, one line per objective).

Every difference is arm minus GRPO of the same seed, per held-out problem, on the exact-coverage lower bound
1 - (1 - p)^N (`align.evaluation.exact_coverage.compare_exact_coverage`): its mean and paired-bootstrap 95 %
interval over problems. A claim is decided per seed from those intervals and then over seeds:

1. "GRPO raises pass@1 most" (of the online arms): *held* when, in every seed, GRPO is significantly above the
   start and every other online arm is below GRPO at pass@1 with its interval below 0; *held on point estimates*
   when they are all below but not all significantly; *refuted* when some arm is significantly above GRPO in some
   seed; *not shown* otherwise.
2. "the pass@k objectives raise pass@k at large k more than GRPO", per objective at the N of 16, 256, 4096 where
   the start's pass@N is below 0.99 (`large_ns`): *held* when every interval is above 0 in every seed, *refuted*
   when one is below 0, *not shown* otherwise.
3. "annealed PKPO keeps pass@1 close to GRPO's": *held* when every seed's pass@1 interval lies inside ±close_margin
   (an equivalence test at this size), *refuted* when one lies entirely outside it, *not shown* otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


TABLE_NS = (1, 16, 256, 4096)
LARGE_NS = (16, 256, 4096)  # claim 2's "large k" (> the trained k = 8), where the start leaves room (HEADROOM)
HEADROOM = 0.99
START_PASS_AT_1 = (0.05, 0.4)  # the start's range where the objectives can separate (issue 19)
START_PASS_AT_16_BELOW = 0.8


def start_line(pass_1: float, pass_16: float) -> str:
    """The start's exact pass@1 and pass@16 and whether they are in range (printed, and in report.md)."""
    low, high = START_PASS_AT_1
    in_range = low <= pass_1 <= high and pass_16 < START_PASS_AT_16_BELOW
    verdict = "in range" if in_range else "WARNING: outside the range"
    return (
        f"start (exact coverage): pass@1 {pass_1:.3f}, pass@16 {pass_16:.3f}: {verdict} (pass@1 in {low}-{high}, "
        f"pass@16 < {START_PASS_AT_16_BELOW})"
    )


def compare_with_baseline(evaluations: dict, seeds: list[int], arms: list[str], baseline: str = "grpo") -> dict:
    """`{arm-s<seed>: {"pass@N": paired_bootstrap}}` for every arm but the baseline, plus the baseline minus the
    start (`grpo_vs_start-s<seed>`) and offline DCO minus cross-entropy (`dco_offline_vs_sft-s<seed>`)."""
    from align.evaluation.exact_coverage import compare_exact_coverage

    comparisons = {}
    for seed in seeds:
        base = evaluations[f"{baseline}-s{seed}"][0]
        comparisons[f"{baseline}_vs_start-s{seed}"] = compare_exact_coverage(evaluations["start"][0], base, TABLE_NS)
        for arm in arms:
            if arm != baseline:
                comparisons[f"{arm}-s{seed}"] = compare_exact_coverage(
                    base, evaluations[f"{arm}-s{seed}"][0], TABLE_NS
                )
        if "sft" in arms and "dco_offline" in arms:
            sft, dco = evaluations[f"sft-s{seed}"][0], evaluations[f"dco_offline-s{seed}"][0]
            comparisons[f"dco_offline_vs_sft-s{seed}"] = compare_exact_coverage(sft, dco, TABLE_NS)
    return comparisons


def subset_exact(block: dict, ids: list[str]) -> dict:
    """Exact pass@1 and pass@16 on the sampled subset's problems, for the side-by-side cross-check."""
    from align.evaluation.exact_coverage import pass_at_n_lower_bound

    values = pass_at_n_lower_bound([block["log_p"][i] for i in ids], (1, 16)).mean(axis=0)
    return {"pass@1": float(values[0]), "pass@16": float(values[1])}


def _claim_pass_at_1(comparisons: dict, seeds: list[int], others: list[str]) -> dict:
    if not others:
        return {"claim": CLAIMS[0], "verdict": "not tested", "why": "no online arm besides grpo ran"}
    cells = [comparisons[f"{arm}-s{seed}"]["pass@1"] for seed in seeds for arm in others]
    above = [
        f"{arm} (seed {seed})"
        for seed in seeds
        for arm in others
        if comparisons[f"{arm}-s{seed}"]["pass@1"]["low"] > 0
    ]
    if above:
        verdict = "refuted"
    elif all(cell["high"] < 0 for cell in cells):
        verdict = "held"
    elif all(cell["diff"] < 0 for cell in cells):
        verdict = "held on point estimates"
    else:
        verdict = "not shown"
    gains = [comparisons[f"grpo_vs_start-s{seed}"]["pass@1"] for seed in seeds]
    if verdict.startswith("held") and not all(gain["low"] > 0 for gain in gains):
        verdict = "not shown"  # GRPO did not significantly raise pass@1 above the start in every seed
    below = sum(cell["high"] < 0 for cell in cells)
    why = f"GRPO minus the start at pass@1 per seed: {', '.join(_diff(gain) for gain in gains)}; "
    why += f"{below} of {len(cells)} (arm, seed) pass@1 differences are significantly below GRPO"
    if above:
        why += f"; significantly above GRPO: {', '.join(above)}"
    return {"claim": CLAIMS[0], "verdict": verdict, "why": why}


def large_ns(start_pass: dict) -> list[int]:
    """The N of LARGE_NS at which the start's exact pass@N is below HEADROOM: where it is ~1 (pass@4096 of a
    temperature-1 policy whose every gold answer has p > 1e-3) no objective can raise it, and a significant
    difference of 1e-6 would decide nothing."""
    return [n for n in LARGE_NS if start_pass[f"pass@{n}"] < HEADROOM]


def _claim_large_k(comparisons: dict, seeds: list[int], others: list[str], ns: list[int]) -> list[dict]:
    if not ns:
        return [{"claim": CLAIMS[1], "verdict": "not tested", "why": f"the start's pass@N >= {HEADROOM} at every N"}]
    claims = []
    for arm in others:
        cells = [comparisons[f"{arm}-s{seed}"][f"pass@{n}"] for seed in seeds for n in ns]
        if all(cell["low"] > 0 for cell in cells):
            verdict = "held"
        elif any(cell["high"] < 0 for cell in cells):
            verdict = "refuted"
        else:
            verdict = "not shown"
        labels = [f"seed {seed} N={n}" for seed in seeds for n in ns]
        why = "differences in points: " + ", ".join(f"{label} {_diff(cell)}" for label, cell in zip(labels, cells))
        claims.append({"claim": f"{CLAIMS[1]}: {arm}", "verdict": verdict, "why": why})
    return claims


def _claim_anneal(comparisons: dict, seeds: list[int], arms: list[str], margin: float) -> dict:
    if "pkpo_anneal" not in arms:
        return {"claim": CLAIMS[2], "verdict": "not tested", "why": "pkpo_anneal did not run"}
    cells = [comparisons[f"pkpo_anneal-s{seed}"]["pass@1"] for seed in seeds]
    if all(-margin < cell["low"] and cell["high"] < margin for cell in cells):
        verdict = "held"
    elif any(cell["high"] < -margin or cell["low"] > margin for cell in cells):
        verdict = "refuted"
    else:
        verdict = "not shown"
    spans = ", ".join(f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]" for c in cells)
    why = f"pass@1 difference intervals {spans} points against ±{100 * margin:.0f}"
    if "pkpo" in arms:
        plain = [abs(comparisons[f"pkpo-s{seed}"]["pass@1"]["diff"]) for seed in seeds]
        annealed = np.mean([abs(cell["diff"]) for cell in cells])
        why += f"; mean |Δ| annealed {100 * annealed:.1f} vs plain pkpo {100 * np.mean(plain):.1f} points"
    return {"claim": CLAIMS[2], "verdict": verdict, "why": why}


CLAIMS = (
    "GRPO raises pass@1 most",
    "the pass@k objectives raise pass@k at large k more than GRPO",
    "annealed PKPO keeps pass@1 close to GRPO's",
)


def check_claims(
    comparisons: dict, seeds: list[int], arms: list[str], online, margin: float, start_pass: dict
) -> list[dict]:
    """The three claims of the module docstring; `online` names the online arms (claims 1 and 2 compare those),
    `start_pass` is the start's exact {"pass@N": value} (claim 2's N: `large_ns`)."""
    online = [arm for arm in arms if arm != "grpo" and arm in online]
    return [
        _claim_pass_at_1(comparisons, seeds, online),
        *_claim_large_k(comparisons, seeds, online, large_ns(start_pass)),
        _claim_anneal(comparisons, seeds, arms, margin),
    ]


def sampled_k(n: int) -> int:
    """The larger k of the sampled cross-check: 16, or n when fewer samples were drawn."""
    return min(16, n)


def training_log(run_dir: Path) -> dict:
    """Means over an online arm's steps of what TRL logged: `reward` (the training samples' accuracy) and
    `frac_reward_zero_std` (groups whose samples all scored alike: no gradient for any objective); {} otherwise."""
    path = run_dir / "trainer_state.json"
    if not path.exists():
        return {}
    history = json.loads(path.read_text()).get("log_history", [])
    means = {}
    for key in ("reward", "frac_reward_zero_std"):
        values = [entry[key] for entry in history if key in entry]
        if values:
            means[key] = float(np.mean(values))
    return means


def result_rows(evaluations: dict, comparisons: dict, subset_ids: list[str], k: int, train_dir: Path) -> list[dict]:
    rows = []
    for name, (block, sampled) in evaluations.items():
        arm, _, seed = name.rpartition("-s") if name != "start" else ("start", "", "")
        rows.append(
            {
                "arm": arm,
                "seed": int(seed) if seed else None,
                "exact": {f"pass@{n}": block["pass_at"][str(n)] for n in TABLE_NS},
                "exact_ci95": {f"pass@{n}": block["ci95"][str(n)] for n in TABLE_NS},
                "sampled": {"pass@1": sampled["pass@1"], f"pass@{k}": sampled[f"pass@{k}"]},
                "exact_on_sampled_subset": subset_exact(block, subset_ids),
                "vs_grpo": comparisons.get(name),
                "training": training_log(train_dir / name) if name != "start" else {},
                "curve": block["curve"],
            }
        )
    return rows


def _diff(diff: dict) -> str:
    """A difference and its interval in points: "+1.3 [-0.4, +2.9]"."""
    return f"{100 * diff['diff']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"


def _cell(value: float, diff: dict | None) -> str:
    return f"{100 * value:.1f}" if diff is None else f"{100 * value:.1f} ({_diff(diff)})"


def report_text(rows: list[dict], claims: list[dict], comparisons: dict, *, size, model: str, seeds, timings) -> str:
    k = sampled_k(size.n)
    header = [f"exact pass@{n}" for n in TABLE_NS] + [f"sampled pass@1 / @{k}", "exact pass@1 / @16 (same subset)"]
    header.append("training reward / groups without signal")
    lines = [
        "# align repro pass-k: pass@k objectives against GRPO from one start",
        "",
        f"{model} after a cross-entropy warm-up ({size.warmup_steps} steps), merged; each arm trains a fresh LoRA "
        f"for {size.steps} steps of {size.prompts_per_step} prompts (online: K = {size.num_generations} samples each, "
        f"temperature {size.temperature}; k = {size.pass_k}, N' = {size.pass_n}), lr {size.learning_rate}, "
        f"seeds {seeds}; training problems: the {size.num_train}-problem train-split pool's problems on which the "
        f"start's exact p lies in [{size.train_p_low}, {size.train_p_high}] (train.jsonl), the same for every arm. "
        f"Exact coverage on {size.num_test} held-out problems (synthetic levels {size.levels}, test "
        f"split); sampled cross-check: n = {size.n} on the first {size.num_sampled}. Percent; in parentheses the "
        "difference from GRPO of the same seed with its paired-bootstrap 95 % interval over problems. Training "
        "reward: the mean accuracy of an online arm's own samples; groups without signal: the share of its groups "
        "whose K samples all scored alike (no gradient for any objective).",
        "",
        "Exact coverage is a lower bound on pass@N (1 - (1 - p)^N with p the probability of the canonical answer "
        "then end of sequence); other strings can also be graded correct, so sampled pass@k may be higher.",
        "",
        start_line(rows[0]["exact"]["pass@1"], rows[0]["exact"]["pass@16"]) + ".",
        "",
        "| arm | seed | " + " | ".join(header) + " |",
        "| --- | --- |" + " --- |" * len(header),
    ]
    for row in rows:
        diffs = row["vs_grpo"] or {}
        cells = [_cell(row["exact"][f"pass@{n}"], diffs.get(f"pass@{n}")) for n in TABLE_NS]
        sampled = " / ".join(f"{100 * v:.1f}" for v in row["sampled"].values())
        subset = row["exact_on_sampled_subset"]
        cells += [sampled, f"{100 * subset['pass@1']:.1f} / {100 * subset['pass@16']:.1f}"]
        training = row["training"]
        cells.append(
            f"{100 * training['reward']:.1f} / {100 * training['frac_reward_zero_std']:.0f} %"
            if "frac_reward_zero_std" in training
            else "-"
        )
        lines.append(f"| {row['arm']} | {'-' if row['seed'] is None else row['seed']} | " + " | ".join(cells) + " |")
    offline = [key for key in comparisons if key.startswith("dco_offline_vs_sft")]
    if offline:
        lines += ["", "Offline DCO minus cross-entropy (same start, problems and steps):", ""]
        for key in offline:
            parts = [f"pass@{n} {_diff(comparisons[key][f'pass@{n}'])}" for n in TABLE_NS]
            lines.append(f"- seed {key.rpartition('-s')[2]}: " + "; ".join(parts))
    lines += ["", "## Claims", ""]
    lines += [f"- **{c['claim']}**: {c['verdict']} ({c['why']})." for c in claims]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Left: exact pass@N against N (log axis), one line per arm (the mean of its seeds' curves), the start dashed.
    Right: each arm minus GRPO at every N (the mean over seeds of the per-seed differences), where differences of a
    point or two are visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = {
        arm: np.mean([row["curve"]["pass"] for row in rows if row["arm"] == arm], axis=0)
        for arm in dict.fromkeys(row["arm"] for row in rows)
    }
    ns = rows[0]["curve"]["n"]
    figure, (curves, differences) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    for arm, values in mean.items():
        style = {"color": "gray", "linestyle": "--"} if arm == "start" else {}
        (line,) = curves.plot(ns, values, label=arm, **style)
        if "grpo" in mean and arm != "grpo":
            differences.plot(ns, 100 * (values - mean["grpo"]), label=arm, **{"color": line.get_color(), **style})
    curves.set_ylim(0, 1)
    curves.set_ylabel("pass@N lower bound (exact coverage)")
    curves.set_title("pass@N of each final policy (mean over seeds)", fontsize=9)
    curves.legend(fontsize=8)
    differences.axhline(0, color="black", linewidth=0.8)
    differences.set_ylabel("minus GRPO (points)")
    differences.set_title("difference from GRPO of the same seed (mean over seeds)", fontsize=9)
    for axis in (curves, differences):
        axis.set_xscale("log")
        axis.set_xlabel("N (samples per problem)")
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(output_dir: Path, evaluations: dict, *, size, model: str, seeds, arms, online, timings) -> dict:
    """report.md, results.json and pass-k.png in `output_dir`; returns what results.json holds."""
    from dataclasses import asdict

    subset_ids = [json.loads(line)["id"] for line in (output_dir / "test_sampled.jsonl").open()]
    comparisons = compare_with_baseline(evaluations, seeds, arms)
    rows = result_rows(evaluations, comparisons, subset_ids, sampled_k(size.n), output_dir / "train")
    claims = check_claims(comparisons, seeds, arms, online, size.close_margin, rows[0]["exact"])
    results = {"model": model, "size": asdict(size), "seeds": seeds, "rows": rows, "claims": claims}
    results["offline_dco_vs_sft"] = {k: v for k, v in comparisons.items() if k.startswith("dco_offline_vs_sft")}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    report = report_text(rows, claims, comparisons, size=size, model=model, seeds=seeds, timings=timings)
    (output_dir / "report.md").write_text(report)
    plot_curves(rows, output_dir / "pass-k.png")
    return results
