"""The problems of the pass@k proving ground beyond the test set: the arms' training problems (selected by the
start's exact p) and the validation problems that tuning scores, so that no choice is made on the test problems."""

from __future__ import annotations

from pathlib import Path


def eval_common(size, instruction: str) -> dict:
    """The evaluation options every policy of the proving ground is scored with (temperature 1, full support)."""
    return {
        "temperature": size.temperature,
        "top_p": 1.0,
        "batch_size": size.eval_batch_size,
        "prompt_instruction": instruction,
        "seed": 0,
    }


def select_training_problems(start: Path, size, instruction: str, output_dir: Path) -> Path:
    """`train.jsonl`: the problems of a train-split pool on which the start's exact p lies in the band.

    Why: at the start's pass@1 most problems have p < 0.05, so most groups of K samples are all wrong and carry no
    gradient for any objective (75-82 % of the groups in the first, unfiltered run); the band keeps the problems where
    a group of K holds a right and a wrong sample with probability 1 - p^K - (1 - p)^K >= 0.56 at K = 16. The same
    problems, in the same order, train every arm, so the selection favours none. The pool's scores are kept in
    `eval/pool/` (exact coverage of the start, reused on a rerun).
    """
    import math

    from align.data.synthetic import generate_problems
    from align.pipeline import evaluate, write_problems

    pool = generate_problems(size.num_train, "train", size.levels, seed=size.train_seed)
    pool_file = write_problems(pool, output_dir / "train_pool.jsonl")
    scored = evaluate(
        start, pool_file, output_dir / "eval" / "pool", exact_coverage=True, n=0, **eval_common(size, instruction)
    )
    log_p = scored["exact_coverage"]["log_p"]
    kept = [
        problem
        for problem in pool
        if problem.id in log_p and size.train_p_low <= math.exp(log_p[problem.id]) <= size.train_p_high
    ]
    needed = size.steps * size.prompts_per_step
    if len(kept) < needed:
        raise ValueError(
            f"only {len(kept)} of {len(pool)} pool problems have the start's exact p in [{size.train_p_low}, "
            f"{size.train_p_high}], fewer than the {needed} prompts the arms draw; raise --num-train or widen the band"
        )
    print(
        f"training problems: {len(kept)} of {len(pool)} with the start's exact p in "
        f"[{size.train_p_low}, {size.train_p_high}]",
        flush=True,
    )
    return write_problems(kept, output_dir / "train.jsonl")


def validation_problems(size, output_dir: Path) -> Path:
    """Problems for tuning: the train split under another synthetic seed, without the pool's problems, so that no
    choice is made on the test problems the report scores."""
    from dataclasses import replace as replace_problem

    from align.data.synthetic import generate_problems
    from align.pipeline import write_problems

    pool = {
        problem.problem for problem in generate_problems(size.num_train, "train", size.levels, seed=size.train_seed)
    }
    candidates = generate_problems(size.num_validation + len(pool), "train", size.levels, seed=size.validation_seed)
    fresh = [problem for problem in candidates if problem.problem not in pool][: size.num_validation]
    renamed = [replace_problem(problem, id=f"validation-{index}") for index, problem in enumerate(fresh)]
    return write_problems(renamed, output_dir / "validation.jsonl")
