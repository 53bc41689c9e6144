"""Online pass@N for chains of thought: per-sample weights for groups of K completions graded by a verifier.

Chen, Raventós, Cheng, Ganguli, Druckmann 2025 (arXiv 2502.07154), DCO for chains of thought, made on-policy: with
p = P(a sample is correct | x), the objective log pass@N = log(1 - (1 - p)^N) is estimated from K samples per prompt
with c correct (p̂ = c / K). `pass_at_n_group_weights` turns the graded rewards of each group into weights w_i on
∇log π(y_i) (the `plain` and leave-one-out `loo` estimators) and reports p̂, F(N, p̂) and pass@N per group;
`unbiased_pass_at_k` is the Codex estimator of pass@k from n samples. F and C_N come from `align.losses.coverage`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.losses.coverage import coverage, coverage_weight


PASS_AT_N_ESTIMATORS = ("plain", "loo")


@dataclass(frozen=True)
class PassAtNGroupWeights:
    """Per-sample pass@N weights of G groups of K graded samples, and the per-group quantities behind them.

    Attributes:
        weights: (G, K) the factor w_i on each sample's ∇log π(y_i); 0 for unscored samples.
        p_hat: (G,) p̂ = c / K_scored, the fraction of scored samples that are correct; NaN if none is scored.
        num_correct: (G,) c, the number of correct samples.
        num_scored: (G,) K_scored, the number of samples with a reward (not NaN).
        coverage_weight: (G,) F(N, p̂); NaN where p̂ is.
        pass_at_n_plugin: (G,) 1 - (1 - p̂)^N, the plug-in pass@N; NaN where p̂ is.
        pass_at_n_unbiased: (G,) 1 - C(K_scored - c, N) / C(K_scored, N) (Chen et al. 2021); NaN unless N is an
            integer <= K_scored.
    """

    weights: torch.Tensor
    p_hat: torch.Tensor
    num_correct: torch.Tensor
    num_scored: torch.Tensor
    coverage_weight: torch.Tensor
    pass_at_n_plugin: torch.Tensor
    pass_at_n_unbiased: torch.Tensor


def unbiased_pass_at_k(num_samples: torch.Tensor, num_correct: torch.Tensor, k) -> torch.Tensor:
    """1 - C(n - c, k) / C(n, k) elementwise (Chen et al. 2021, the Codex paper), in fp64 through log-gamma.

    The probability that k of the n samples drawn without replacement include a correct one. 1 where n - c < k;
    NaN where k is not an integer in [1, n].

    `align.evaluation.estimators.pass_at_k` is the same estimator for reports (which losses/ may not import): a
    float function, a product of c factors, exact to 1e-10 for any n. This one is vectorized over groups on the
    training device and NaN for a fractional N; its log-gamma differences lose relative precision as n grows
    (1e-7 at n = 10^4), which K samples per prompt never reach.
    """
    n = num_samples.to(torch.float64)
    c = num_correct.to(torch.float64)
    k = float(k)
    if not (math.isfinite(k) and k >= 1 and k == int(k)):
        return torch.full_like(n, math.nan)
    wrong = n - c
    # log C(n - c, k) - log C(n, k); only evaluated where n - c >= k (the lgamma arguments are then >= 1).
    safe_wrong = torch.where(wrong >= k, wrong, torch.full_like(wrong, k))
    safe_n = torch.where(n >= k, n, torch.full_like(n, k))
    log_ratio = (
        torch.lgamma(safe_wrong + 1)
        - torch.lgamma(safe_wrong - k + 1)
        - torch.lgamma(safe_n + 1)
        + torch.lgamma(safe_n - k + 1)
    )
    value = torch.where(wrong >= k, -torch.expm1(log_ratio), torch.ones_like(n))
    return torch.where(n >= k, value, torch.full_like(n, math.nan))


def check_binary_rewards(rewards: torch.Tensor, what: str = "pass@N weights") -> None:
    """Raise a one-line ValueError naming the first reward that is not 1, 0 or NaN (unscored)."""
    scored = ~torch.isnan(rewards)
    bad = scored & (rewards != 0) & (rewards != 1)
    if bool(bad.any()):
        group, sample = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} need a binary verifier reward per completion (1 correct, 0 incorrect, NaN unscored); "
            f"group {group}, sample {sample} has reward {rewards[group, sample].item()!r}. Use a single correctness "
            "reward (the default verifier), or reward_weights that keep the total in {0, 1}."
        )


@torch.no_grad()
def pass_at_n_group_weights(rewards: torch.Tensor, n, estimator: str = "plain") -> PassAtNGroupWeights:
    """Weights w_i that turn Σ_i w_i ∇log π(y_i) into an estimate of ∇ log pass@N from K samples per prompt.

    Objective (DCO for chains of thought, Chen et al. 2025, arXiv 2502.07154, made on-policy): with p = P(a sample
    of the policy is correct | x), maximise J = log(1 - (1 - p)^N), whose gradient is

        ∇J = F(N, p) / p · ∇p,    ∇p = E_y[r(y) ∇log π(y)]    (REINFORCE),

    F as in `coverage_weight`. From K samples with c correct (p̂ = c / K) the estimators are

    - `plain`: w_i = F(N, p̂) · r_i / c. Each correct sample gets F(N, p̂) / c, incorrect ones 0, and a group with
      no correct sample contributes nothing. N = 1 gives 1/c: the normalized rejection-sampling gradient of log p.
      Given c >= 1 the correct samples are i.i.d. from π(· | correct), so E[(1/c) Σ_correct ∇log π] = ∇p / p
      exactly and E[update] = E_c[F(N, c/K) 1{c >= 1}] · ∇p / p: the exact direction of ∇J for every prompt, with
      a scale that depends on p (for N = 1, P(c >= 1) = 1 - (1 - p)^K: unbiased given a solved group).
    - `loo`: the REINFORCE leave-one-out baseline b_i = (c - r_i) / (K - 1) (Kool et al. 2019; Ahmadian et al.
      2024, RLOO) inside the same estimate, w_i = F(N, p̂) / c · (r_i - b_i): correct samples get
      F (K - c) / (c (K - 1)), incorrect ones -F / (K - 1), and every group's weights sum to 0. Its expectation is
      E_c[F(N, c/K) (K - c) / (K - 1) · 1{c >= 1}] / (1 - p) · ∇p / p: again the exact direction, with another
      p-dependent scale. Wrong answers are pushed down, which cancels the part of Σ ∇log π(y_i) that is noise
      (lower variance when samples share gradient directions), but an all-correct group contributes nothing even
      at N = 1, and it needs K >= 2 scored samples per group (smaller groups get weight 0).

    Args:
        rewards: (G, K) 1 for a correct sample, 0 for an incorrect one, NaN for a sample that could not be scored
            (it is left out of its group: weight 0, K_scored counts the others).
        n: the pass@N budget N >= 1 (may be fractional).
        estimator: `plain` or `loo`.
    """
    if estimator not in PASS_AT_N_ESTIMATORS:
        raise ValueError(f"estimator must be one of {PASS_AT_N_ESTIMATORS}, got {estimator!r}.")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, samples per group), got shape {tuple(rewards.shape)}.")
    rewards = rewards.to(torch.float64)
    check_binary_rewards(rewards)
    scored = ~torch.isnan(rewards)
    correct = torch.where(scored, rewards, 0.0)
    num_scored = scored.sum(-1).to(torch.float64)
    num_correct = correct.sum(-1)
    p_hat = num_correct / num_scored  # NaN for a group with nothing scored (0 / 0)
    has_p = num_scored > 0
    safe_p = torch.where(has_p, p_hat, 0.0)
    weight = coverage_weight(torch.log(safe_p), n)  # p̂ = 0 -> F = 1, never used: c = 0
    per_correct = torch.where(num_correct > 0, weight / num_correct.clamp(min=1), 0.0)[:, None]
    if estimator == "plain":
        weights = per_correct * correct
    else:
        # r_i - b_i = r_i - (c - r_i) / (K - 1); groups with K_scored < 2 have no leave-one-out baseline.
        others = (num_scored - 1)[:, None]
        advantage = torch.where(others > 0, correct - (num_correct[:, None] - correct) / others.clamp(min=1), 0.0)
        weights = per_correct * advantage
    weights = torch.where(scored, weights, 0.0)
    nan = torch.full_like(p_hat, math.nan)
    plugin = torch.where(has_p, coverage(torch.log(safe_p), n), nan)
    return PassAtNGroupWeights(
        weights=weights,
        p_hat=p_hat,
        num_correct=num_correct,
        num_scored=num_scored,
        coverage_weight=torch.where(has_p, weight, nan),
        pass_at_n_plugin=plugin,
        pass_at_n_unbiased=unbiased_pass_at_k(num_scored, num_correct, n),
    )
