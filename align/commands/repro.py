"""`align repro dco`: the DCO paper's central effect, re-measured at CPU scale (`align.experiments.dco`).

Chen et al. 2025 (Table 1, Llama-3-8B on MATH direct answers): with more cross-entropy epochs pass@1 rises while
pass@256 and pass@4k fall, because the model grows over-confident in its greedy answer; DCO limits that. This
experiment trains cross-entropy and DCO (N' = 16 and 64) LoRA adapters of SmolLM2-135M-Instruct on the synthetic task
with direct answers for max(epochs) epochs per training seed, evaluates the checkpoints after epochs 1, 2, 4 by exact
coverage on 256 held-out problems (pass@1..10^4 without sampling noise; a sampled cross-check on 16 of them) and the
greedy-answer confidence, and decides the paper's claims per seed from paired-bootstrap 95 % intervals (report.md,
results.json, repro-dco.png). About 30 minutes for 2 seeds on 2 free CPU cores (`--quick`: a few minutes); every
stage is resumable.

`align repro pass-k` is the pass@k proving ground (`align.experiments.pass_k`): every objective of `align train
pass_n --pass_k_objective`, and offline cross-entropy vs DCO, from one warm-up, scored by exact coverage with
paired-bootstrap intervals against GRPO (about 65 minutes on 2 free cores; `--quick`: a few minutes).

`align repro prm` is the implicit-PRM proving ground (`align.experiments.prm`): a chain-of-thought warm-up, PRMs
(`ce`, `dpo`) trained on the policy's own graded samples with the policy as reference, then best-of-16 and weighted
maj@16 against maj@16 on held-out samples, process (`min`) against outcome (`sum`) scores, and the step-error
benchmark, with paired-bootstrap intervals (`--quick`: a few minutes).

`align repro prime` is the PRIME proving ground (`align.experiments.prime`): PRIME against outcome-only RLOO (the
same trainer without process rewards) and GRPO from the PRM proving ground's warm-up (`--start` reuses one), same
prompts and sample budget, held-out pass@1/pass@8 with paired-bootstrap intervals and training-reward curves.

`align repro margin` is the margin proving ground (`align.experiments.margin`): DPO, DPO with pairwise normalized
gradients and SimPO LoRA runs of SmolLM2 on the same 128 synthetic pairs (32 steps, float32, entanglement
diagnostics on), the change of every pair's chosen and rejected log-prob against the start on the training and 64
held-out pairs, with bootstrap and paired-bootstrap intervals, verdicts on "the normalized update keeps chosen
log-probs from falling without losing the margin", the diagnostics' sign agreement and CHES correlations.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from align.demo import DIRECT_ANSWER_INSTRUCTION


HELP = (
    "Reproduce a paper's effect at CPU scale: `align repro dco` (cross-entropy vs DCO over epochs), `align repro "
    "pass-k` (every pass@k objective against GRPO), `align repro prm` (an on-policy implicit PRM: best-of-N vs "
    "majority vote, step-error F1), `align repro prime` (PRIME vs outcome-only RLOO and GRPO), `align repro "
    "margin` (DPO vs pairwise normalized DPO vs SimPO: does the chosen log-prob still fall?)."
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="align repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "experiment", choices=["dco", "pass-k", "prm", "prime", "margin"], help="Which paper effect to reproduce."
    )
    parser.add_argument("--output-dir", "--output_dir", help="Default: runs/repro-<experiment>.")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--start", help="prime: a merged warm-up to start from (default: the PRM proving ground's).")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: checks the pipeline in a few minutes.")
    sizes = parser.add_argument_group(
        "size overrides (default: the full sweep; dco about 30 minutes, pass-k about 65, on 2 free CPU cores)"
    )
    sizes.add_argument("--epochs", type=int, nargs="+", help="Evaluate after these epochs (trains max(epochs)).")
    sizes.add_argument("--pass-n", "--pass_n", dest="pass_ns", type=int, nargs="+", help="DCO budgets N' to train.")
    sizes.add_argument("--n", type=int, help="Samples per problem of the sampled cross-check.")
    sizes.add_argument("--num-train", "--num_train", type=int, help="Synthetic training problems.")
    sizes.add_argument("--num-test", "--num_test", type=int, help="Held-out test problems.")
    sizes.add_argument("--levels", type=int, nargs="+", help="Synthetic difficulty levels (1-5).")
    pass_k = parser.add_argument_group("pass-k (align.experiments.pass_k)")
    pass_k.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="Training seeds (every pass-k arm, every dco method, every prm objective; default 0 1; --quick: 0).",
    )
    pass_k.add_argument(
        "--objectives", nargs="+", help="pass-k: arms to train (default all; must include grpo). prm: ce and/or dpo."
    )
    pass_k.add_argument(
        "--tune-lr",
        type=float,
        nargs="+",
        metavar="LR",
        help="Instead of the sweep: train GRPO at each learning rate on the tuning seed and score it on validation "
        "problems of the train split (tune/report.md); then run the sweep with the chosen --learning-rate.",
    )
    pass_k.add_argument("--learning-rate", type=float, help="Learning rate of every arm (default: the tuned 1e-4).")
    pass_k.add_argument(
        "--steps", type=int, help="Optimizer steps of every arm or PRM (also takes --num-train/-test, --levels)."
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.start is not None and args.experiment != "prime":
        parser.error("--start is an option of `align repro prime`")
    if args.experiment == "pass-k":
        return _pass_k(parser, args)
    if args.experiment == "prm":
        return _prm(parser, args)
    if args.experiment == "prime":
        return _prime(parser, args)
    if args.experiment == "margin":
        return _margin(parser, args)
    return _dco(parser, args)


def _dco(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import dco

    if any(getattr(args, name) is not None for name in ("objectives", "steps", "tune_lr", "learning_rate")):
        parser.error("--objectives, --steps, --tune-lr and --learning-rate belong to `align repro pass-k`")
    size = dco.QUICK if args.quick else dco.ReproSize()
    overrides = _size_overrides(parser, args, ("epochs", "pass_ns", "n", "num_train", "num_test", "levels"))
    if "epochs" in overrides:
        overrides["epochs"] = sorted(set(overrides["epochs"]))
    if args.seeds is not None and any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds: got {args.seeds}; training seeds are integers >= 0")
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds is not None else [0] if args.quick else [0, 1]
    output_dir = Path(args.output_dir or "runs/repro-dco")
    dco.run_dco_repro(
        output_dir, replace(size, **overrides), args.model, instruction=DIRECT_ANSWER_INSTRUCTION, seeds=seeds
    )
    return 0


def _size_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name, value in overrides.items():
        values = value if isinstance(value, list) else [value]
        if any(v < 1 for v in values) or (name == "levels" and any(v > 5 for v in values)):
            parser.error(f"--{name.replace('_', '-')}: got {value}; sizes must be >= 1 and levels in 1..5")
    return overrides


def _pass_k(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import pass_k

    if any(getattr(args, name) is not None for name in ("epochs", "pass_ns", "n")):
        parser.error("--epochs/--pass-n/--n belong to `align repro dco`")
    arms = args.objectives or list(pass_k.ARMS)
    unknown = [arm for arm in arms if arm not in pass_k.ARMS]
    if unknown or pass_k.BASELINE not in arms:
        parser.error(f"--objectives: got {arms}; choose from {' '.join(pass_k.ARMS)}, including {pass_k.BASELINE}")
    seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1]
    output_dir = Path(args.output_dir or ("runs/repro-pass-k-quick" if args.quick else "runs/repro-pass-k"))
    size = pass_k.QUICK if args.quick else pass_k.ProvingGroundSize()
    size = replace(size, **_size_overrides(parser, args, ("num_train", "num_test", "levels", "steps")))
    rates = [rate for rate in [args.learning_rate, *(args.tune_lr or [])] if rate is not None]
    if any(not 0 < rate < 1 for rate in rates):
        parser.error(f"--learning-rate/--tune-lr: got {rates}; learning rates lie in (0, 1), e.g. 1e-4")
    if args.learning_rate is not None:
        size = replace(size, learning_rate=args.learning_rate)
    if args.tune_lr:
        from align.experiments.pass_k_tune import tune_learning_rate

        tune_learning_rate(
            output_dir, size, args.model, instruction=DIRECT_ANSWER_INSTRUCTION, learning_rates=args.tune_lr
        )
        return 0
    pass_k.run_pass_k_proving_ground(
        output_dir, size, args.model, instruction=DIRECT_ANSWER_INSTRUCTION, seeds=seeds, arms=arms
    )
    return 0


def _prm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import prm

    if any(getattr(args, name) is not None for name in ("epochs", "pass_ns", "tune_lr", "learning_rate")):
        parser.error("--epochs, --pass-n, --tune-lr and --learning-rate are not options of `align repro prm`")
    objectives = args.objectives or list(prm.OBJECTIVES)
    if not set(objectives) <= set(prm.OBJECTIVES):
        parser.error(f"--objectives: got {objectives}; `align repro prm` trains {' and/or '.join(prm.OBJECTIVES)}")
    if args.seeds is not None and any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds: got {args.seeds}; training seeds are integers >= 0")
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds is not None else [0] if args.quick else [0, 1]
    size = prm.QUICK if args.quick else prm.PRMReproSize()
    overrides = _size_overrides(parser, args, ("num_train", "num_test", "levels", "n", "steps"))
    if "steps" in overrides:
        overrides["prm_steps"] = overrides.pop("steps")
    size = replace(size, objectives=list(dict.fromkeys(objectives)), **overrides)
    output_dir = Path(args.output_dir or ("runs/repro-prm-quick" if args.quick else "runs/repro-prm"))
    prm.run_prm_repro(output_dir, size, args.model, seeds=seeds)
    return 0


def _prime(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import prime

    unused = ("epochs", "pass_ns", "tune_lr", "learning_rate", "objectives")
    if any(getattr(args, name) is not None for name in unused):
        parser.error(
            "--epochs, --pass-n, --tune-lr, --learning-rate and --objectives are not options of `align repro prime`"
        )
    if args.seeds is not None and any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds: got {args.seeds}; training seeds are integers >= 0")
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds is not None else [0] if args.quick else [0, 1]
    size = prime.QUICK if args.quick else prime.PrimeReproSize()
    overrides = _size_overrides(parser, args, ("num_train", "num_test", "levels", "n", "steps"))
    if "levels" in overrides:
        overrides["levels"] = tuple(overrides["levels"])
    size = replace(size, **overrides)
    output_dir = Path(args.output_dir or ("runs/repro-prime-quick" if args.quick else "runs/repro-prime"))
    start = Path(args.start) if args.start else None
    prime.run_prime_repro(output_dir, size, args.model, seeds=seeds, start=start)
    return 0


def _margin(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from align.experiments import margin

    unused = ("epochs", "pass_ns", "n", "tune_lr", "learning_rate", "objectives", "steps")
    if any(getattr(args, name) is not None for name in unused):
        parser.error(
            "--epochs, --pass-n, --n, --tune-lr, --learning-rate, --objectives and --steps are not options of `align "
            "repro margin` (its steps are one epoch of --num-train pairs, 4 per step)"
        )
    if args.seeds is not None and any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds: got {args.seeds}; training seeds are integers >= 0")
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds is not None else [0] if args.quick else [0, 1]
    size = margin.QUICK if args.quick else margin.MarginReproSize()
    overrides = _size_overrides(parser, args, ("num_train", "num_test", "levels"))
    if "levels" in overrides:
        overrides["levels"] = tuple(dict.fromkeys(overrides["levels"]))
    output_dir = Path(args.output_dir or ("runs/repro-margin-quick" if args.quick else "runs/repro-margin"))
    margin.run_margin_repro(output_dir, replace(size, **overrides), args.model, seeds=seeds)
    return 0
