"""The pass@k proving ground (`align repro pass-k`): every pass@k objective against GRPO from one start, on a task
where a CPU can see them separate.

Task: the synthetic direct-answer problems (levels 1-2, answers `$\\boxed{42}$`, ~8 tokens), so a sample is cheap
and p = π(gold + EOS | prompt) is one teacher-forced pass. Start: SmolLM2-135M-Instruct after the demo's cross-entropy
warm-up (LoRA, levels 1-2, 256 problems, 48 steps of 16, lr 5e-4; the demo's model scores exact pass@1 0.066,
pass@16 0.374, pass@256 0.947 on its 40 test problems), merged into the weights (`start/`); its exact pass@1 and
pass@16 are checked against 0.05-0.4 and < 0.8.

Arms, each trained from `start/` with the same fresh LoRA (seeded: B = 0, so the step-0 policy IS the start), the
same training problems (`train.jsonl`: the problems of a 1024-problem train-split pool, synthetic seed 1, on which the
start's exact p lies in [0.05, 0.8]; `pass_k_problems.select_training_problems` says why), the same prompts per step
and order (GRPO's seeded sampler), K samples per prompt, optimizer steps, learning rate and seed:

- online (`align train pass_n --pass_k_objective X`): `grpo` (TRL's (r - mean)/std advantages, scale_rewards=group),
  `dco` (N' = 16), `pkpo` (k = 8, loo-1), `pkpo_anneal` (k = 8 for the first half of the steps, then k = 1),
  `passk_analytic` (k = 8), `max_k_loo` (k = K), `risk_seeking` (β = 2). K = 16 samples per prompt, so k = 8 (the
  PKPO paper's k for n = 16): with k = K, `passk_analytic` has a single k-subset and every advantage is 0, and PKPO's
  loo-1 reduces to max_k_loo (only the best sample of a group with one correct sample moves).
- offline (the gold answer as the target, `completion_target: answer`): `sft` (cross-entropy) and `dco_offline`
  (DCO, N' = 16), one problem per online prompt, same steps.

The learning rate (1e-4) was chosen by `--tune-lr` (`pass_k_tune`): GRPO on seed 2, scored on validation problems of
the train split, never on the test problems.

Evaluation of every final policy: exact coverage (`align eval --exact-coverage`, temperature 1) on `num_test` held-out
problems from the test split (pass@1, @16, @256, @4096, curve to 10⁴), and sampled pass@1/@16 (n = 16) on the
first `num_sampled` of them as the cross-check; paired-bootstrap 95 % intervals over problems of each arm minus GRPO
of the same seed (`pass_k_report`). Layout of the run directory: train/<arm>-s<seed>/ (final adapter),
eval/<arm>-s<seed>/{exact,sampled}/ (summary.json), report.md, results.json, pass-k.png. A finished arm or
evaluation is reused, an interrupted one resumes (`align.pipeline`).

Budget (measured on 2 free cores, bf16 auto; neighbours on the same cores, even at nice 19 or SCHED_IDLE, made GRPO
steps 4-7x slower, so the sweep needs the machine to itself): warm-up 48 steps, 236 s; an online arm, 8 steps of
4 prompts x 16 samples (64 sequences of ~80 tokens, ~27 s per step), 205-220 s; an evaluation (exact coverage of 256
problems + 32 x 16 samples), ~37 s; an offline arm under a minute. 14 online arms + 4 offline + 19 evaluations:
about 70 minutes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.experiments.pass_k_problems import eval_common, select_training_problems
from align.experiments.pass_k_report import start_line, write_outputs


ONLINE_ARMS = ("grpo", "dco", "pkpo", "pkpo_anneal", "passk_analytic", "max_k_loo", "risk_seeking")
OFFLINE_ARMS = ("sft", "dco_offline")
ARMS = ONLINE_ARMS + OFFLINE_ARMS
BASELINE = "grpo"


@dataclass
class ProvingGroundSize:
    """Sizes of the proving ground (the full sweep; `QUICK` is a pipeline check)."""

    levels: list[int] = field(default_factory=lambda: [1, 2])
    # warm-up: the demo's cross-entropy fine-tune (recipes/smollm2-135m-instruct/sft.yaml + the demo's fields)
    warmup_num_train: int = 256
    warmup_steps: int = 48
    warmup_batch_size: int = 16
    warmup_learning_rate: float = 5e-4
    # the arms' training problems: a pool from the train split (a fresh draw, not the warm-up's), kept where the
    # start's exact p lies in [train_p_low, train_p_high], so most groups of K samples hold a right and a wrong one
    num_train: int = 1024
    train_seed: int = 1
    train_p_low: float = 0.05
    train_p_high: float = 0.8
    # the arms
    steps: int = 8
    prompts_per_step: int = 4
    num_generations: int = 16
    pass_k: int = 8
    pass_n: int = 16
    risk_seeking_beta: float = 2.0
    learning_rate: float = 1e-4
    max_completion_length: int = 12
    temperature: float = 1.0
    # evaluation
    num_test: int = 256
    num_sampled: int = 32
    n: int = 16
    max_new_tokens: int = 16
    eval_batch_size: int = 64
    close_margin: float = 0.02  # "pass@1 close to GRPO's": the difference's 95 % interval inside ±close_margin
    # learning-rate tuning (`--tune-lr`): GRPO on its own seed, scored on validation problems of the train split
    tune_seed: int = 2
    num_validation: int = 256
    validation_seed: int = 3


QUICK = ProvingGroundSize(
    levels=[1],
    warmup_num_train=16,
    warmup_steps=2,
    warmup_batch_size=4,
    num_train=16,
    train_p_low=0.0,
    train_p_high=1.0,
    steps=2,
    prompts_per_step=2,
    num_generations=4,
    pass_k=2,
    pass_n=4,
    num_test=8,
    num_sampled=3,
    n=4,
    max_new_tokens=12,
    eval_batch_size=16,
    num_validation=8,
)


def arm_overrides(arm: str, size: ProvingGroundSize) -> tuple[str, dict]:
    """(method of `align train`, recipe fields beyond the shared ones) of one arm."""
    if arm in ONLINE_ARMS:
        objective = {"pkpo_anneal": "pkpo", "dco": "dco"}.get(arm, arm)
        extra: dict = {"pass_k_objective": objective}
        if arm == "grpo":
            extra["scale_rewards"] = "group"  # GRPO as TRL (and the papers' baselines) run it
        elif arm == "dco":
            extra["pass_n"] = size.pass_n
        elif arm in ("pkpo", "passk_analytic"):
            extra["pass_k"] = size.pass_k
        elif arm == "pkpo_anneal":
            extra["pass_k_schedule"] = f"{size.pass_k}:{max(size.steps // 2, 1)},1"
        elif arm == "risk_seeking":
            extra["risk_seeking_beta"] = size.risk_seeking_beta
        return "pass_n", extra
    if arm == "sft":
        return "sft", {}
    if arm == "dco_offline":
        return "dco", {"pass_n": size.pass_n}
    raise ValueError(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")


def _shared_fields(size: ProvingGroundSize, start: Path, train_file: Path, instruction: str, seed: int) -> dict:
    return {
        "model_name_or_path": str(start),
        "dataset_name": str(train_file),
        "prompt_instruction": instruction,
        "max_steps": size.steps,
        "learning_rate": size.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "save_strategy": "steps",
        "save_steps": max(size.steps // 2, 1),
        "save_total_limit": 1,
        "logging_steps": 1,
        "seed": seed,
        "report_to": "none",
    }


def arm_fields(
    arm: str, size: ProvingGroundSize, start: Path, train_file: Path, instruction: str, seed: int
) -> tuple[str, dict]:
    """(method, every recipe field the arm sets): the online arms sample K completions for `prompts_per_step`
    prompts per step; the offline ones train on the gold answers of as many problems per step."""
    method, extra = arm_overrides(arm, size)
    fields = _shared_fields(size, start, train_file, instruction, seed)
    if method == "pass_n":
        fields.update(
            num_generations=size.num_generations,
            per_device_train_batch_size=size.prompts_per_step * size.num_generations,
            max_completion_length=size.max_completion_length,
            temperature=size.temperature,
            top_p=1.0,
        )
    else:
        fields.update(completion_target="answer", per_device_train_batch_size=size.prompts_per_step, max_length=128)
    return method, {**fields, **extra}


def warmup_fields(size: ProvingGroundSize, model: str, instruction: str) -> dict:
    """The demo's cross-entropy run (`align demo`'s train_overrides at the warm-up's sizes), on sft.yaml, seed 0."""
    from align.demo import DemoSize, train_overrides

    demo = DemoSize(
        levels=size.levels,
        num_train=size.warmup_num_train,
        num_test=0,
        num_sampled=0,
        max_steps=size.warmup_steps,
        batch_size=size.warmup_batch_size,
        learning_rate=size.warmup_learning_rate,
        n=0,
        max_new_tokens=0,
    )
    return {**train_overrides(demo, model), "prompt_instruction": instruction, "seed": 0}


def merge_start(adapter_dir: Path, start_dir: Path) -> Path:
    """Fold the warm-up adapter into the weights and save the full model as `start_dir` (reused when present).

    `align train` attaches a fresh LoRA to the model it loads, so every arm trains a new adapter on these weights;
    seeded, with B = 0, it starts from exactly the warm-up policy. Written to a temporary directory and renamed, so an
    interrupted merge is redone, never half-used.
    """
    if (start_dir / "config.json").exists():
        print(f"reusing the merged start model in {start_dir}", flush=True)
        return start_dir
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(adapter_dir))
    merged = model.merge_and_unload()
    tmp = start_dir.with_name(start_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(start_dir)
    return start_dir


def train_arm(
    arm: str, seed: int, size: ProvingGroundSize, start: Path, train_file: Path, instruction: str, run_dir: Path
) -> Path:
    """Train one arm (reused when finished). The global RNGs are seeded first, so the fresh LoRA's initialization
    is the same for every arm of a seed whatever ran before it in this process."""
    from transformers import set_seed

    from align.pipeline import train_recipe
    from align.training import default_recipe

    method, fields = arm_fields(arm, size, start, train_file, instruction, seed)
    set_seed(seed)
    return train_recipe(method, default_recipe(method), run_dir, fields)


def evaluate_policy(model, name: str, files: dict[str, Path], size: ProvingGroundSize, instruction: str, out: Path):
    """(exact-coverage block on the test problems, sampled metrics on the subset) of one policy, both reused."""
    from align.pipeline import check_sane, evaluate

    common = eval_common(size, instruction)
    exact = evaluate(model, files["test"], out / name / "exact", exact_coverage=True, n=0, **common)
    sampled = evaluate(
        model, files["sampled"], out / name / "sampled", n=size.n, max_new_tokens=size.max_new_tokens, **common
    )
    check_sane(name, sampled)
    return exact["exact_coverage"], sampled["metrics"]


def run_pass_k_proving_ground(
    output_dir: Path,
    size: ProvingGroundSize,
    model: str,
    *,
    instruction: str,
    seeds: list[int],
    arms: tuple[str, ...] | list[str] = ARMS,
) -> dict:
    """Warm up, merge, train every (arm, seed), evaluate each policy, write report.md, results.json, pass-k.png."""
    from align.data.synthetic import generate_problems
    from align.experiments.runs import check_repro_config
    from align.pipeline import stage, write_problems

    if BASELINE not in arms:
        raise ValueError(f"--objectives must include {BASELINE}: every difference is taken against it")
    output_dir = output_dir.resolve()
    check_repro_config(output_dir, {"experiment": "pass-k", "model": model, **asdict(size)})
    problems = generate_problems(size.num_test, "test", size.levels)
    files = {
        "test": write_problems(problems, output_dir / "test.jsonl"),
        "sampled": write_problems(problems[: size.num_sampled], output_dir / "test_sampled.jsonl"),
    }
    timings: dict[str, float] = {}

    def timed(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)

    began = time.perf_counter()
    start = warm_start(output_dir, size, model, instruction)
    timed("warm-up", began)
    evaluations = {}
    began = time.perf_counter()
    with stage("evaluate the start"):
        evaluations["start"] = evaluate_policy(start, "start", files, size, instruction, output_dir / "eval")
        timed("evaluate start", began)
    check_start(evaluations["start"][0])
    with stage("select the training problems (exact p of the start on the pool)"):
        train_file = select_training_problems(start, size, instruction, output_dir)
    for seed in seeds:
        for arm in arms:
            name = f"{arm}-s{seed}"
            began = time.perf_counter()
            with stage(f"train {name}"):
                trained = train_arm(arm, seed, size, start, train_file, instruction, output_dir / "train" / name)
                timed(f"train {name}", began)
            began = time.perf_counter()
            with stage(f"evaluate {name}"):
                evaluations[name] = evaluate_policy(trained, name, files, size, instruction, output_dir / "eval")
                timed(f"evaluate {name}", began)
    results = write_outputs(
        output_dir, evaluations, size=size, model=model, seeds=seeds, arms=arms, online=ONLINE_ARMS, timings=timings
    )
    print((output_dir / "report.md").read_text())
    print(f"results: {output_dir / 'results.json'}\nfigure:  {output_dir / 'pass-k.png'}", flush=True)
    return results


def warm_start(output_dir: Path, size: ProvingGroundSize, model: str, instruction: str) -> Path:
    """The warm-up (cross-entropy, reused when finished) merged into `start/`: the one policy every arm starts from."""
    from align.pipeline import stage, train_recipe
    from align.training import default_recipe

    with stage(f"warm-up: cross-entropy on {size.warmup_num_train} problems, {size.warmup_steps} steps"):
        fields = warmup_fields(size, model, instruction)
        warmup = train_recipe("sft", default_recipe("sft"), output_dir / "train" / "warmup", fields)
        return merge_start(warmup, output_dir / "start")


def check_start(block: dict) -> None:
    """Warn when the start is outside the range where the objectives can separate (pass@1 in 0.05-0.4, pass@16 <
    0.8): a start that always or never answers right gives every objective the same (no) signal."""
    print(start_line(block["pass_at"]["1"], block["pass_at"]["16"]), flush=True)
