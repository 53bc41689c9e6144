"""`align demo`: what align is for, in one command on a CPU.

A model fine-tuned for pass@N (DCO, N' = 16) is compared with one fine-tuned with cross-entropy on identical data,
steps and seed, starting from the embedded SmolLM2-135M-Instruct, on the offline synthetic task with direct answers
(the DCO paper's setting: the target is the final answer, so p̂ is the model's confidence in it):

1. freeze a held-out test set of synthetic problems;
2. evaluate the base model: pass@k for k = 1..16 and maj@16;
3. fine-tune two LoRA adapters from recipes/smollm2-135m-instruct/{sft,dco}.yaml (shipped with align);
4. evaluate both the same way;
5. write DIR/report.md (table) and DIR/passk.png (the three pass@k curves).

Every stage is resumable: rerunning reuses finished stages and resumes interrupted ones. `--quick` runs the same
stages at toy sizes (CI uses it) and checks that the numbers are sane; `--dry-run` prints what would run (sizes,
recipes, output directory) and stops before loading a model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


HELP = "End-to-end demo on CPU: base vs cross-entropy vs DCO fine-tuning, pass@k curves and a report."

DIRECT_ANSWER_INSTRUCTION = "Give only the final answer, as \\boxed{ANSWER}."


@dataclass
class DemoSize:
    levels: list[int]
    num_train: int
    num_test: int
    max_steps: int
    batch_size: int
    learning_rate: float
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eval_batch_size: int = 64
    pass_n: int = 16
    extra: dict = field(default_factory=dict)


# Sized for <= 20 minutes on 2 CPU cores (SmolLM2 + LoRA trains at ~7.4 s per step of 16 short sequences and samples
# ~100 tokens/s at batch 64): 48 steps of 16 = 3 epochs over 256 problems, long enough for cross-entropy to grow
# confident; the fine-tuned models answer in ~8 tokens, the base model rambles until max_new_tokens.
FULL = DemoSize(
    levels=[1, 2], num_train=256, num_test=40, max_steps=48, batch_size=16, learning_rate=5e-4, n=16, max_new_tokens=16
)
QUICK = DemoSize(
    levels=[1],
    num_train=32,
    num_test=4,
    max_steps=2,
    batch_size=4,
    learning_rate=5e-4,
    n=4,
    max_new_tokens=16,
    eval_batch_size=16,
)


def train_overrides(size: DemoSize, model: str) -> dict:
    """Recipe fields the demo sets for both runs, so they differ only in the loss."""
    return {
        "model_name_or_path": model,
        "synthetic_levels": size.levels,
        "synthetic_num_train": size.num_train,
        "completion_target": "answer",
        "prompt_instruction": DIRECT_ANSWER_INSTRUCTION,
        "max_steps": size.max_steps,
        "per_device_train_batch_size": size.batch_size,
        "learning_rate": size.learning_rate,
        "save_strategy": "steps",
        "save_steps": max(size.max_steps // 4, 1),
        "logging_steps": max(size.max_steps // 20, 1),
        "max_length": 128,
        "report_to": "none",
        **size.extra,
    }


def eval_options(size: DemoSize) -> dict:
    return {
        "n": size.n,
        "temperature": size.temperature,
        "top_p": size.top_p,
        "max_new_tokens": size.max_new_tokens,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": DIRECT_ANSWER_INSTRUCTION,
        "seed": 0,
    }


def write_report(
    output_dir: Path, summaries: dict[str, dict], size: DemoSize, timings: dict[str, float], model: str
) -> Path:
    from align.pipeline import metrics_table

    n = size.n
    columns = [f"pass@{k}" for k in (1, 4, 16) if k <= n] + [f"maj@{n}"]
    base, ce, dco = (summaries[name]["metrics"] for name in ("base", "cross-entropy", f"DCO (N'={size.pass_n})"))
    gap = 100 * (dco[f"pass@{n}"] - ce[f"pass@{n}"])
    lines = [
        "# align demo: fine-tuning for pass@N (DCO) vs cross-entropy",
        "",
        f"{model} + LoRA on the synthetic task (levels {size.levels}, direct answers), "
        f"{size.num_train} training problems, {size.max_steps} steps of batch {size.batch_size} for each run; "
        f"evaluated on {size.num_test} held-out problems with n={n} samples each "
        f"(temperature {size.temperature}, top-p {size.top_p}, at most {size.max_new_tokens} new tokens).",
        "",
        metrics_table(summaries, columns),
        "",
        f"DCO minus cross-entropy at pass@{n}: {gap:+.1f} points; at pass@1: "
        f"{100 * (dco['pass@1'] - ce['pass@1']):+.1f} points (base pass@1 {100 * base['pass@1']:.1f}).",
        "",
        "pass@k is the unbiased estimator 1 - C(n-c,k)/C(n,k); maj@k votes over answers grouped by math-verify "
        "equivalence. Curves: passk.png. Per-model details: eval/<model>/summary.json and samples.jsonl.",
        "",
        "Stage times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()),
        "",
    ]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def demo_runs(size: DemoSize) -> dict[str, tuple[str, dict]]:
    """The fine-tuned models: report name -> (method, recipe fields beyond the shared `train_overrides`)."""
    return {"cross-entropy": ("sft", {}), f"DCO (N'={size.pass_n})": ("dco", {"pass_n": size.pass_n})}


def describe_plan(output_dir: Path, size: DemoSize, model: str) -> str:
    """What `run_demo` would do with these arguments (the `--dry-run` output); fails if a recipe is missing."""
    from align.training import default_recipe

    lines = [f"align demo: {model}, sizes {json.dumps(asdict(size))}", f"output: {output_dir}"]
    for name, (method, extra) in demo_runs(size).items():
        lines.append(f"{name}: align train {method} --config {default_recipe(method)} + {json.dumps(extra)}")
    lines.append(f"shared recipe overrides: {json.dumps(train_overrides(size, model))}")
    return "\n".join(lines)


def run_demo(output_dir: Path, size: DemoSize, model: str) -> dict:
    from align.data.synthetic import generate_problems
    from align.pipeline import check_sane, evaluate, plot_pass_curves, stage, train_recipe, write_problems
    from align.training import default_recipe

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "demo_config.json").write_text(json.dumps({"model": model, **asdict(size)}, indent=2))
    timings: dict[str, float] = {}
    start = last = time.perf_counter()

    def timed(name):
        nonlocal last
        timings[name] = time.perf_counter() - last
        last = time.perf_counter()

    with stage("1/5 synthetic task"):
        test_file = write_problems(generate_problems(size.num_test, "test", size.levels), output_dir / "test.jsonl")
        print(
            f"{size.num_test} held-out problems -> {test_file}; training problems come from the disjoint train split"
        )
        timed("task")
    summaries: dict[str, dict] = {}
    with stage("2/5 evaluate the base model"):
        summaries["base"] = evaluate(model, test_file, output_dir / "eval" / "base", **eval_options(size))
        timed("base eval")
    runs = demo_runs(size)
    trained = {}
    with stage("3/5 fine-tune: cross-entropy and DCO (identical data, steps, seed)"):
        for name, (method, extra) in runs.items():
            print(f"--- {name}", flush=True)
            trained[name] = train_recipe(
                method,
                default_recipe(method),
                output_dir / "train" / method,
                {**train_overrides(size, model), **extra},
            )
        timed("training")
    with stage("4/5 evaluate the fine-tuned models"):
        for name, (method, _) in runs.items():
            summaries[name] = evaluate(trained[name], test_file, output_dir / "eval" / method, **eval_options(size))
        timed("fine-tuned eval")
    with stage("5/5 report"):
        for name, summary in summaries.items():
            check_sane(name, summary)
        plot = plot_pass_curves(
            summaries,
            output_dir / "passk.png",
            f"synthetic levels {size.levels}, {size.num_test} problems, n={size.n}",
        )
        report = write_report(output_dir, summaries, size, timings, model)
        print(report.read_text())
        print(f"report: {report}\nplot:   {plot}\nelapsed: {time.perf_counter() - start:.0f} s", flush=True)
    return summaries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="align demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", "--output_dir", default="runs/demo", help="Where everything goes.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes (about 3 minutes): checks the pipeline.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Base model (alias, path or Hub id).")
    parser.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="Print the plan (sizes, recipes, output) and stop."
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    size = QUICK if args.quick else FULL
    output_dir = Path(args.output_dir)
    if args.quick and args.output_dir == "runs/demo":
        output_dir = Path("runs/demo-quick")
    if args.dry_run:
        print(describe_plan(output_dir, size, args.model))
        return 0
    run_demo(output_dir, size, args.model)
    return 0
