"""report.md, results.json and repro-prm.png of `align repro prm` (`align.experiments.prm`).

Per PRM (objective x seed), on the same held-out samples: bon@n and weighted maj@n with the process score (`min`
over step rewards) and the outcome score (`sum`: the response's whole log-ratio), each difference paired by problem
with a bootstrap 95 % interval (`align.evaluation.paired.paired_bootstrap`); a difference whose interval holds 0 is
"not shown". Then the ProcessBench table of each PRM with the baselines that need no PRM.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from align.evaluation.estimators import DEFAULT_NUM_SUBSETS
from align.evaluation.paired import paired_bootstrap
from align.evaluation.report import problem_metrics


AGGREGATES = {"process": "min", "outcome": "sum"}
COMPARISONS = (  # (label, metric b, metric a): b - a
    ("bon (process) - maj", "bon_process", "maj"),
    ("weighted maj (process) - maj", "weighted_maj_process", "maj"),
    ("bon (process) - bon (outcome)", "bon_process", "bon_outcome"),
    ("bon (outcome) - maj", "bon_outcome", "maj"),
)


def start_warning(pass1: float, size) -> str | None:
    """A line when the start's pass@1 is outside the band where its samples hold right and wrong solutions."""
    if size.start_pass1_low <= pass1 <= size.start_pass1_high:
        return None
    return (
        f"warning: the warmed-up policy's held-out pass@1 is {pass1:.3f}, outside [{size.start_pass1_low}, "
        f"{size.start_pass1_high}]: its samples are nearly all right or all wrong, so ranking them says little"
    )


def aggregate(step_rewards: list[float], how: str) -> float:
    """One sample's score from its step rewards: `min` (the paper's process score) or `sum` (the outcome reward)."""
    if how == "min":
        return min(step_rewards) if step_rewards else 0.0
    if how == "sum":
        return float(sum(step_rewards))
    raise ValueError(f"aggregate must be 'min' or 'sum', got {how!r}")


def per_problem_metrics(records: list[dict], n: int) -> dict[str, list[float]]:
    """`{metric: [value per problem]}` in record order: pass@1, pass@n, maj@n, and bon@n / weighted maj@n under the
    process and the outcome score."""
    out: dict[str, list[float]] = {}
    for record in sorted(records, key=lambda r: r["id"]):
        plain = problem_metrics(record, n, [1, n], 0, DEFAULT_NUM_SUBSETS, scored=False)
        values = {"pass@1": plain["pass@1"], "pass@n": plain[f"pass@{n}"], "maj": plain[f"maj@{n}"]}
        for name, how in AGGREGATES.items():
            rescored = {
                **record,
                "samples": [{**s, "score": aggregate(s["step_rewards"], how)} for s in record["samples"]],
            }
            metrics = problem_metrics(rescored, n, [n], 0, DEFAULT_NUM_SUBSETS, scored=True)
            values[f"bon_{name}"] = metrics[f"bon@{n}"]
            values[f"weighted_maj_{name}"] = metrics[f"weighted_maj@{n}"]
        for key, value in values.items():
            out.setdefault(key, []).append(float(value))
    return out


def _auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive's score > a negative's), ties counted half: the Mann-Whitney AUC, over every pair at once."""
    p, q = np.asarray(positive, dtype=float)[:, None], np.asarray(negative, dtype=float)[None, :]
    return float((p > q).mean() + 0.5 * (p == q).mean())


def discrimination(records: list[dict], how: str) -> dict:
    """How well the score separates right from wrong samples: `pooled` AUC over every sample of every problem (which
    a score that only knows how hard a problem is already wins), and `within_problem` AUC, the mean over problems
    with both kinds of sample of their own AUC (what best-of-N needs); `problems` counts the latter."""
    pooled_right, pooled_wrong, per_problem = [], [], []
    for record in records:
        scores = [(aggregate(s["step_rewards"], how), s["verdict"] == "correct") for s in record["samples"]]
        right = [score for score, correct in scores if correct]
        wrong = [score for score, correct in scores if not correct]
        pooled_right += right
        pooled_wrong += wrong
        if right and wrong:
            per_problem.append(_auc(right, wrong))
    return {
        "pooled": _auc(pooled_right, pooled_wrong) if pooled_right and pooled_wrong else None,
        "within_problem": sum(per_problem) / len(per_problem) if per_problem else None,
        "problems": len(per_problem),
    }


def top_pick(records: list[dict], how: str) -> dict:
    """On the problems with both right and wrong samples: how often the top-scored sample is right, against the two
    chances a score-blind pick has, a random sample (pass@1 there) and a random distinct text. Identical texts get
    identical scores, so a ranker chooses among distinct texts, while majority voting counts the repeats: the right
    answer of a problem is often one text sampled many times, the wrong ones many texts."""
    picks, by_sample, by_text = [], [], []
    for record in records:
        samples = record["samples"]
        right = [s for s in samples if s["verdict"] == "correct"]
        if not right or len(right) == len(samples):
            continue
        best = max(samples, key=lambda s: aggregate(s["step_rewards"], how))
        picks.append(best["verdict"] == "correct")
        by_sample.append(len(right) / len(samples))
        texts = {s["completion"]: s["verdict"] == "correct" for s in samples}
        by_text.append(sum(texts.values()) / len(texts))
    count = len(picks)
    return {
        "mixed_problems": count,
        "top_is_right": sum(picks) / count if count else None,
        "chance_random_sample": sum(by_sample) / count if count else None,
        "chance_random_distinct_text": sum(by_text) / count if count else None,
    }


def ranking_results(scored: dict[str, list[dict]], n: int) -> dict:
    """Means and paired-bootstrap differences of every PRM's ranking metrics, and its discrimination AUCs."""
    results = {}
    for name, records in scored.items():
        values = per_problem_metrics(records, n)
        results[name] = {
            "means": {key: sum(v) / len(v) for key, v in values.items()},
            "auc": {label: discrimination(records, how) for label, how in AGGREGATES.items()},
            "top_pick": {label: top_pick(records, how) for label, how in AGGREGATES.items()},
            "differences": {label: paired_bootstrap(values[a], values[b], seed=0) for label, b, a in COMPARISONS},
        }
    return results


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _interval(entry: dict) -> str:
    verdict = "shown" if entry["shown"] else "not shown"
    return f"{100 * entry['diff']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}] ({verdict})"


def ranking_table(ranking: dict, n: int) -> str:
    header = (
        f"| PRM | pass@1 | maj@{n} | pass@{n} | bon@{n} process | bon@{n} outcome | w-maj@{n} process | "
        f"w-maj@{n} outcome |"
    )
    lines = [header, "| --- |" + " --- |" * 7]
    for name, entry in ranking.items():
        m = entry["means"]
        cells = [m[key] for key in ("pass@1", "maj", "pass@n", "bon_process", "bon_outcome")]
        cells += [m["weighted_maj_process"], m["weighted_maj_outcome"]]
        lines.append(f"| {name} | " + " | ".join(map(_pct, cells)) + " |")
    lines += [
        "",
        "| PRM | AUC process, pooled | AUC process, within problem | AUC outcome, pooled | "
        "AUC outcome, within problem |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in ranking.items():
        auc = entry["auc"]
        cells = [auc[kind][scope] for kind in ("process", "outcome") for scope in ("pooled", "within_problem")]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += [
        "",
        "On problems with right and wrong samples: the top-scored sample is right (process / outcome), against "
        "a random sample and a random distinct text:",
        "",
        "| PRM | problems | top right, process | top right, outcome | random sample | random distinct text |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in ranking.items():
        pick = entry["top_pick"]
        if pick["process"]["mixed_problems"]:
            cells = [pick["process"]["top_is_right"], pick["outcome"]["top_is_right"]]
            cells += [pick["process"]["chance_random_sample"], pick["process"]["chance_random_distinct_text"]]
            lines.append(f"| {name} | {pick['process']['mixed_problems']} | " + " | ".join(map(_pct, cells)) + " |")
    lines += ["", "| PRM | " + " | ".join(label for label, _, _ in COMPARISONS) + " |"]
    lines.append("| --- |" + " --- |" * len(COMPARISONS))
    for name, entry in ranking.items():
        cells = [_interval(entry["differences"][label]) for label, _, _ in COMPARISONS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_rows(steps: dict[str, dict]) -> list[tuple[str, dict]]:
    """(scorer name, its ProcessBench result) for every PRM, then the baselines (from the first PRM's run: they do
    not depend on the PRM)."""
    rows = [(name, summary["scorers"]["prm"]) for name, summary in steps.items()]
    first = next(iter(steps.values()), None)
    for baseline in ("likelihood", "random"):
        if first is not None and baseline in first["scorers"]:
            rows.append((f"{baseline} (no PRM)", first["scorers"][baseline]))
    return rows


def step_table(steps: dict[str, dict]) -> str:
    lines = [
        "| scorer | F1 best (err / corr acc) | F1 calibrated (err / corr acc) | threshold calibrated |",
        "| --- | --- | --- | --- |",
    ]

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "-"
        return f"{_pct(entry['f1'])} ({_pct(entry['error_accuracy'])} / {_pct(entry['correct_accuracy'])})"

    for name, result in step_rows(steps):
        calibrated = result.get("calibrated")
        threshold = f"{calibrated['threshold']:.4g}" if calibrated else "-"
        lines.append(f"| {name} | {cell(result.get('best'))} | {cell(calibrated)} | {threshold} |")
    return "\n".join(lines)


def plot(ranking: dict, n: int, path: Path) -> Path:
    """Left: each PRM's bon@n / weighted maj@n against the policy's maj@n, pass@1, pass@n; right: the differences
    with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranking)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = [("bon_process", "bon (process)"), ("bon_outcome", "bon (outcome)"), ("weighted_maj_process", "w-maj")]
    width = 0.8 / len(keys)
    for offset, (key, label) in enumerate(keys):
        xs = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(names))]
        left.bar(xs, [100 * ranking[name]["means"][key] for name in names], width, label=label)
    if names:
        means = ranking[names[0]]["means"]
        for key, label, style in (("maj", f"maj@{n}", "--"), ("pass@1", "pass@1", ":"), ("pass@n", f"pass@{n}", "-.")):
            left.axhline(100 * means[key], color="black", linestyle=style, linewidth=1, label=label)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("% of held-out problems")
    left.set_title(f"ranking the policy's {n} samples")
    left.legend(fontsize=8)
    width = 0.8 / len(COMPARISONS)
    for offset, (label, _, _) in enumerate(COMPARISONS):
        xs = [i + (offset - (len(COMPARISONS) - 1) / 2) * width for i in range(len(names))]
        entries = [ranking[name]["differences"][label] for name in names]
        heights = [100 * e["diff"] for e in entries]
        errors = [[100 * (e["diff"] - e["low"]) for e in entries], [100 * (e["high"] - e["diff"]) for e in entries]]
        right.bar(xs, heights, width, yerr=errors, capsize=3, label=label)
    right.axhline(0, color="black", linewidth=1)
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("difference, points (95 % paired bootstrap)")
    right.set_title("differences")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(
    output_dir: Path,
    *,
    policy: dict,
    scored: dict[str, list[dict]],
    steps: dict[str, dict],
    data: dict,
    size,
    model: str,
    seeds: list[int],
    timings: dict,
    warning: str | None,
) -> dict:
    ranking = ranking_results(scored, size.n)
    results = {
        "experiment": "prm",
        "model": model,
        "seeds": seeds,
        "size": asdict(size),
        "policy": {"metrics": policy["metrics"], "ci95": policy.get("ci95")},
        "training_data": {str(seed): counts for seed, counts in data.items()},
        "ranking": ranking,
        "steps": {name: summary["scorers"] for name, summary in steps.items()},
        "timings_s": timings,
        "warning": warning,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    n = size.n
    lines = [
        f"# align repro prm: {model}",
        "",
        f"Policy: the warmed-up start, {size.num_test} held-out problems x {n} samples (temperature "
        f"{size.temperature}). Seeds {seeds} (each: its own training samples, {size.k} per problem on "
        f"{size.num_train} train problems, and PRM seed). 'process' = min over step rewards (the paper's score), "
        "'outcome' = the sum (the same PRM's whole-response reward). Intervals: paired bootstrap over problems, 95 %.",
        "",
    ]
    if warning:
        lines += [warning, ""]
    lines += ["## Training data", ""]
    for seed, counts in data.items():
        outcome, pairs = counts["outcome"], counts["pairs"]
        lines.append(
            f"- seed {seed}: pass@1 of the start on its train problems {_pct(counts['pass@1'])} %, outcome rows "
            f"{outcome.get('positive', 0)} correct / {outcome.get('negative', 0)} wrong, {pairs.get('rows', 0)} pairs"
        )
    lines += ["", "## Ranking the policy's samples", "", ranking_table(ranking, n), ""]
    lines += ["## Step-error localization (ProcessBench F1, synthetic)", "", step_table(steps), ""]
    lines += ["## Stage times (s)", "", ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    (output_dir / "report.md").write_text("\n".join(lines))
    plot(ranking, n, output_dir / "repro-prm.png")
    return results
