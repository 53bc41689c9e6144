"""Online pass@N training for chains of thought: `PassAtNGRPOTrainer`, on TRL's GRPO machinery.

Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting
Confidence Improves Mathematical Reasoning" (arXiv 2502.07154), §CoT, made on-policy. With a chain of thought the
probability p that the model reaches the correct answer is a sum over traces, so it is estimated by sampling: the
trainer samples K = `num_generations` completions per prompt, grades them with a verifier, and maximises
log pass@N = log(1 - (1 - p)^N) with the per-sample weights of `align.losses.pass_at_n.pass_at_n_group_weights`
(F(N, p̂)/c on each of the c correct samples of a group, for the `plain` estimator) in place of GRPO's
advantages. Everything else is TRL's `GRPOTrainer`: sampling (transformers or vLLM), reward functions, the loss,
logging, multi-process launches.

Why the update is the estimator: on-policy (`num_iterations=1`) GRPO's per-token term is A_i ∇log π(y_i,t) (the
importance ratio is 1 and the clipping inactive), and the `dr_grpo` loss divides by a constant
(max_completion_length × sequences), so the step is ∝ Σ_i A_i ∇log π(y_i), the sequence-level sum. Putting the
pass@N weights w_i in A_i turns it into Σ_i w_i ∇log π(y_i). Hence `loss_type="dr_grpo"` by default; `luspo` is a
sequence sum as well; the others divide each sample by a token count and only warn.

`GraderGRPOTrainer` is plain GRPO with the same default reward (align's verifier on the dataset's `answer`
column); it is the baseline that `align train grpo` runs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from align.grading import GradingArguments
from align.losses.pass_at_n import PASS_AT_N_ESTIMATORS, PassAtNGroupWeights, pass_at_n_group_weights
from align.rewards import ANSWER_COLUMN, VerifierReward
from align.trainers.dco import DCO_PAPER, check_pass_n, default_output_dir


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
    Configuration class for [`PassAtNGRPOTrainer`]: [`GraderGRPOConfig`] plus the pass@N objective.

    > Parameters that control the pass@N objective

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
        metadata={"help": "Ignored by pass@N (its weights replace GRPO's advantages); kept `none`."},
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
        super().__post_init__()
        self._warn_about_settings_that_change_the_estimator()

    def _warn_about_settings_that_change_the_estimator(self) -> None:
        def warn(message: str) -> None:
            warnings.warn(f"PassAtNConfig: {message}", UserWarning, stacklevel=4)

        if self.loss_type not in SEQUENCE_SUM_LOSS_TYPES:
            warn(
                f"loss_type={self.loss_type!r} divides each sample's term by a token count, so the update is no "
                f"longer Σ_i w_i ∇log π(y_i) but a length-reweighted version; use one of {SEQUENCE_SUM_LOSS_TYPES}."
            )
        if self.scale_rewards not in ("none", False):
            warn(f"scale_rewards={self.scale_rewards!r} is ignored: pass@N weights replace GRPO's advantages.")
        if self.multi_objective_aggregation != "sum_then_normalize":
            warn(
                "multi_objective_aggregation is ignored: the weights use the reward_weights-weighted sum of the "
                "rewards, which must be 0 or 1 per completion."
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


def _check_answer_column(dataset, name: str) -> None:
    if isinstance(dataset, dict):  # several eval sets (a dict or a DatasetDict)
        for key, value in dataset.items():
            _check_answer_column(value, f"{name} ({key})")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and ("prompt" not in columns or ANSWER_COLUMN not in columns):
        raise ValueError(
            f"The default verifier reward grades completions against the `{ANSWER_COLUMN}` column, but the {name} "
            f"dataset has columns {sorted(columns)}. Use rows with `prompt` and `{ANSWER_COLUMN}` (dataset kind "
            "`prompts`, e.g. align.data.training.prompt_rows), or pass your own reward_funcs."
        )


class GraderGRPOTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] whose default reward is align's verifier (math-verify in worker processes).

    Without `reward_funcs`, completions are graded against the dataset's `answer` column by a `VerifierReward`
    (1 correct, 0 otherwise); its pool of grading processes lives as long as the trainer and is stopped when
    `train()` returns (a later `evaluate()` starts a new one) and by `end()`. With `reward_funcs` it is TRL's
    GRPOTrainer unchanged.
    """

    _tag_names = ["trl", "grpo", "align"]

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None, **kwargs):
        if args is None:
            args = self._default_args(model)
        self.verifier_reward: VerifierReward | None = None
        if reward_funcs is None and kwargs.get("environment_factory") is None:
            _check_answer_column(train_dataset, "train")
            if kwargs.get("eval_dataset") is not None:
                _check_answer_column(kwargs["eval_dataset"], "eval")
            self.verifier_reward = VerifierReward(
                num_workers=getattr(args, "grader_workers", None), timeout_s=getattr(args, "grading_timeout", 5.0)
            )
            reward_funcs = self.verifier_reward
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

    @staticmethod
    def _default_args(model) -> GRPOConfig:
        return GraderGRPOConfig(default_output_dir(model, "GRPO"))

    def close_verifier(self) -> None:
        """Stop the verifier's grading processes (a later reward call starts new ones)."""
        if self.verifier_reward is not None:
            self.verifier_reward.close()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close_verifier()

    def end(self):
        self.close_verifier()
        return super().end()


class PassAtNGRPOTrainer(GraderGRPOTrainer):
    """GRPO with pass@N weights instead of group-normalized advantages: on-policy DCO for chains of thought.

    Each prompt's K = `num_generations` completions are graded (binary reward: align's verifier by default); a
    group with c correct samples (p̂ = c/K) gives each correct sample the weight F(N, p̂)/c (`plain`), so the
    update estimates ∇ log(1 - (1 - p)^N) = F(N, p)/p · ∇p. See [`PassAtNConfig`] and
    `align.losses.pass_at_n.pass_at_n_group_weights` for the estimators and their expectations.

    Logged (`pass_n/*`, over the groups of every process): `p_hat_mean`, `p_hat_std`, `frac_no_correct` (p̂ = 0:
    no gradient), `frac_all_correct` (p̂ = 1), `weight_mean` (over samples), `correct_weight_mean` (over correct
    samples), `coverage_weight_mean` (F(N, p̂) over solved groups), `pass_at_n` (plug-in 1 - (1 - p̂)^N) and
    `pass_at_n_unbiased` (1 - C(K-c, N)/C(K, N), when N is an integer <= K).

    Example:
    ```python
    >>> from align.trainers.pass_n import PassAtNConfig, PassAtNGRPOTrainer
    >>> args = PassAtNConfig(output_dir="runs/pass_n", pass_n=16, num_generations=16)
    >>> # dataset: rows with `prompt` and `answer` (align.data.training.prompt_rows)
    >>> trainer = PassAtNGRPOTrainer(model="Qwen/Qwen2.5-Math-1.5B", args=args, train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "pass_n", "align"]
    _name = "pass@N"
    _paper = DCO_PAPER
    # The loss is GRPO's, already divided by the accumulation steps (the weights only replace its advantages).
    loss_is_scaled_for_ga = True

    def __init__(self, model, reward_funcs=None, args: PassAtNConfig | None = None, **kwargs):
        if args is None:
            args = PassAtNConfig(default_output_dir(model, "pass_n"))
        elif not isinstance(args, PassAtNConfig):
            raise TypeError(
                f"PassAtNGRPOTrainer needs a PassAtNConfig (it adds pass_n, weight_estimator), got "
                f"{type(args).__name__}; build one with PassAtNConfig(**your_args.to_dict())."
            )
        self._gathered_rewards: torch.Tensor | None = None
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of every process's completions (gathered): exactly what whole groups need.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._gathered_rewards = self._gathered_rewards, None
        if rewards_per_func is None:
            raise RuntimeError("PassAtNGRPOTrainer: GRPOTrainer scored completions without `_calculate_rewards`.")
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # The reward_weights-weighted sum, NaN for a completion no reward function scored (as GRPO does).
        total = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        total[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
        result = pass_at_n_group_weights(total.view(-1, group_size), self.args.pass_n, self.args.weight_estimator)
        weights = result.weights.reshape(-1)
        advantages = output["advantages"]
        local = advantages.shape[0]
        start = self.accelerator.process_index * local  # the same process slice GRPOTrainer takes
        output["advantages"] = weights[start : start + local].to(dtype=advantages.dtype, device=advantages.device)
        self._replace_logged_advantages(weights)
        self._log_pass_n_metrics(result, mode)
        return output

    def _replace_logged_advantages(self, weights: torch.Tensor) -> None:
        """Show the pass@N weights, not GRPO's advantages, in the completions table."""
        logged = self._logs["advantages"]
        for _ in range(min(len(weights), len(logged))):
            logged.pop()
        logged.extend(weights.tolist())

    def _log_pass_n_metrics(self, result: PassAtNGroupWeights, mode: str) -> None:
        # The rewards are gathered, so every process holds the same groups and computes the same values.
        scored = result.num_scored > 0
        if not bool(scored.any()):
            return
        p_hat = result.p_hat[scored]
        solved = scored & (result.num_correct > 0)
        metrics = self._metrics[mode]
        metrics["pass_n/p_hat_mean"].append(p_hat.mean().item())
        metrics["pass_n/p_hat_std"].append(p_hat.std(correction=0).item())
        metrics["pass_n/frac_no_correct"].append((p_hat == 0).double().mean().item())
        metrics["pass_n/frac_all_correct"].append((p_hat == 1).double().mean().item())
        metrics["pass_n/weight_mean"].append((result.weights.sum() / result.num_scored.sum()).item())
        num_correct = result.num_correct.sum().item()
        if num_correct:
            # Both estimators give correct samples weights >= 0 and incorrect ones weights <= 0.
            correct_weights = result.weights.clamp(min=0).sum().item()
            metrics["pass_n/correct_weight_mean"].append(correct_weights / num_correct)
            metrics["pass_n/coverage_weight_mean"].append(result.coverage_weight[solved].mean().item())
        metrics["pass_n/pass_at_n"].append(result.pass_at_n_plugin[scored].mean().item())
        unbiased = result.pass_at_n_unbiased[scored]
        if not bool(torch.isnan(unbiased).any()):
            metrics["pass_n/pass_at_n_unbiased"].append(unbiased.mean().item())
