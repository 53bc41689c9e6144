"""The `align demo` experiment: base vs cross-entropy vs DCO fine-tuning on CPU, evaluated by exact coverage.

A model fine-tuned for pass@N (DCO, N' = 16) is compared with one fine-tuned with cross-entropy on identical data,
steps and seed, starting from the embedded SmolLM2-135M-Instruct, on the offline synthetic task with direct answers
(the DCO paper's setting: the target is the final answer, so p̂ is the model's confidence in it):

1. freeze a held-out test set of synthetic problems (and its first `num_sampled` as the sampled subset);
2. evaluate the base model: exact coverage on every test problem (`align.evaluation.exact_coverage`: p =
   π(canonical answer + EOS | prompt) by one forward pass, pass@N >= 1 - (1 - p)^N for N = 1..10^4 with no
   sampling noise), and, as the cross-check, n sampled completions per subset problem (pass@k, maj@n);
3. fine-tune two LoRA adapters from recipes/smollm2-135m-instruct/{sft,dco}.yaml (shipped with align);
4. evaluate both the same way;
5. write DIR/report.md, DIR/results.json and DIR/exact_coverage.png (`align.demo_report`).

Every stage is resumable: a finished training run or evaluation is reused, an interrupted one resumes
(`align.pipeline`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


DIRECT_ANSWER_INSTRUCTION = "Give only the final answer, as \\boxed{ANSWER}."


@dataclass
class DemoSize:
    levels: list[int]
    num_train: int
    num_test: int  # scored by exact coverage
    num_sampled: int  # the first num_sampled test problems, also sampled n times each (the cross-check)
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


# Training is sized as before the switch to exact coverage (48 steps of 16 = 3 epochs over 256 problems, long enough
# for cross-entropy to grow confident; the whole demo took 9 min 11 s on 2 cores, most of it training). The
# evaluation it replaces sampled 40 x 16 completions per model; now each model costs 256 teacher-forced forward
# passes of ~10 answer tokens (seconds) plus 16 x 16 samples of at most 16 tokens, so `make demo` fits in 10 minutes.
FULL = DemoSize(
    levels=[1, 2],
    num_train=256,
    num_test=256,
    num_sampled=16,
    max_steps=48,
    batch_size=16,
    learning_rate=5e-4,
    n=16,
    max_new_tokens=16,
)
QUICK = DemoSize(
    levels=[1],
    num_train=32,
    num_test=8,
    num_sampled=3,
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
    """Options both evaluations share: exact coverage scores the distribution the cross-check samples from."""
    return {
        "temperature": size.temperature,
        "top_p": size.top_p,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": DIRECT_ANSWER_INSTRUCTION,
        "seed": 0,
    }


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
    lines.append(
        f"evaluation of base, cross-entropy, DCO: exact coverage on {size.num_test} held-out problems (pass@N, "
        f"N = 1..10^4); sampled cross-check on the first {size.num_sampled} with n={size.n} "
        f"(temperature {size.temperature}, top-p {size.top_p}, at most {size.max_new_tokens} new tokens)"
    )
    return "\n".join(lines)


def evaluate_model(model, name: str, files: dict[str, Path], size: DemoSize, out: Path) -> dict:
    """`{"exact": summary on every test problem, "sampled": summary on the subset}` of one model, both reused."""
    from align.evaluation.exact_coverage import format_exact_coverage
    from align.pipeline import check_sane, evaluate

    exact = evaluate(model, files["test"], out / "exact", exact_coverage=True, n=0, **eval_options(size))
    print(f"{name}:\n{format_exact_coverage(exact['exact_coverage'])}", flush=True)
    sampled = evaluate(
        model, files["sampled"], out / "sampled", n=size.n, max_new_tokens=size.max_new_tokens, **eval_options(size)
    )
    check_sane(name, sampled)
    return {"exact": exact, "sampled": sampled}


def run_demo(output_dir: Path, size: DemoSize, model: str) -> dict:
    """All five stages; returns `{model name: evaluate_model(...)}` for base, cross-entropy and DCO."""
    from align.data.synthetic import generate_problems
    from align.demo_report import write_outputs
    from align.pipeline import stage, train_recipe, write_problems
    from align.training import default_recipe

    if not 1 <= size.num_sampled <= size.num_test:
        raise ValueError(f"num_sampled must be in [1, num_test = {size.num_test}], got {size.num_sampled}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "demo_config.json").write_text(json.dumps({"model": model, **asdict(size)}, indent=2))
    timings: dict[str, float] = {}
    start = last = time.perf_counter()

    def timed(name):
        nonlocal last
        timings[name] = time.perf_counter() - last
        last = time.perf_counter()

    with stage("1/5 synthetic task"):
        problems = generate_problems(size.num_test, "test", size.levels)
        files = {
            "test": write_problems(problems, output_dir / "test.jsonl"),
            "sampled": write_problems(problems[: size.num_sampled], output_dir / "test_sampled.jsonl"),
        }
        print(
            f"{size.num_test} held-out problems -> {files['test']} (exact coverage), the first {size.num_sampled} -> "
            f"{files['sampled']} (sampled); training problems come from the disjoint train split"
        )
        timed("task")
    evaluations: dict[str, dict] = {}
    with stage("2/5 evaluate the base model"):
        evaluations["base"] = evaluate_model(model, "base", files, size, output_dir / "eval" / "base")
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
            evaluations[name] = evaluate_model(trained[name], name, files, size, output_dir / "eval" / method)
        timed("fine-tuned eval")
    with stage("5/5 report"):
        sampled_ids = [problem.id for problem in problems[: size.num_sampled]]
        paths = write_outputs(output_dir, evaluations, sampled_ids, size, timings, model)
        print(paths["report"].read_text())
        print(
            f"report:  {paths['report']}\nresults: {paths['results']}\nplot:    {paths['plot']}\n"
            f"elapsed: {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return evaluations
