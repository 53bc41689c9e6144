"""`align repro dco`'s outputs: paired comparisons, the paper's claims decided per seed, report.md, results.json and
the figure (exact pass@N against epochs).

Every difference is taken per held-out problem on the exact-coverage lower bound 1 − (1 − p)^N
(`align.evaluation.exact_coverage.compare_exact_coverage`, run B minus run A): its mean and paired-bootstrap 95 %
interval over problems. Two families, per seed and epoch e:

- `vs_first_epoch`: a method at epoch e minus the same method (same seed) at the first evaluated epoch;
- `vs_cross_entropy`: DCO N' at epoch e minus cross-entropy (same seed) at epoch e.

The claims of Chen et al. 2025, decided per seed from the intervals alone, with E the last evaluated epoch. A
difference is judged only where it is measurable (`measurable`): not where both runs' pass@N lie above HEADROOM or
both below FLOOR, since there an interval of [+1e-20, +3e-20] (p ~ 1e-20 under a model that never answers) or of
[+1e-6, +2e-6] (pass@10⁴ ~ 1) would be "significant" and decide nothing. "Large N" is N of LARGE_NS.

1. "cross-entropy's pass@1 rises with more epochs": CE at E minus CE at the first epoch, pass@1: *held* when the
   interval lies above 0, *refuted* when below 0;
2. "cross-entropy's pass@N at large N falls with more epochs": the same difference at every measurable large N:
   *held* when every interval lies below 0, *refuted* when one lies above 0;
3. "DCO N' limits the fall" (per N'): DCO N' minus CE at E at every measurable large N: *held* when every interval
   lies above 0, *refuted* when one lies below 0.

Anything else is *not shown*: a difference whose interval contains 0 is not evidence either way, and a claim with
no measurable difference is not shown either.
"""

from __future__ import annotations

import json
from pathlib import Path


TABLE_NS = (1, 16, 256, 4096, 10_000)
LARGE_NS = (256, 4096, 10_000)
HEADROOM = 0.99
FLOOR = 0.01
CLAIM_PASS_1 = "cross-entropy's pass@1 rises with more epochs"
CLAIM_LARGE_N = "cross-entropy's pass@N at large N falls with more epochs"
CLAIM_DCO = "{method} limits the fall: its pass@N at large N stays above cross-entropy's"
CROSS_ENTROPY = "cross-entropy"
CE_CLAIMS = (CLAIM_PASS_1, CLAIM_LARGE_N)


def interval_verdict(cells: list[dict], sign: int) -> str:
    """The verdict on `cells` (differences with intervals): "held" when every interval lies strictly on the side of 0
    the claim predicts (`sign` +1: above, −1: below), "refuted" when one lies strictly on the other side, "not shown"
    otherwise (and when there is nothing to judge)."""
    if not cells:
        return "not shown"
    above = [cell["low"] > 0 for cell in cells]
    below = [cell["high"] < 0 for cell in cells]
    toward, against = (above, below) if sign > 0 else (below, above)
    if any(against):
        return "refuted"
    return "held" if all(toward) else "not shown"


def measurable(comparison: dict, ns=LARGE_NS) -> dict[int, dict]:
    """{N: difference} at the N of `ns` where the two runs are not both above HEADROOM nor both below FLOOR."""
    cells = {n: comparison[f"pass@{n}"] for n in ns}
    return {
        n: cell
        for n, cell in cells.items()
        if min(cell["mean_a"], cell["mean_b"]) < HEADROOM and max(cell["mean_a"], cell["mean_b"]) > FLOOR
    }


def compare_checkpoints(evaluations: dict, methods: list[str], seeds: list[int], epochs: list[int]) -> dict:
    """{(method, seed, epoch): {"vs_first_epoch": ..., "vs_cross_entropy": ...}} (None where not defined)."""
    from align.evaluation.exact_coverage import compare_exact_coverage

    comparisons = {}
    first = epochs[0]
    for seed in seeds:
        for method in methods:
            for epoch in epochs:
                block = evaluations[(method, seed, epoch)]["exact"]
                comparisons[(method, seed, epoch)] = {
                    "vs_first_epoch": None
                    if epoch == first
                    else compare_exact_coverage(evaluations[(method, seed, first)]["exact"], block, TABLE_NS),
                    "vs_cross_entropy": None
                    if method == CROSS_ENTROPY
                    else compare_exact_coverage(evaluations[(CROSS_ENTROPY, seed, epoch)]["exact"], block, TABLE_NS),
                }
    return comparisons


def _diff(cell: dict) -> str:
    """A difference and its interval in points: "+1.3 [-0.4, +2.9]"."""
    return f"{100 * cell['diff']:+.1f} [{100 * cell['low']:+.1f}, {100 * cell['high']:+.1f}]"


def _judge(claim: str, seed: int, comparison: dict, ns, sign: int, span: str) -> dict:
    """One claim for one seed: the verdict over the measurable N of `ns`, and the differences it rests on."""
    cells = measurable(comparison, ns)
    if cells:
        why = f"{span}: " + ", ".join(f"N={n} {_diff(cell)}" for n, cell in cells.items())
    else:
        why = f"{span}: both runs above {HEADROOM:.0%} or both below {FLOOR:.0%} at every N judged ({list(ns)})"
    return {"claim": claim, "seed": seed, "verdict": interval_verdict(list(cells.values()), sign), "why": why}


def check_claims(comparisons: dict, methods: list[str], seeds: list[int], epochs: list[int]) -> list[dict]:
    """The claims of the module docstring: one {"claim", "seed", "verdict", "why"} per claim and seed."""
    first, last = epochs[0], epochs[-1]
    claims = []
    for seed in seeds:
        ce = comparisons[(CROSS_ENTROPY, seed, last)]["vs_first_epoch"]
        if ce is None:
            why = f"only epoch {first} was evaluated: nothing to compare"
            claims += [{"claim": c, "seed": seed, "verdict": "not shown", "why": why} for c in CE_CLAIMS]
        else:
            span = f"CE at epoch {last} minus epoch {first}"
            claims.append(_judge(CLAIM_PASS_1, seed, ce, (1,), +1, span))
            claims.append(_judge(CLAIM_LARGE_N, seed, ce, LARGE_NS, -1, span))
        for method in methods:
            if method != CROSS_ENTROPY:
                versus = comparisons[(method, seed, last)]["vs_cross_entropy"]
                span = f"{method} minus CE at epoch {last}"
                claims.append(_judge(CLAIM_DCO.format(method=method), seed, versus, LARGE_NS, +1, span))
    return claims


def subset_exact(block: dict, ids: list[str], n: int) -> dict:
    """Exact pass@1 and pass@n on the sampled subset's problems, next to the sampled values (the cross-check)."""
    from align.evaluation.exact_coverage import pass_at_n_lower_bound

    values = pass_at_n_lower_bound([block["log_p"][i] for i in ids], (1, n)).mean(axis=0)
    return {"pass@1": float(values[0]), f"pass@{n}": float(values[1])}


def result_rows(evaluations: dict, comparisons: dict, subset_ids: list[str], n: int) -> list[dict]:
    rows = []
    for (method, seed, epoch), evaluation in evaluations.items():
        block, sampled = evaluation["exact"], evaluation["sampled"]
        diffs = comparisons.get((method, seed, epoch), {})
        rows.append(
            {
                "method": method,
                "seed": seed,
                "epoch": epoch,
                "exact": {f"pass@{k}": block["pass_at"][str(k)] for k in TABLE_NS},
                "exact_ci95": {f"pass@{k}": block["ci95"][str(k)] for k in TABLE_NS},
                "mean_log_p": block["mean_log_p"],
                "sampled": {key: sampled[key] for key in ("pass@1", f"pass@{n}", f"maj@{n}")},
                "exact_on_sampled_subset": subset_exact(block, subset_ids, n),
                **evaluation["confidence"],
                "vs_first_epoch": diffs.get("vs_first_epoch"),
                "vs_cross_entropy": diffs.get("vs_cross_entropy"),
                "curve": block["curve"],
            }
        )
    return rows


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _seed(row: dict) -> str:
    return "-" if row["seed"] is None else str(row["seed"])


def report_text(rows: list[dict], claims: list[dict], *, size, model: str, seeds, timings: dict) -> str:
    n = size.n
    header = [f"exact pass@{k}" for k in TABLE_NS]
    header += [f"sampled pass@1 / @{n}", f"exact pass@1 / @{n} (same subset)", f"maj@{n}", "greedy confidence"]
    header.append("… when wrong")
    lines = [
        "# align repro dco: cross-entropy vs DCO over epochs, by exact coverage",
        "",
        f"{model} + LoRA, synthetic levels {size.levels}, direct answers; {size.num_train} training problems, batch "
        f"{size.batch_size}, lr {size.learning_rate}, training seeds {seeds}. Exact coverage on {size.num_test} "
        f"held-out problems at temperature {size.temperature}; sampled cross-check: n = {n} on the first "
        f"{size.num_sampled}; greedy confidence on the first {size.num_confidence}. Percent.",
        "",
        "Exact coverage is a lower bound on pass@N (1 - (1 - p)^N with p the probability of the canonical answer "
        "then end of sequence); other strings can also be graded correct, so sampled pass@k may be higher.",
        "",
        "| method | seed | epochs | " + " | ".join(header) + " |",
        "| --- | --- | --- |" + " --- |" * len(header),
    ]
    for row in rows:
        cells = [_percent(row["exact"][f"pass@{k}"]) for k in TABLE_NS]
        cells.append(f"{_percent(row['sampled']['pass@1'])} / {_percent(row['sampled'][f'pass@{n}'])}")
        subset = row["exact_on_sampled_subset"]
        cells.append(f"{_percent(subset['pass@1'])} / {_percent(subset[f'pass@{n}'])}")
        cells += [_percent(row["sampled"][f"maj@{n}"]), _percent(row["greedy_confidence"])]
        cells.append(_percent(row["greedy_confidence_when_wrong"]))
        lines.append(f"| {row['method']} | {_seed(row)} | {row['epoch']} | " + " | ".join(cells) + " |")
    titles = {
        "vs_first_epoch": f"Each method at epoch e minus itself at epoch {size.epochs[0]} (same seed)",
        "vs_cross_entropy": "DCO minus cross-entropy at the same epoch (same seed)",
    }
    for key, title in titles.items():
        compared = [row for row in rows if row[key]]
        if not compared:
            continue
        lines += ["", f"## {title}", "", "Points, with the paired-bootstrap 95 % interval over problems.", ""]
        lines += ["| method | seed | epochs | " + " | ".join(f"Δ pass@{k}" for k in TABLE_NS) + " |"]
        lines += ["| --- | --- | --- |" + " --- |" * len(TABLE_NS)]
        for row in compared:
            cells = [_diff(row[key][f"pass@{k}"]) for k in TABLE_NS]
            lines.append(f"| {row['method']} | {_seed(row)} | {row['epoch']} | " + " | ".join(cells) + " |")
    lines += ["", '## Claims (per seed, from the 95 % intervals; an interval containing 0 is "not shown")', ""]
    lines += [f"- **{c['claim']}**, seed {c['seed']}: {c['verdict']} ({c['why']})." for c in claims]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


PLOT_NS = (1, 16, 256, 4096)


def plot_epochs(rows: list[dict], epochs: list[int], path: Path) -> Path:
    """Exact pass@N (N of PLOT_NS) and the greedy confidence against epochs: one line per (method, seed), solid for
    the first seed, dashed for the next; the base model dotted gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"exact pass@{n}", lambda row, n=n: row["exact"][f"pass@{n}"]) for n in PLOT_NS]
    panels.append(("greedy confidence", lambda row: row["greedy_confidence"]))
    base = next(row for row in rows if row["epoch"] == 0)
    trained = [row for row in rows if row["epoch"] > 0]
    methods = list(dict.fromkeys(row["method"] for row in trained))
    seeds = list(dict.fromkeys(row["seed"] for row in trained))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(seeds, ["-", "--", "-.", ":"] * len(seeds)))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6))
    for axis, (title, value) in zip(axes, panels):
        for method in methods:
            for seed in seeds:
                points = [
                    (row["epoch"], value(row)) for row in trained if (row["method"], row["seed"]) == (method, seed)
                ]
                axis.plot(
                    *zip(*points), marker="o", color=colors[method], linestyle=styles[seed], label=f"{method} s{seed}"
                )
        axis.axhline(value(base), color="gray", linestyle=":", label="base model")
        axis.set_xscale("log", base=2)
        axis.set_xticks(epochs, [str(e) for e in epochs])
        axis.set_xlabel("epochs")
        axis.set_title(title, fontsize=9)
        axis.set_ylim(0, 1)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(output_dir: Path, evaluations: dict, *, size, model: str, seeds: list[int], timings: dict) -> dict:
    """report.md, results.json and repro-dco.png in `output_dir`; returns what results.json holds.

    `evaluations`: {(method, seed, epoch): {"exact", "sampled", "confidence"}}, the base model as ("base", None, 0).
    """
    from dataclasses import asdict

    methods = list(dict.fromkeys(method for method, _, epoch in evaluations if epoch > 0))
    subset_ids = [json.loads(line)["id"] for line in (output_dir / "test_sampled.jsonl").open()]
    comparisons = compare_checkpoints(evaluations, methods, seeds, size.epochs)
    rows = result_rows(evaluations, comparisons, subset_ids, size.n)
    claims = check_claims(comparisons, methods, seeds, size.epochs)
    results = {
        "model": model,
        "size": asdict(size),
        "seeds": seeds,
        "rows": rows,
        "claims": claims,
        "timings": timings,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    report = report_text(rows, claims, size=size, model=model, seeds=seeds, timings=timings)
    (output_dir / "report.md").write_text(report)
    plot_epochs(rows, size.epochs, output_dir / "repro-dco.png")
    return results
