"""Grading throughput: align's worker pool (`align.grading.Grader`) vs math-verify called inline, 2,000 answers.

Baseline = what a script without align does: `math_verify.parse` + `verify` in the main process with math-verify's
own signal timeouts, one answer after the other (same answer extraction and configuration as ours). Ours =
`Grader.grade_many` over the same items with one worker per CPU (workers started before the clock; their start-up
is reported separately). The benchmark checks that both reach the same verdicts.

The 2,000 answers mix what an evaluation sees: MATH-500 reference solutions against their own answer and against
another problem's answer (when ALIGN_MATH500 is set), sampled-style synthetic completions (right, off by one, as a
fraction, as a decimal), and completions without a final answer. Every item is distinct, so the pool's
de-duplication of identical items does not flatter it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time

from benchmarks.common import emit, peak_rss, ratio


NUM_ITEMS = 2000


def mixed_items(num_items: int = NUM_ITEMS, seed: int = 0) -> list[tuple[str, str]]:
    from align.data.synthetic import generate_problems

    rng = random.Random(seed)
    items: list[tuple[str, str]] = []
    path = os.environ.get("ALIGN_MATH500")
    if path and os.path.exists(path):
        with open(path) as handle:
            rows = [json.loads(line) for line in handle]
        items += [(row["solution"], row["answer"]) for row in rows]
        items += [(row["solution"], rows[(i + 1) % len(rows)]["answer"]) for i, row in enumerate(rows)]
    items = list(dict.fromkeys(items))  # MATH-500 repeats a few (solution, answer) pairs
    problems = generate_problems(num_items, "test", levels=(1, 2, 3, 4, 5), seed=seed)
    for index, problem in enumerate(problems):
        if len(items) >= num_items:
            break
        kind = rng.choice(["right", "off", "decimal", "none"])
        if kind == "right":
            text = problem.solution
        elif kind == "off":
            text = f"Working it out step by step.\n\nSo the result is $\\boxed{{{index}{problem.answer}1}}$."
        elif kind == "decimal":
            text = f"Converting ({index}), the answer is $\\boxed{{{rng.randint(1, 999) / 8}}}$."
        else:
            text = f"I think the answer is {problem.answer} but I am not sure (attempt {index})."
        if (text, problem.answer) not in items:
            items.append((text, problem.answer))
    return items[:num_items]


def grade_inline(items, extraction_config) -> list[bool]:
    """The same grading as the pool's, one item after the other in this process, with math-verify's own (signal)
    timeouts: extract the final answer, parse it and the gold with math-verify, verify."""
    from math_verify import parse, verify

    from align.data.answers import final_answer

    verdicts = []
    for completion, gold in items:
        extracted = final_answer(completion)
        if extracted is None:
            verdicts.append(False)
            continue
        predicted = parse(f"\\boxed{{{extracted}}}", extraction_config)
        reference = parse(f"\\boxed{{{gold}}}", extraction_config)
        verdicts.append(bool(predicted) and bool(reference) and verify(reference, predicted))
    return verdicts


def main(repeats: int = 3) -> dict:
    from align.grading import Grader
    from align.grading.verify import extraction_config as _extraction_config

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    items = mixed_items()
    extraction_config = _extraction_config()
    workers = len(os.sched_getaffinity(0))
    times = {"pool": [], "inline": []}
    peaks = {"pool": 0.0, "inline": 0.0}
    startup = []
    agreement = None
    for _ in range(repeats):
        # A fresh pool per round, started before the clock: its caches are as cold as the inline run's.
        began = time.perf_counter()
        grader = Grader(num_workers=workers, timeout_s=5.0)
        grader.grade_many([("$\\boxed{1}$", "1")] * 1 + [(f"$\\boxed{{{i}}}$", "0") for i in range(workers * 2)])
        startup.append(time.perf_counter() - began)
        with peak_rss() as memory:
            began = time.perf_counter()
            pool_results = grader.grade_many(items)
            times["pool"].append(time.perf_counter() - began)
        peaks["pool"] = max(peaks["pool"], memory["peak_mib"])
        grader.close()
        with peak_rss() as memory:
            began = time.perf_counter()
            inline_results = grade_inline(items, extraction_config)
            times["inline"].append(time.perf_counter() - began)
        peaks["inline"] = max(peaks["inline"], memory["peak_mib"])
        same = sum(p.correct == i for p, i in zip(pool_results, inline_results))
        agreement = same / len(items)
    best = {name: statistics.median(values) for name, values in times.items()}
    return emit(
        "grading",
        items=len(items),
        workers=workers,
        pool_answers_per_s=round(len(items) / best["pool"], 1),
        inline_answers_per_s=round(len(items) / best["inline"], 1),
        speedup_vs_inline=ratio(best["inline"], best["pool"]),
        times_s={name: [round(t, 3) for t in values] for name, values in times.items()},
        pool_startup_s=round(min(startup), 2),
        verdict_agreement=round(agreement, 4),
        peak_rss_mib=peaks,
        note="median of interleaved rounds; pool workers started before timing (start-up reported separately); "
        "peak RSS is the parent process only (each worker is a separate ~150 MiB process)",
    )


if __name__ == "__main__":
    main()
