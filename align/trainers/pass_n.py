"""Online pass@N training for chains of thought: `PassAtNGRPOTrainer`, on TRL's GRPO machinery.

Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting
Confidence Improves Mathematical Reasoning" (arXiv 2502.07154), §CoT, made on-policy. With a chain of thought the
probability p that the model reaches the correct answer is a sum over traces, so it is estimated by sampling: the
trainer samples K = `num_generations` completions per prompt, grades them with a verifier, and maximises
log pass@N = log(1 - (1 - p)^N) with the per-sample weights of `align.losses.pass_at_n.pass_at_n_group_weights`
(F(N, p̂)/c on each of the c correct samples of a group, for the `plain` estimator) in place of GRPO's
advantages. `pass_k_objective` swaps in any other objective of `align.losses.pass_k.OBJECTIVES` (PKPO, Chen et
al.'s analytic pass@k, Tang et al.'s max@K leave-one-out, RS-GRPO, or TRL's own GRPO advantages as the baseline),
so that they all run on one footing: the same sampling, rewards, loss and logging. Everything else is TRL's
`GRPOTrainer`: sampling (transformers or vLLM), reward functions, the loss, logging, multi-process launches.

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

import torch
from trl import GRPOConfig, GRPOTrainer

from align.losses.pass_at_n import PassAtNGroupWeights, pass_at_n_group_weights, unbiased_pass_at_k
from align.losses.pass_k import pass_k_advantages
from align.rewards import ANSWER_COLUMN, VerifierReward
from align.trainers.dco import DCO_PAPER, default_output_dir
from align.trainers.pass_n_config import GraderGRPOConfig, PassAtNConfig


# The configs live in align.trainers.pass_n_config; align.training's registry and users import them from here.
__all__ = ["GraderGRPOConfig", "GraderGRPOTrainer", "PassAtNConfig", "PassAtNGRPOTrainer"]


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

    With another `pass_k_objective` the advantages are that objective's (`align.losses.pass_k`; `grpo` keeps TRL's)
    and the log has `pass_k/*`: `k` (this step's, for pkpo and passk_analytic), `weight_mean`, `weight_abs_mean`,
    `frac_zero_groups` (groups whose advantages are all 0: no gradient) and `pass_at_k_unbiased` (binary rewards).

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
                f"PassAtNGRPOTrainer needs a PassAtNConfig (it adds pass_k_objective, pass_n, ...), got "
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
        objective = self.args.pass_k_objective
        if objective == "grpo":  # the baseline: TRL's own advantages, untouched
            return output
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # The reward_weights-weighted sum, NaN for a completion no reward function scored (as GRPO does).
        total = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        total[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
        groups = total.view(-1, group_size)
        if objective == "dco":
            result = pass_at_n_group_weights(groups, self.args.pass_n, self.args.weight_estimator)
            self._log_pass_n_metrics(result, mode)
            weights = result.weights.reshape(-1)
        else:
            k = self.args.pass_k_at(self.state.global_step)
            args = self.args
            group_weights = pass_k_advantages(
                objective, groups, k=k, estimator=args.pkpo_estimator, beta=args.risk_seeking_beta
            )
            self._log_pass_k_metrics(groups, group_weights, k, mode)
            weights = group_weights.reshape(-1)
        advantages = output["advantages"]
        local = advantages.shape[0]
        start = self.accelerator.process_index * local  # the same process slice GRPOTrainer takes
        output["advantages"] = weights[start : start + local].to(dtype=advantages.dtype, device=advantages.device)
        self._replace_logged_advantages(weights)
        return output

    def _replace_logged_advantages(self, weights: torch.Tensor) -> None:
        """Show the pass@N weights, not GRPO's advantages, in the completions table."""
        logged = self._logs["advantages"]
        for _ in range(min(len(weights), len(logged))):
            logged.pop()
        logged.extend(weights.tolist())

    def _log_pass_k_metrics(self, rewards: torch.Tensor, weights: torch.Tensor, k: int | None, mode: str) -> None:
        """`pass_k/*` for the objectives other than dco (gathered rewards: the same on every process)."""
        scored = ~torch.isnan(rewards)
        num_scored = scored.sum(-1)
        has = num_scored > 0
        if not bool(has.any()):
            return
        metrics = self._metrics[mode]
        if k is not None:
            metrics["pass_k/k"].append(float(k))
        metrics["pass_k/weight_mean"].append((weights.sum() / num_scored.sum()).item())
        metrics["pass_k/weight_abs_mean"].append((weights.abs().sum() / num_scored.sum()).item())
        metrics["pass_k/frac_zero_groups"].append((weights[has].abs().sum(-1) == 0).double().mean().item())
        if k is not None and bool(((rewards == 0) | (rewards == 1) | ~scored).all()):
            correct = torch.where(scored, rewards, 0.0).sum(-1)
            unbiased = unbiased_pass_at_k(num_scored[has], correct[has], k)  # NaN for a group of fewer than k
            if not bool(torch.isnan(unbiased).any()):
                metrics["pass_k/pass_at_k_unbiased"].append(unbiased.mean().item())

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
