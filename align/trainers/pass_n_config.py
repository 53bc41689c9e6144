"""`PassAtNConfig`: the configuration of the online pass@k trainers (`align.trainers.pass_n`), and its k schedule.

`GraderGRPOConfig` is TRL's GRPOConfig plus the verifier's options (`align train grpo`); `PassAtNConfig` adds the
objective (`pass_k_objective`, one of `align.losses.pass_k.OBJECTIVES`, default `dco`) and its parameters, checked
here in one-line errors: DCO's N (`pass_n`, `weight_estimator`), k or a k schedule (`pass_k`, `pass_k_schedule`) for
`pkpo` and `passk_analytic`, PKPO's estimator and RS-GRPO's β.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from align.grading import GradingArguments
from align.losses.pass_at_n import PASS_AT_N_ESTIMATORS
from align.losses.pass_k import DEFAULT_RISK_SEEKING_BETA, OBJECTIVES, PASS_K_OBJECTIVES, PKPO_ESTIMATORS
from align.trainers.dco import check_pass_n


# Loss types whose on-policy update is a constant times Σ_i A_i ∇log π(y_i) (sequence sums, fixed normalizer).
SEQUENCE_SUM_LOSS_TYPES = ("dr_grpo", "luspo")


@dataclass
class GraderGRPOConfig(GradingArguments, GRPOConfig):
    r"""
    Configuration class for [`GraderGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus the options of align's verifier
    reward (used when the trainer is built without `reward_funcs`).

    > Parameters that control the verifier reward

        grader_workers (`int` or `None`, *optional*, defaults to `None`):
            Grading processes per training process (default: this process's CPUs divided by the processes on this
            machine).
        grading_timeout (`float`, *optional*, defaults to `5.0`):
            Seconds allowed to grade one completion; a completion that takes longer scores 0.
    """

    # grader_workers / grading_timeout and their checks come from `align.grading.GradingArguments` (listed before
    # GRPOConfig so that output_dir stays the first positional field).


@dataclass
class PassAtNConfig(GraderGRPOConfig):
    r"""
    Configuration class for [`PassAtNGRPOTrainer`]: [`GraderGRPOConfig`] plus the pass@N / pass@k objective.

    > Parameters that choose the objective

        pass_k_objective (`str`, *optional*, defaults to `"dco"`):
            How a group's rewards become per-sample advantages (`align.losses.pass_k.OBJECTIVES`): `dco` (DCO's
            F(N, p̂)/c weights, below), `pkpo` (Walder & Karkhanis, unbiased ∇pass@k), `passk_analytic` (Chen et
            al.'s closed form), `max_k_loo` (Tang et al.'s leave-one-out max@K, k = K), `risk_seeking` (RS-GRPO) or
            `grpo` (TRL's own advantages, the baseline in the same trainer).
        pass_k (`int` or `None`, *optional*, defaults to `None`):
            k for `pkpo` and `passk_analytic`, 1 <= k <= `num_generations` (k < K for `passk_analytic` and PKPO's
            `loo`). `None`: K // 2 (the paper's k = 8 for n = 16). Ignored by the other objectives.
        pass_k_schedule (`str` or `None`, *optional*, defaults to `None`):
            k annealed over optimizer steps instead of a fixed `pass_k`, e.g. `"8:1500,1"`: k = 8 before step 1500,
            then k = 1 (PKPO §5.2.3). Comma-separated `k:until_step` entries, steps increasing, the last a plain k.
        pkpo_estimator (`str`, *optional*, defaults to `"loo-1"`):
            PKPO's estimator: `loo-1` (the paper's LLM runs; at k = 1 the leave-one-out centring of its Eq. 26),
            `loo` (Eq. 29) or `plain` (Eqs. 19-21).
        risk_seeking_beta (`float`, *optional*, defaults to `2.0`):
            β of `risk_seeking`, the objective (1/β) log E[e^{βr}]; > 0.

    > Parameters of the `dco` objective

        pass_n (`float`, *optional*, defaults to `16`):
            N, the test-time sample budget trained for: the objective is log(1 - (1 - p)^N) with p the probability
            of a correct answer. `1` maximises log p (each correct sample of a group gets 1/c). Prefer
            `num_generations` >= N: p̂ = c/K only resolves steps of 1/K.
        weight_estimator (`str`, *optional*, defaults to `"plain"`):
            `"plain"`: F(N, p̂)/c on each correct sample, 0 on incorrect ones. `"loo"`: the same with a
            leave-one-out baseline inside, so incorrect samples get -F(N, p̂)/(K - 1) and each group's weights sum
            to 0. Both have the direction of the true gradient in expectation; see
            `align.losses.pass_at_n.pass_at_n_group_weights`.

    Defaults that differ from [`~trl.GRPOConfig`]: `loss_type="dr_grpo"` (the update is then the estimator: a
    constant times Σ_i w_i ∇log π(y_i)); `scale_rewards="none"` (the weights replace GRPO's advantages, so reward
    scaling has nothing to act on); `beta=0.0` as in GRPO (no reference model: the objective is pass@N itself).
    """

    pass_k_objective: str = field(
        default="dco",
        metadata={
            "help": "How a group's rewards become advantages: dco (F(N, p̂)/c), pkpo (Walder & Karkhanis, unbiased "
            "∇pass@k), passk_analytic (Chen et al.), max_k_loo (Tang et al., k = K), risk_seeking (RS-GRPO), grpo "
            "(TRL's advantages).",
            "choices": list(PASS_K_OBJECTIVES),
        },
    )
    pass_k: int | None = field(
        default=None,
        metadata={"help": "k for pkpo and passk_analytic, <= num_generations. Default: num_generations // 2."},
    )
    pass_k_schedule: str | None = field(
        default=None,
        metadata={
            "help": "k annealed over steps instead of pass_k, e.g. '8:1500,1' (k = 8 before step 1500, then 1)."
        },
    )
    pkpo_estimator: str = field(
        default="loo-1",
        metadata={
            "help": "PKPO estimator: loo-1 (the paper's LLM runs; Eq. 26 LOO centring at k = 1), loo, plain.",
            "choices": list(PKPO_ESTIMATORS),
        },
    )
    risk_seeking_beta: float = field(
        default=DEFAULT_RISK_SEEKING_BETA,
        metadata={"help": "β of risk_seeking, objective (1/β) log E[exp(β r)]; > 0 (2 is RS-GRPO's)."},
    )
    pass_n: float = field(
        default=16.0,
        metadata={
            "help": "N, the test-time sample budget trained for: objective log(1 - (1 - p)^N), p = P(correct). "
            "1 = log p. Prefer num_generations >= N (p̂ = c/K resolves steps of 1/K)."
        },
    )
    weight_estimator: str = field(
        default="plain",
        metadata={
            "help": "`plain`: F(N, p̂)/c on each correct sample, 0 on incorrect ones. `loo`: leave-one-out "
            "baseline inside, incorrect samples get -F(N, p̂)/(K-1) and a group's weights sum to 0.",
            "choices": list(PASS_AT_N_ESTIMATORS),
        },
    )
    loss_type: str = field(
        default="dr_grpo",
        metadata={
            "help": "GRPO loss aggregation. `dr_grpo` (default) and `luspo` sum each sequence's tokens with a "
            "constant normalizer, so the update is the pass@N estimator Σ_i w_i ∇log π(y_i); the others (dapo, "
            "grpo, bnpo, cispo, sapo, vespo) divide by token counts, which reweights samples by length (warning)."
        },
    )
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "GRPO's reward scaling: used by pass_k_objective=grpo only (the other objectives replace GRPO's "
            "advantages); `none` (Dr. GRPO) by default."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient towards the reference model. 0 (default): the objective is pass@N alone and no "
            "reference model is loaded; > 0 adds GRPO's KL penalty to it."
        },
    )

    def __post_init__(self):
        self.pass_n = check_pass_n(self.pass_n, one_means="log p")
        if self.weight_estimator not in PASS_AT_N_ESTIMATORS:
            raise ValueError(f"weight_estimator must be one of {PASS_AT_N_ESTIMATORS}, got {self.weight_estimator!r}.")
        self._check_objective()
        super().__post_init__()
        self._check_k_against_group_sizes()
        self._warn_about_settings_that_change_the_estimator()

    def _check_objective(self) -> None:
        if self.pass_k_objective not in PASS_K_OBJECTIVES:
            raise ValueError(f"pass_k_objective must be one of {PASS_K_OBJECTIVES}, got {self.pass_k_objective!r}.")
        if self.pkpo_estimator not in PKPO_ESTIMATORS:
            raise ValueError(f"pkpo_estimator must be one of {PKPO_ESTIMATORS}, got {self.pkpo_estimator!r}.")
        beta = self.risk_seeking_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"risk_seeking_beta must be a finite number > 0 (2 is RS-GRPO's), got {beta!r}.")
        k = self.pass_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"pass_k must be an integer >= 1 (k of pass@k), got {k!r}.")
        if self.pass_k is not None and self.pass_k_schedule is not None:
            raise ValueError("set pass_k or pass_k_schedule, not both (the schedule gives k at every step).")
        self._schedule = parse_pass_k_schedule(self.pass_k_schedule) if self.pass_k_schedule is not None else None

    def _check_k_against_group_sizes(self) -> None:
        if not OBJECTIVE_TAKES_K.get(self.pass_k_objective, False):
            return
        largest_below_k = self.pass_k_objective == "passk_analytic" or self.pkpo_estimator == "loo"
        ks = [k for k, _ in self._schedule] if self._schedule is not None else [self.pass_k_at(0)]
        for group, name in (
            (self.num_generations, "num_generations"),
            (self.num_generations_eval, "num_generations_eval"),
        ):
            if group is None:
                continue
            largest = group - 1 if largest_below_k else group
            for k in ks:
                if k > largest:
                    why = (
                        "k = K leaves one k-subset: every advantage 0"
                        if self.pass_k_objective == "passk_analytic"
                        else "PKPO's loo needs k <= K - 1"
                    )
                    bound = f"< {name}={group} ({why})" if largest_below_k else f"<= {name}={group}"
                    raise ValueError(
                        f"pass_k={k} for {self.pass_k_objective} must be {bound}: k of the K samples per prompt; "
                        "lower pass_k (or the schedule's k) or raise num_generations."
                    )

    def pass_k_at(self, step: int) -> int | None:
        """k at optimizer step `step` for the objectives that take one (`pass_k`, the schedule, else K // 2)."""
        if not OBJECTIVE_TAKES_K.get(self.pass_k_objective, False):
            return None
        if self._schedule is not None:
            return next(k for k, until in self._schedule if until is None or step < until)
        return self.pass_k if self.pass_k is not None else max(self.num_generations // 2, 1)

    def _warn_about_settings_that_change_the_estimator(self) -> None:
        def warn(message: str) -> None:
            warnings.warn(f"PassAtNConfig: {message}", UserWarning, stacklevel=4)

        if self.loss_type not in SEQUENCE_SUM_LOSS_TYPES:
            warn(
                f"loss_type={self.loss_type!r} divides each sample's term by a token count, so the update is no "
                f"longer Σ_i w_i ∇log π(y_i) but a length-reweighted version; use one of {SEQUENCE_SUM_LOSS_TYPES}."
            )
        if self.pass_k_objective == "grpo":  # TRL's own advantages: scale_rewards and the aggregation apply
            return
        if self.scale_rewards not in ("none", False):
            warn(f"scale_rewards={self.scale_rewards!r} is ignored: pass@N weights replace GRPO's advantages.")
        if self.multi_objective_aggregation != "sum_then_normalize":
            binary = ", which must be 0 or 1 per completion" if OBJECTIVES[self.pass_k_objective].binary_only else ""
            warn(
                "multi_objective_aggregation is ignored: the weights use the reward_weights-weighted sum of the "
                f"rewards{binary}."
            )
        if self.num_iterations > 1:
            warn(
                f"num_iterations={self.num_iterations} reuses each batch of samples for several updates; after the "
                "first the samples are off-policy and the update is GRPO's clipped importance-weighted version of "
                "the estimator. Use num_iterations=1 for the exact on-policy estimator."
            )
        if self.steps_per_generation > self.gradient_accumulation_steps:
            warn(
                f"steps_per_generation={self.steps_per_generation} > gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}: later optimizer steps train on samples from an older policy."
            )
        if self.top_entropy_quantile < 1.0:
            warn(
                f"top_entropy_quantile={self.top_entropy_quantile} drops low-entropy tokens from the loss, so a "
                "sample's gradient is no longer ∇log π(y_i)."
            )
        if self.mask_truncated_completions:
            warn(
                "mask_truncated_completions removes truncated samples from the loss after their weights are "
                "computed, which biases the estimate for groups that contain them."
            )


# The objectives whose advantages depend on k (the others ignore pass_k and pass_k_schedule).
OBJECTIVE_TAKES_K = {name: name != "dco" and "k" in entry.parameters for name, entry in OBJECTIVES.items()}
_SCHEDULE_ENTRY = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


def parse_pass_k_schedule(text: str) -> tuple[tuple[int, int | None], ...]:
    """'8:1500,1' -> ((8, 1500), (1, None)): k = 8 for optimizer steps < 1500, then k = 1 (PKPO's k annealing)."""
    message = (
        f"pass_k_schedule must look like '8:1500,1' (k = 8 before step 1500, then k = 1): comma-separated "
        f"k:until_step entries with k >= 1 and increasing steps, the last a plain k; got {text!r}."
    )
    entries = []
    for part in str(text).split(","):
        match = _SCHEDULE_ENTRY.match(part)
        if match is None:
            raise ValueError(message)
        entries.append((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
    steps = [until for _, until in entries[:-1]]
    if (
        entries[-1][1] is not None
        or None in steps
        or any(k < 1 for k, _ in entries)
        or any(b <= a for a, b in zip([0, *steps], steps))
    ):
        raise ValueError(message)
    return tuple(entries)
