"""The implicit-PRM proving ground (`align repro prm`): an on-policy implicit PRM, trained as the paper trains it,
tested where its claim lives: ranking the policy's own samples (best-of-N against majority vote) and locating the
first wrong step.

Yuan et al. 2024 (arXiv 2412.01981) train r_θ(y) = β log π_θ(y)/π_ref(y) on outcome labels of the policy's own
rollouts (cross-entropy, or DPO on correct/incorrect pairs) with the policy as π_ref, and score a response by its
lowest step reward. At CPU scale:

1. warm-up: SmolLM2-135M-Instruct, cross-entropy on the synthetic chain-of-thought solutions (LoRA, levels 1-2,
   1024 train problems, 64 steps of 16, lr 3e-4), merged into `start/`, so that at temperature 1 its pass@1 lies in
   0.2-0.6 and its samples hold right and wrong solutions (checked; a warning when not);
2. held-out samples: n = 16 per problem on `num_test` test-split problems, once, from `start/` (seed 0);
3. per training seed s: K = 8 samples on `num_train` train-split problems (synthetic seed `train_seed + s`,
   sampling seed s), graded; outcome rows (`ce`) and correct/incorrect pairs of one problem (`dpo`), and a PRM of
   each objective: a fresh LoRA over `start/`, whose adapter-disabled base is the reference (seed s);
4. every PRM scores the held-out samples once (step rewards kept): bon@16 and weighted maj@16 with the paper's `min`
   aggregate (process reward), and with `sum` = β log π_θ/π_ref of the whole response (the same PRM's outcome
   reward: the outcome-only baseline of the same size), each against maj@16 with paired-bootstrap 95 % intervals;
5. every PRM on the step-error benchmark (`align eval-steps --synthetic`: ProcessBench F1, threshold at its best on
   the test rows and chosen on train-split calibration rows), with the policy-likelihood and random-flag baselines.

No choice is tuned on the held-out problems: β = 0.05 (the paper's), the `min` aggregate (the paper's), the PRM's
learning rate and steps fixed before the first run, the step-benchmark threshold chosen on the calibration split.

Sizing, measured (2 CPU cores, bf16 auto): warm-up 64 steps of 16, 709 s; 200 x 16 held-out samples (≤ 160
tokens), 1004 s; per seed, 128 x 8 training samples 218-315 s, a PRM (32 steps of 16 sequences: ce 16 outcome rows,
dpo 8 pairs, the same compute per step) 351-524 s to train and 525-661 s to score the 3200 held-out samples with
the shared-prompt cache (compute-bound, ≈ 5 samples/s), the step benchmark (120 test + 60 calibration rows) 63-116 s.
Two seeds x two objectives: 111 minutes, over the 90 asked for; one seed takes about 73.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.data.prompts import DEFAULT_INSTRUCTION


OBJECTIVES = ("ce", "dpo")
PROCESS, OUTCOME = "min", "sum"  # the paper's step aggregate; the whole response's log-ratio (the outcome reward)


@dataclass
class PRMReproSize:
    """Sizes of the proving ground (`QUICK` is a pipeline check)."""

    levels: list[int] = field(default_factory=lambda: [1, 2])
    # warm-up (recipes/smollm2-135m-instruct/sft.yaml, chain-of-thought solutions)
    warmup_num_train: int = 1024
    warmup_steps: int = 64
    warmup_batch_size: int = 16
    warmup_learning_rate: float = 3e-4
    start_pass1_low: float = 0.2
    start_pass1_high: float = 0.6
    # PRM training data: K samples of the start per train-split problem, per seed
    num_train: int = 128
    k: int = 8
    train_seed: int = 11
    # PRMs (recipes/smollm2-135m-instruct/implicit_prm.yaml + these)
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))
    prm_steps: int = 32
    prm_batch_size: int = 16  # sequences per step: ce 16 outcome rows, dpo 8 pairs (the same compute per step)
    prm_learning_rate: float = 2e-4
    beta: float = 0.05
    # held-out samples
    num_test: int = 200
    n: int = 16
    max_new_tokens: int = 160
    temperature: float = 1.0
    eval_batch_size: int = 32
    score_batch_size: int = 16
    # step-error benchmark
    step_num_test: int = 120
    step_num_calibration: int = 60


QUICK = PRMReproSize(
    levels=[1],
    warmup_num_train=16,
    warmup_steps=2,
    warmup_batch_size=4,
    num_train=4,
    k=4,
    prm_steps=2,
    prm_batch_size=4,
    num_test=4,
    n=4,
    max_new_tokens=16,
    eval_batch_size=8,
    score_batch_size=8,
    step_num_test=4,
    step_num_calibration=4,
)


def sampling_options(size: PRMReproSize, seed: int) -> dict:
    """Options of every sampling run: temperature `size.temperature`, full support, the chain-of-thought prompt."""
    return {
        "temperature": size.temperature,
        "top_p": 1.0,
        "max_new_tokens": size.max_new_tokens,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": DEFAULT_INSTRUCTION,
        "seed": seed,
    }


def warmup_fields(size: PRMReproSize, model: str) -> dict:
    return {
        "model_name_or_path": model,
        "synthetic_levels": size.levels,
        "synthetic_num_train": size.warmup_num_train,
        "completion_target": "solution",
        "prompt_instruction": DEFAULT_INSTRUCTION,
        "max_steps": size.warmup_steps,
        "per_device_train_batch_size": size.warmup_batch_size,
        "learning_rate": size.warmup_learning_rate,
        "save_strategy": "steps",
        "save_steps": max(size.warmup_steps // 4, 1),
        "logging_steps": max(size.warmup_steps // 16, 1),
        "max_length": 256,
        "seed": 0,
        "report_to": "none",
    }


def prm_fields(size: PRMReproSize, objective: str, start: Path, data_file: Path, seed: int) -> dict:
    """Recipe fields of one PRM: a fresh LoRA over the merged start (so its adapter-disabled base, the reference, is
    the policy that produced the samples, as in the paper)."""
    return {
        "model_name_or_path": str(start),
        "dataset_name": str(data_file),
        "prompt_instruction": DEFAULT_INSTRUCTION,
        "objective": objective,
        "beta": size.beta,
        "max_steps": size.prm_steps,
        "per_device_train_batch_size": size.prm_batch_size // 2 if objective == "dpo" else size.prm_batch_size,
        "learning_rate": size.prm_learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 2,
        "save_strategy": "steps",
        "save_steps": max(size.prm_steps // 2, 1),
        "save_total_limit": 1,
        "logging_steps": max(size.prm_steps // 16, 1),
        "max_length": 512,
        "seed": seed,
        "report_to": "none",
    }


def warm_start(output_dir: Path, size: PRMReproSize, model: str) -> Path:
    """The chain-of-thought warm-up (reused when finished), merged into `start/`."""
    from align.experiments.pass_k import merge_start
    from align.pipeline import stage, train_recipe
    from align.training import default_recipe

    with stage(f"warm-up: cross-entropy on {size.warmup_num_train} chain-of-thought solutions"):
        warmup = train_recipe(
            "sft", default_recipe("sft"), output_dir / "train" / "warmup", warmup_fields(size, model)
        )
        return merge_start(warmup, output_dir / "start")


def training_data(start: Path, size: PRMReproSize, seed: int, output_dir: Path) -> dict:
    """K graded samples of the start per train problem -> data/s<seed>/{outcome,pairs}.jsonl and their counts."""
    from align.data.sampled import outcome_label_rows, pair_rows
    from align.data.synthetic import generate_problems
    from align.evaluation.records import read_records
    from align.pipeline import evaluate, write_problems

    problems = generate_problems(size.num_train, "train", size.levels, seed=size.train_seed + seed)
    problems_file = write_problems(problems, output_dir / f"train-s{seed}.jsonl")
    samples_dir = output_dir / "eval" / f"train-s{seed}"
    summary = evaluate(start, problems_file, samples_dir, n=size.k, **sampling_options(size, seed))
    ids = {problem.id for problem in problems}  # only this run's problems, whatever else the file holds
    records = [record for record in read_records(samples_dir / "samples.jsonl") if record["id"] in ids]
    outcome, outcome_counts = outcome_label_rows(records, instruction=DEFAULT_INSTRUCTION)
    pairs, pair_counts = pair_rows(records, instruction=DEFAULT_INSTRUCTION)
    data_dir = output_dir / "data" / f"s{seed}"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {"ce": data_dir / "outcome.jsonl", "dpo": data_dir / "pairs.jsonl"}
    for path, rows in ((files["ce"], outcome), (files["dpo"], pairs)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = {"outcome": outcome_counts, "pairs": pair_counts, "pass@1": summary["metrics"]["pass@1"]}
    if "dpo" in size.objectives and not pairs:
        raise ValueError(
            f"seed {seed}: none of the {size.num_train} training problems has both a correct and a wrong sample among "
            f"its {size.k}, so the dpo PRM has no pairs; raise --k or --num-train, or leave dpo out of --objectives"
        )
    return {"files": files, "counts": counts}


def score_held_out(load_prm, prm_dir: Path, policy_samples: Path, size: PRMReproSize, out: Path) -> list[dict]:
    """The held-out records with every sample's step rewards under the PRM (`score` = the `min` aggregate), kept in
    out/samples.jsonl; reused when that file holds every record scored by this PRM."""
    from align.evaluation.records import read_records, write_records_atomic
    from align.evaluation.scoring import prm_descriptor, score_records

    descriptor = prm_descriptor(str(prm_dir), None, PROCESS, None)
    path = out / "samples.jsonl"
    records = read_records(policy_samples)
    if path.exists():
        scored = read_records(path)
        if len(scored) == len(records) and all(record.get("scored_with") == descriptor for record in scored):
            print(f"reusing the scored samples in {path}", flush=True)
            return scored
    scorer = load_prm(prm_dir)
    score_records(records, scorer, aggregate=PROCESS, batch_size=size.score_batch_size, descriptor=descriptor)
    out.mkdir(parents=True, exist_ok=True)
    write_records_atomic(path, records)
    return records


def step_benchmark(load_prm, prm_dir: Path, size: PRMReproSize, out: Path, *, likelihood: bool) -> dict:
    """`align eval-steps --synthetic` for one PRM (summary.json reused when present)."""
    from align.evaluation.step_scoring import run_step_benchmark, synthetic_rows, write_results

    path = out / "summary.json"
    if path.exists():
        print(f"reusing the step benchmark in {path}", flush=True)
        return json.loads(path.read_text())
    rows, calibration = synthetic_rows(size.step_num_test, size.step_num_calibration, size.levels, seed=0)
    results = run_step_benchmark(
        load_prm(prm_dir),
        rows,
        calibration,
        instruction=DEFAULT_INSTRUCTION,
        batch_size=size.score_batch_size,
        likelihood=likelihood,
    )
    write_results(out, str(prm_dir), results)
    return json.loads(path.read_text())


def merged_timings(path: Path, timings: dict[str, float]) -> dict[str, float]:
    """Stage times across the runs of a directory (kept in `path`): a stage reused from an earlier run takes ~0 s,
    so each stage keeps the longest time it took, the run that did its work."""
    stored = json.loads(path.read_text()) if path.exists() else {}
    merged = {name: max(seconds, stored.get(name, 0.0)) for name, seconds in {**stored, **timings}.items()}
    path.write_text(json.dumps(merged, indent=2))
    return merged


def run_prm_repro(output_dir: Path, size: PRMReproSize, model: str, *, seeds: list[int]) -> dict:
    """Every stage of the module docstring; returns results.json's content."""
    from transformers import set_seed

    from align.data.synthetic import generate_problems
    from align.evaluation.scoring import load_scorer
    from align.experiments.prm_report import start_warning, write_outputs
    from align.experiments.runs import check_repro_config
    from align.pipeline import evaluate, stage, train_recipe, write_problems
    from align.training import default_recipe

    unknown = [objective for objective in size.objectives if objective not in OBJECTIVES]
    if unknown or not size.objectives:
        raise ValueError(f"objectives: got {size.objectives}; choose from {', '.join(OBJECTIVES)}")
    output_dir = output_dir.resolve()
    check_repro_config(output_dir, {"experiment": "prm", "model": model, "seeds": seeds, **asdict(size)})
    timings: dict[str, float] = {}

    def timed(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)

    # Scoring and the step benchmark of one PRM share one loaded copy; only the latest PRM is kept in memory.
    load_prm = functools.lru_cache(maxsize=1)(lambda prm_dir: load_scorer(str(prm_dir)))
    began = time.perf_counter()
    start = warm_start(output_dir, size, model)
    timed("warm-up", began)
    test_file = write_problems(generate_problems(size.num_test, "test", size.levels), output_dir / "test.jsonl")
    began = time.perf_counter()
    with stage(f"held-out samples: {size.num_test} problems x {size.n}"):
        policy = evaluate(start, test_file, output_dir / "eval" / "policy", n=size.n, **sampling_options(size, 0))
        timed("held-out samples", began)
    warning = start_warning(policy["metrics"]["pass@1"], size)
    if warning:
        print(warning, flush=True)
    policy_samples = output_dir / "eval" / "policy" / "samples.jsonl"
    data, scored, steps = {}, {}, {}
    for seed in seeds:
        began = time.perf_counter()
        with stage(f"seed {seed}: {size.k} samples on each of {size.num_train} train problems"):
            data[seed] = training_data(start, size, seed, output_dir)
            print(json.dumps(data[seed]["counts"]), flush=True)
            timed(f"training samples s{seed}", began)
        for objective in size.objectives:
            name = f"{objective}-s{seed}"
            began = time.perf_counter()
            with stage(f"train the {objective} PRM, seed {seed}"):
                set_seed(seed)  # the fresh LoRA's initialization does not depend on what ran before in this process
                fields = prm_fields(size, objective, start, data[seed]["files"][objective], seed)
                prm_dir = train_recipe("prm", default_recipe("prm"), output_dir / "train" / name, fields)
                timed(f"train {name}", began)
            began = time.perf_counter()
            with stage(f"score the held-out samples with {name}"):
                scored[name] = score_held_out(load_prm, prm_dir, policy_samples, size, output_dir / "eval" / name)
                timed(f"score {name}", began)
            began = time.perf_counter()
            with stage(f"step-error benchmark of {name}"):
                out = output_dir / "steps" / name
                steps[name] = step_benchmark(load_prm, prm_dir, size, out, likelihood=not steps)
                timed(f"steps {name}", began)
    timings = merged_timings(output_dir / "timings.json", timings)
    results = write_outputs(
        output_dir,
        policy=policy,
        scored=scored,
        steps=steps,
        data={seed: value["counts"] for seed, value in data.items()},
        size=size,
        model=model,
        seeds=seeds,
        timings=timings,
        warning=warning,
    )
    print((output_dir / "report.md").read_text())
    print(f"results: {output_dir / 'results.json'}\nfigure:  {output_dir / 'repro-prm.png'}", flush=True)
    return results
