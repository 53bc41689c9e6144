"""`align demo`'s outputs: report.md, results.json and exact_coverage.png from the three models' evaluations.

Each model (base, cross-entropy, DCO) has an exact-coverage summary on every test problem and a sampled summary on
the first `num_sampled` of them (`align.demo.evaluate_model`). The report holds

- exact coverage, the lower bound pass@N >= mean over problems of 1 - (1 - p)^N with p = π(canonical answer + EOS
  | prompt) (`align.evaluation.exact_coverage`), at N = 1, 16, 256, 4096 with percentile-bootstrap 95 % intervals
  over problems;
- the cross-check on the subset: sampled pass@1 / pass@n (unbiased estimator 1 - C(n-c,k)/C(n,k), Chen et al. 2021)
  and maj@n beside the exact bound at the same k on the same problems — sampled should be at or above exact within
  sampling error, equal where only the canonical string is graded correct;
- DCO minus cross-entropy at each N, paired by problem, with its paired-bootstrap 95 % interval
  (`compare_exact_coverage`, `align.evaluation.paired`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


REPORT_NS = (1, 16, 256, 4096)
PLOT_FILE = "exact_coverage.png"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def check_exact_sane(name: str, block: dict) -> None:
    """The bound is a probability at every N and never decreases in N (each problem's 1 - (1 - p)^N does not)."""
    values = block["curve"]["pass"]
    if any(not 0.0 <= value <= 1.0 for value in values):
        raise AssertionError(f"{name}: an exact pass@N is not a probability: {values}")
    if any(later < earlier for earlier, later in zip(values, values[1:])):
        raise AssertionError(f"{name}: exact pass@N decreases with N: {values}")


def subset_ks(n: int) -> list[int]:
    """The k of the cross-check: 1 and n (n samples per problem bound k)."""
    return sorted({1, n})


def exact_on_subset(block: dict, ids: list[str], ks: list[int]) -> dict[str, float]:
    """`{"pass@k": mean exact bound over the problems `ids`}`: the exact side of the cross-check."""
    from align.evaluation.exact_coverage import pass_at_n_lower_bound

    missing = [problem_id for problem_id in ids if problem_id not in block["log_p"]]
    if missing:
        raise ValueError(f"the sampled problems {missing[:3]} have no exact-coverage record (skipped rows?)")
    bound = pass_at_n_lower_bound([block["log_p"][problem_id] for problem_id in ids], ks).mean(axis=0)
    return {f"pass@{k}": float(value) for k, value in zip(ks, bound)}


def collect_results(
    evaluations: dict[str, dict], sampled_ids: list[str], size, timings: dict[str, float], model: str
) -> dict:
    """results.json: every number of the report (fractions, not percent); `sampled_ids` are the subset's problems."""
    from align.evaluation.exact_coverage import compare_exact_coverage

    names = list(evaluations)
    ce_name, dco_name = names[1], names[2]
    ks = subset_ks(size.n)
    exact, cross_check = {}, {}
    for name, evaluation in evaluations.items():
        block = evaluation["exact"]["exact_coverage"]
        check_exact_sane(name, block)
        exact[name] = {
            "num_problems": block["num_problems"],
            "pass_at": block["pass_at"],
            "ci95": block["ci95"],
            "curve": block["curve"],
        }
        sampled = evaluation["sampled"]
        columns = [f"pass@{k}" for k in ks] + [f"maj@{size.n}"]
        cross_check[name] = {
            "num_problems": sampled["num_problems"],
            "n": sampled["n"],
            "sampled": {column: sampled["metrics"][column] for column in columns},
            "sampled_stderr": {column: sampled["stderr"].get(column) for column in columns},
            "exact": exact_on_subset(block, sampled_ids, ks),
        }
    blocks = {name: evaluations[name]["exact"]["exact_coverage"] for name in (ce_name, dco_name)}
    return {
        "model": model,
        "sizes": asdict(size),
        "exact": exact,
        "cross_check": cross_check,
        "difference": {
            "a": ce_name,
            "b": dco_name,
            "paired": compare_exact_coverage(blocks[ce_name], blocks[dco_name], REPORT_NS),
        },
        "note": blocks[dco_name]["note"],
        "timings_s": {name: round(seconds, 1) for name, seconds in timings.items()},
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _points(value: float) -> str:
    """A difference in percentage points, signed: two decimals, or two significant digits below 0.005 points (two
    adapters after a few steps differ by 1e-5 points, and a consistent sign then makes the interval exclude 0)."""
    points = 100 * value
    return f"{points:+.1e}" if 0 < abs(points) < 0.005 else f"{points:+.2f}"


def _exact_table(results: dict) -> list[str]:
    lines = ["| model | " + " | ".join(f"exact pass@{n}" for n in REPORT_NS) + " |", "| --- |" + " --- |" * 4]
    for name, exact in results["exact"].items():
        cells = [
            f"{_pct(exact['pass_at'][str(n)])} [{_pct(exact['ci95'][str(n)][0])}, {_pct(exact['ci95'][str(n)][1])}]"
            for n in REPORT_NS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _sampled_cell(row: dict, column: str) -> str:
    """A sampled metric in percent, ± its standard error over problems."""
    stderr = row["sampled_stderr"][column]
    return _pct(row["sampled"][column]) + ("" if stderr is None else f" ± {_pct(stderr)}")


def _cross_check_table(results: dict) -> list[str]:
    n = results["sizes"]["n"]
    ks = subset_ks(n)
    header = [cell for k in ks for cell in (f"sampled pass@{k}", f"exact pass@{k}")] + [f"sampled maj@{n}"]
    lines = ["| model | " + " | ".join(header) + " |", "| --- |" + " --- |" * len(header)]
    for name, row in results["cross_check"].items():
        cells = [cell for k in ks for cell in (_sampled_cell(row, f"pass@{k}"), _pct(row["exact"][f"pass@{k}"]))]
        lines.append(f"| {name} | " + " | ".join([*cells, _sampled_cell(row, f"maj@{n}")]) + " |")
    return lines


def _difference_table(results: dict) -> list[str]:
    a, b = results["difference"]["a"], results["difference"]["b"]
    lines = [f"| N | {a} | {b} | {b} − {a} (points) | paired 95 % interval | |", "| --- |" + " --- |" * 5]
    for n in REPORT_NS:
        d = results["difference"]["paired"][f"pass@{n}"]
        verdict = "shown" if d["shown"] else "not shown (interval contains 0)"
        lines.append(
            f"| {n} | {_pct(d['mean_a'])} | {_pct(d['mean_b'])} | {_points(d['diff'])} | "
            f"[{_points(d['low'])}, {_points(d['high'])}] | {verdict} |"
        )
    return lines


def report_text(results: dict) -> str:
    """report.md: the three tables (percent), the lower-bound note and the stage times."""
    size = results["sizes"]
    num_test, num_sampled, n = size["num_test"], size["num_sampled"], size["n"]
    sampling = f"temperature {size['temperature']}, top-p {size['top_p']}"
    lines = [
        "# align demo: fine-tuning for pass@N (DCO) vs cross-entropy",
        "",
        f"{results['model']} + LoRA on the synthetic task (levels {size['levels']}, direct answers), "
        f"{size['num_train']} training problems, {size['max_steps']} steps of batch {size['batch_size']} for each "
        "run (identical data, steps and seed).",
        "",
        f"## Exact coverage on {num_test} held-out problems ({sampling})",
        "",
        f"Percent, with the percentile-bootstrap 95 % interval over problems; curves to N = 10^4: {PLOT_FILE}.",
        "",
        *_exact_table(results),
        "",
        f"## {results['difference']['b']} − {results['difference']['a']}, paired by problem",
        "",
        *_difference_table(results),
        "",
        f"## Cross-check: sampling on the first {num_sampled} problems (n={n}, at most {size['max_new_tokens']} new "
        "tokens)",
        "",
        "Sampled: unbiased pass@k 1 - C(n-c,k)/C(n,k) and maj@k over graded samples, ± one standard error over "
        "problems; exact: the bound on the same problems. Sampled should be at or above exact within sampling "
        "error (other strings than the canonical one can be graded correct).",
        "",
        *_cross_check_table(results),
        "",
        f"Note: {results['note']}.",
        "",
        "Per-model details: eval/<model>/exact/ (exact_coverage.jsonl: log p per problem, summary.json) and "
        "eval/<model>/sampled/ (samples.jsonl, summary.json); every number above: results.json.",
        "",
        "Stage times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in results["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    output_dir: Path,
    evaluations: dict[str, dict],
    sampled_ids: list[str],
    size,
    timings: dict[str, float],
    model: str,
) -> dict[str, Path]:
    """Write report.md, results.json and exact_coverage.png (one exact pass@N curve per model, 95 % intervals at the
    key N); returns their paths."""
    from align.evaluation.plots import plot_exact_coverage

    results = collect_results(evaluations, sampled_ids, size, timings, model)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    report = output_dir / REPORT_FILE
    report.write_text(report_text(results))
    plot = plot_exact_coverage(
        {name: evaluation["exact"]["exact_coverage"] for name, evaluation in evaluations.items()},
        output_dir / PLOT_FILE,
        title=f"align demo: synthetic levels {size.levels}, {size.num_test} problems, exact coverage "
        f"(temperature {size.temperature}, top-p {size.top_p})",
    )
    return {"report": report, "results": output_dir / RESULTS_FILE, "plot": plot}
