"""`align repro pass-k --tune-lr`: the proving ground's learning rate, chosen on validation problems.

GRPO (the baseline) trains at each candidate rate on `tune_seed`, which no reported arm uses, and is scored by exact
coverage on validation problems of the train split; the rate with the highest validation pass@16 is reported. Tuning
on the baseline alone is a choice that can only favour GRPO, so an objective that still beats it is not helped by it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from align.experiments.pass_k import ProvingGroundSize, train_arm, warm_start
from align.experiments.pass_k_problems import eval_common, select_training_problems, validation_problems


TUNE_NS = (1, 16, 256, 4096)


def tune_learning_rate(
    output_dir: Path, size: ProvingGroundSize, model: str, *, instruction: str, learning_rates: list[float]
) -> dict:
    """`--tune-lr`: GRPO at each learning rate on `tune_seed` (not a reported seed), scored by exact coverage on
    validation problems of the train split (`validation_problems`), never on the test problems; writes
    `tune/report.md` and `tune/results.json` and names the rate with the highest validation pass@16 (the middle of the
    range the claims are about). Shares the run directory's warm-up, start and training problems."""
    from align.evaluation.exact_coverage import compare_exact_coverage
    from align.experiments.runs import check_repro_config
    from align.pipeline import evaluate, stage

    output_dir = output_dir.resolve()
    identity = {key: value for key, value in asdict(size).items() if key != "learning_rate"}
    check_repro_config(output_dir / "tune", {"experiment": "pass-k-tune", "model": model, **identity})
    start = warm_start(output_dir, size, model, instruction)
    with stage("select the training problems (exact p of the start on the pool)"):
        train_file = select_training_problems(start, size, instruction, output_dir)
    validation = validation_problems(size, output_dir / "tune")
    common = eval_common(size, instruction)
    blocks = {
        "start": evaluate(
            start, validation, output_dir / "tune" / "eval" / "start", exact_coverage=True, n=0, **common
        )["exact_coverage"]
    }
    for rate in learning_rates:
        name = f"grpo-lr{rate:g}-s{size.tune_seed}"
        with stage(f"tune: train {name}"):
            run_dir = output_dir / "tune" / "train" / name
            trained = train_arm(
                "grpo", size.tune_seed, replace(size, learning_rate=rate), start, train_file, instruction, run_dir
            )
        out = output_dir / "tune" / "eval" / name
        blocks[f"{rate:g}"] = evaluate(trained, validation, out, exact_coverage=True, n=0, **common)["exact_coverage"]
    rows = []
    for name, block in blocks.items():
        diff = compare_exact_coverage(blocks["start"], block, TUNE_NS) if name != "start" else None
        rows.append(
            {"learning_rate": name, "pass_at": {n: block["pass_at"][str(n)] for n in TUNE_NS}, "vs_start": diff}
        )
    chosen = max((row for row in rows if row["learning_rate"] != "start"), key=lambda row: row["pass_at"][16])
    lines = [
        f"# pass@k proving ground: learning-rate tuning (GRPO, seed {size.tune_seed})",
        "",
        f"Exact coverage on {size.num_validation} validation problems (train split, synthetic seed "
        f"{size.validation_seed}, none of the training pool's); percent, with the difference from the start and its "
        "paired-bootstrap 95 % interval. The test problems of the report were not used.",
        "",
        "| learning rate | " + " | ".join(f"pass@{n}" for n in TUNE_NS) + " |",
        "| --- |" + " --- |" * len(TUNE_NS),
    ]
    for row in rows:
        cells = []
        for n in TUNE_NS:
            value = f"{100 * row['pass_at'][n]:.1f}"
            if row["vs_start"]:
                d = row["vs_start"][f"pass@{n}"]
                value += f" ({100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}])"
            cells.append(value)
        lines.append(f"| {row['learning_rate']} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen (highest validation pass@16): {chosen['learning_rate']}."]
    (output_dir / "tune" / "report.md").write_text("\n".join(lines) + "\n")
    results = {"rows": rows, "chosen": chosen["learning_rate"]}
    (output_dir / "tune" / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines), flush=True)
    return results
