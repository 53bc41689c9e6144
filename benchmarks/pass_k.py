"""The pass@k objectives: training-step cost of each against TRL's GRPOTrainer, and advantage time against K.

1. Step: `PassAtNGRPOTrainer` with every `pass_k_objective` and TRL's `GRPOTrainer`, all on the same samples (the
   torch seed is reset to the same value before each step, the learning rate is 0 so the models stay equal, the
   same cheap binary reward: `even_token_sum`), interleaved; the ratio of medians to GRPO, target <= 1.05.
2. Advantages: `align.losses.pass_k.pass_k_advantages` on 256 groups of K binary rewards for K = 4 ... 1024
   (k = K/2; dco: N = 16), warm (fastest call, the binomial ratios cached as in training, where K is fixed) and cold
   (the first call for a K); the slope of log time against log K over the largest sizes, target <= 2 (the code is
   O(K log K): a sort and cumulative sums).

`python -m benchmarks.pass_k --fast` runs the tiny model with 8 rounds and 5 calls per size (about a minute);
`python -m benchmarks pass_k` runs the full one (tiny model, 20 rounds; SmolLM2-135M + LoRA, 3 rounds; K to 1024).
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time

from benchmarks.common import CPU_TRAINER_ARGS, cpu_threads, emit, interleaved, lora_config, ratio, sampling_step_fn


HEAVY = True  # the full run trains 7 SmolLM2 trainers (~15 minutes on 2 cores): `python -m benchmarks pass_k`
TARGET_RATIO = 1.05
TARGET_SLOPE = 2.0
OBJECTIVE_ARGS = {
    "dco": {"pass_n": 16},
    "pkpo": {},  # k = K // 2, the loo-1 estimator
    "passk_analytic": {},
    "max_k_loo": {},
    "risk_seeking": {},
    "grpo": {},
}


def even_token_sum(completion_ids, **kwargs):
    """A binary reward that costs nothing: 1 when the completion's token ids sum to an even number. Grading costs the
    same for every objective, so leaving it out (the verifier takes 0.1-5 s per batch of nonsense from a random model)
    only makes the comparison stricter: the ratio is of the work the objectives do differ in."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def _trainers(model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import prompt_rows
    from align.trainers.pass_n import PassAtNConfig, PassAtNGRPOTrainer

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=1.0,
        loss_type="dr_grpo",  # the same aggregation everywhere, so only the advantages differ
        scale_rewards="none",
        learning_rate=0.0,
        **CPU_TRAINER_ARGS,
    )
    data = Dataset.from_list(prompt_rows(generate_problems(8 * prompts_per_step, "train", levels=(1,), seed=0)))
    trainers = {
        "trl_grpo": GRPOTrainer(
            model=model_path,
            reward_funcs=even_token_sum,
            args=GRPOConfig(**common),
            train_dataset=data,
            peft_config=lora_config(lora),
        )
    }
    for objective, extra in OBJECTIVE_ARGS.items():
        trainers[objective] = PassAtNGRPOTrainer(
            model=model_path,
            reward_funcs=even_token_sum,
            args=PassAtNConfig(pass_k_objective=objective, **extra, **common),
            train_dataset=data,
            peft_config=lora_config(lora),
        )
    for trainer in trainers.values():
        trainer.create_optimizer()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return trainers


def measure_steps(name, model_path, lora, prompts_per_step, num_generations, max_completion_length, repeats) -> dict:
    with tempfile.TemporaryDirectory(prefix="align-bench-pass-k-") as output_dir:
        trainers = _trainers(model_path, output_dir, prompts_per_step, num_generations, max_completion_length, lora)
        loader = trainers["trl_grpo"].get_train_dataloader()
        batches = [batch for batch, _ in zip(loader, range(4))]
        results = interleaved({key: sampling_step_fn(trainer, batches) for key, trainer in trainers.items()}, repeats)
        base = results["trl_grpo"]["median_s"]
        ratios = {key: ratio(results[key]["median_s"], base) for key in OBJECTIVE_ARGS}
        return emit(
            "pass_k_step",
            model=name,
            lora=lora,
            prompts_per_step=prompts_per_step,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            threads=cpu_threads(),
            trl_grpo_step_s=base,
            step_s={key: results[key]["median_s"] for key in OBJECTIVE_ARGS},
            time_ratio=ratios,
            peak_rss_mib={key: value["peak_rss_mib"] for key, value in results.items()},
            target_ratio=TARGET_RATIO,
            meets_target=all(value <= TARGET_RATIO for value in ratios.values()),
            repeats=repeats,
        )


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: a sub-millisecond call's median on a shared machine is mostly interference."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(K)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure_advantages(sizes: list[int], groups: int = 256, repeats: int = 20) -> list[dict]:
    import torch

    from align.losses import pass_k

    records = []
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    # One thread: the algorithm's scaling, not that of a thread pool on a shared machine (with 2 threads on 2 busy
    # cores, large tensors hit intra-op parallelism and their times jump 10x at random).
    torch.set_num_threads(1)
    try:
        for objective in pass_k.PASS_K_OBJECTIVES:
            records.append(_advantage_scaling(pass_k, objective, sizes, groups, repeats, generator))
    finally:
        torch.set_num_threads(threads)
    return records


def _advantage_scaling(pass_k, objective, sizes, groups, repeats, generator) -> dict:
    import torch

    warm, cold = [], []
    for size in sizes:
        rewards = (torch.rand(groups, size, generator=generator) < 0.3).double()
        k = 16 if objective == "dco" else size // 2

        def call(rewards=rewards, k=k, objective=objective):
            pass_k.pass_k_advantages(objective, rewards, k=k)

        pass_k._coefficients.cache_clear()
        pass_k._analytic_table.cache_clear()
        cold.append(_best_time(call, 1))
        warm.append(_best_time(call, repeats))
    tail = max(3, len(sizes) // 2)  # the largest sizes, where the asymptotic cost dominates the call overhead
    slope = _slope(sizes[-tail:], warm[-tail:])
    return emit(
        "pass_k_advantages",
        objective=objective,
        groups=groups,
        sizes=sizes,
        warm_s=[round(t, 6) for t in warm],
        cold_s=[round(t, 6) for t in cold],
        warm_slope=round(slope, 3),
        cold_slope=round(_slope(sizes[-tail:], cold[-tail:]), 3),
        target_slope=TARGET_SLOPE,
        meets_target=slope <= TARGET_SLOPE,
        threads=1,
    )


def main(fast: bool = False) -> list[dict]:
    import os

    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.testing import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    records = measure_advantages([4, 8, 16, 32, 64, 128, 256, 512, 1024], repeats=5 if fast else 20)
    with tempfile.TemporaryDirectory(prefix="align-bench-tiny-") as tiny_dir:
        tiny = build_tiny_model(tiny_dir)
        records.append(measure_steps("tiny-llama", tiny, False, 4, 8, 32, repeats=8 if fast else 20))
    if not fast:
        smollm2 = resolve_model_path(DEFAULT_MODEL)
        records.append(measure_steps(DEFAULT_MODEL, smollm2, True, 2, 8, 64, repeats=3))
    return records


if __name__ == "__main__":
    main(fast="--fast" in sys.argv[1:])
