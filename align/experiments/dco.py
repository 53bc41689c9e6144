"""The DCO paper's central effect at CPU scale (`align repro dco`), measured by exact coverage.

Chen et al. 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute" (Table 1, Llama-3-8B on MATH direct
answers): with more cross-entropy (CE) epochs pass@1 rises while pass@256 and pass@4k fall, because the model grows
over-confident in its greedy answer; Direct Coverage Optimization (DCO, loss −log(1 − (1 − p̂)^N')) limits that.

Experiment: CE and DCO (N' = 16 and 64) LoRA adapters of SmolLM2-135M-Instruct on the synthetic task with direct
answers (`completion_target: answer`), trained for max(epochs) epochs with a checkpoint per epoch, once per training
seed (the seed sets the LoRA initialization and the data order; CE and DCO of a seed share both). Every checkpoint
after the epochs in `epochs`, and the base model, is evaluated by

- exact coverage (`align eval --exact-coverage`, temperature 1, top-p 1) on `num_test` held-out problems: p =
  π(`$\\boxed{answer}$` + EOS | prompt) per problem, pass@N ≥ 1 − (1 − p)^N for N = 1..10⁴ (pass@1, 16, 256, 4096,
  10⁴ and the curve), a lower bound with no sampling noise;
- sampled pass@1..n and maj@n (n = `n`) on the first `num_sampled` problems: the cross-check of the bound;
- the greedy-answer confidence p̂(ŷ_greedy | x) on the first `num_confidence` problems, overall and when wrong.

`dco_report` pairs the checkpoints per problem (DCO − CE at each epoch, each method at epoch e − itself at the first
epoch; paired-bootstrap 95 % intervals) and decides the paper's claims per seed. Layout of the run directory:
train/<method>-s<seed>/checkpoint-*/, eval/<name>/{exact,sampled}/summary.json (name: base, or
<method>-s<seed>-e<epoch>), confidence/<name>.json, report.md, results.json, repro-dco.png. Every stage is reused
when finished and resumes when interrupted (`align.pipeline`).

Budget (the full size below, 2 seeds): ≤ ~35 minutes on 2 free CPU cores, from the measured free-core rates (a LoRA
step of 16 short sequences, SFT or DCO: ~4.4 s; exact coverage of 256 problems: ~10 s of forward passes + ~10 s of
model loading per checkpoint; a sampled sequence ~0.055 s):

- training: 128 problems / batch 16 = 8 steps per epoch, 4 epochs = 32 steps x 4.4 s = 141 s + ~15 s loading and
  saving = ~155 s per run; 3 methods x 2 seeds = 6 runs = ~935 s;
- evaluation of one checkpoint: exact coverage ~20 s, sampled 16 problems x 16 = 256 samples ~14 s + ~10 s loading,
  greedy confidence of 64 problems ~6 s + ~10 s loading = ~60 s; 3 methods x 3 epochs x 2 seeds + the base = 19
  checkpoints = ~1140 s;

total ~2075 s = ~35 minutes. Epochs 1, 2, 4 span the paper's 1-4 epochs (its Table 1); `--epochs 1 2 4 8` adds the
over-trained end at about twice the training time (~19 more minutes).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.experiments.dco_report import CROSS_ENTROPY, write_outputs
from align.experiments.runs import check_repro_config, slug


@dataclass
class ReproSize:
    """Sizes of `align repro dco` (the full sweep; `QUICK` is a pipeline check)."""

    levels: list[int] = field(default_factory=lambda: [1, 2])
    num_train: int = 128
    epochs: list[int] = field(default_factory=lambda: [1, 2, 4])
    batch_size: int = 16
    learning_rate: float = 5e-4
    pass_ns: list[int] = field(default_factory=lambda: [16, 64])
    temperature: float = 1.0
    # evaluation: exact coverage on every test problem, the sampled cross-check and the confidence on the first ones
    num_test: int = 256
    num_sampled: int = 16
    n: int = 16
    num_confidence: int = 64
    max_new_tokens: int = 16
    eval_batch_size: int = 64


QUICK = ReproSize(
    levels=[1],
    num_train=16,
    epochs=[1, 2],
    batch_size=8,
    pass_ns=[4],
    num_test=8,
    num_sampled=3,
    n=4,
    num_confidence=4,
    max_new_tokens=12,
    eval_batch_size=16,
)


def dco_label(pass_n: int) -> str:
    return f"DCO N'={pass_n}"


def methods(size: ReproSize) -> dict[str, tuple[str, dict]]:
    """{label: (method of `align train`, its recipe fields beyond the shared ones)}: CE first, then every DCO N'."""
    runs = {CROSS_ENTROPY: ("sft", {})}
    runs.update({dco_label(pass_n): ("dco", {"pass_n": pass_n}) for pass_n in size.pass_ns})
    return runs


def training_fields(size: ReproSize, model: str, instruction: str, seed: int) -> dict:
    """The recipe fields every method of a seed shares: same problems, batches, schedule and seed."""
    return {
        "model_name_or_path": model,
        "synthetic_levels": size.levels,
        "synthetic_num_train": size.num_train,
        "completion_target": "answer",
        "prompt_instruction": instruction,
        "num_train_epochs": max(size.epochs),
        "max_steps": -1,
        "per_device_train_batch_size": size.batch_size,
        "learning_rate": size.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "save_strategy": "epoch",
        "save_total_limit": None,
        "logging_steps": 5,
        "max_length": 128,
        "seed": seed,
        "report_to": "none",
    }


def checkpoints_by_epoch(run_dir: Path) -> dict[int, Path]:
    """With save_strategy=epoch the k-th checkpoint (by step) is the end of epoch k."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return {epoch: path for epoch, path in enumerate(checkpoints, start=1)}


def train_method(method: str, seed: int, size: ReproSize, model: str, instruction: str, run_dir: Path) -> Path:
    """Train one method for max(epochs) epochs (reused when finished). The global RNGs are seeded first, so that the
    fresh LoRA's initialization is the same for every method of a seed whatever ran before it in this process."""
    from transformers import set_seed

    from align.pipeline import train_recipe
    from align.training import default_recipe

    recipe, extra = methods(size)[method]
    set_seed(seed)
    return train_recipe(
        recipe, default_recipe(recipe), run_dir, {**training_fields(size, model, instruction, seed), **extra}
    )


def greedy_confidence_summary(
    model_path: Path | str, problems, size: ReproSize, instruction: str, cache: Path
) -> dict:
    """Mean greedy-answer confidence p̂(ŷ_greedy|x) over `problems`, overall and on wrong greedy answers, and the
    greedy accuracy (cached in `cache`)."""
    if cache.exists():
        return json.loads(cache.read_text())
    from align.data.prompts import render_prompt
    from align.diagnostics.confidence import greedy_confidence
    from align.grading import Grader
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_path))
    prompts = [render_prompt(p.problem, tokenizer, instruction) for p in problems]
    greedy = greedy_confidence(model, tokenizer, prompts, max_new_tokens=size.max_new_tokens)
    with Grader() as grader:
        correct = [grader.grade(g["completion"], p.answer).correct for g, p in zip(greedy, problems)]
    wrong = [g["prob"] for g, ok in zip(greedy, correct) if not ok]
    result = {
        "greedy_confidence": statistics.fmean(g["prob"] for g in greedy),
        "greedy_confidence_when_wrong": statistics.fmean(wrong) if wrong else None,
        "greedy_accuracy": sum(correct) / len(correct),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def evaluate_checkpoint(model_path, name: str, files: dict, problems, size: ReproSize, instruction: str, out: Path):
    """{"exact": exact-coverage block (all test problems), "sampled": sampled metrics (the subset), "confidence"}."""
    from align.pipeline import check_sane, evaluate

    common = {
        "temperature": size.temperature,
        "top_p": 1.0,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": instruction,
        "seed": 0,
    }
    exact = evaluate(model_path, files["test"], out / "eval" / name / "exact", exact_coverage=True, n=0, **common)
    sampled = evaluate(
        model_path, files["sampled"], out / "eval" / name / "sampled", n=size.n, max_new_tokens=size.max_new_tokens,
        **common,
    )  # fmt: skip
    check_sane(name, sampled)
    confidence = greedy_confidence_summary(
        model_path, problems[: size.num_confidence], size, instruction, out / "confidence" / f"{name}.json"
    )
    return {"exact": exact["exact_coverage"], "sampled": sampled["metrics"], "confidence": confidence}


def run_dco_repro(output_dir: Path, size: ReproSize, model: str, *, instruction: str, seeds: list[int]) -> dict:
    """Train every (method, seed), evaluate the base model and each checkpoint of `epochs`, write report.md,
    results.json and repro-dco.png (`dco_report.write_outputs`); returns what results.json holds."""
    from align.data.synthetic import generate_problems
    from align.pipeline import stage, write_problems

    # Seeds are not part of the record: another seed adds runs next to the finished ones, reusing them.
    check_repro_config(
        output_dir, {"experiment": "dco", "evaluation": "exact-coverage", "model": model, **asdict(size)}
    )
    problems = generate_problems(size.num_test, "test", size.levels)
    files = {
        "test": write_problems(problems, output_dir / "test.jsonl"),
        "sampled": write_problems(problems[: size.num_sampled], output_dir / "test_sampled.jsonl"),
    }
    timings: dict[str, float] = {}
    evaluations: dict[tuple, dict] = {}

    def measure(key: tuple, name: str, model_path) -> None:
        began = time.perf_counter()
        with stage(f"evaluate {name}"):
            evaluations[key] = evaluate_checkpoint(model_path, name, files, problems, size, instruction, output_dir)
        timings[f"evaluate {name}"] = round(time.perf_counter() - began, 1)

    measure(("base", None, 0), "base", model)
    for seed in seeds:
        for method in methods(size):
            run_name = f"{slug(method)}-s{seed}"
            began = time.perf_counter()
            with stage(f"train {method}, seed {seed}, for {max(size.epochs)} epochs"):
                run_dir = train_method(method, seed, size, model, instruction, output_dir / "train" / run_name)
            timings[f"train {run_name}"] = round(time.perf_counter() - began, 1)
            checkpoints = checkpoints_by_epoch(run_dir)
            for epoch in size.epochs:
                measure((method, seed, epoch), f"{run_name}-e{epoch}", checkpoints[epoch])
    results = write_outputs(output_dir, evaluations, size=size, model=model, seeds=seeds, timings=timings)
    print((output_dir / "report.md").read_text())
    print(f"results: {output_dir / 'results.json'}\nfigure:  {output_dir / 'repro-dco.png'}", flush=True)
    return results
