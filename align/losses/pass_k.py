"""pass@k objectives on one footing: each maps a group's rewards to per-sample advantages, all in one table.

A group is the K completions of one prompt with rewards g_i (1/0 from a verifier, or continuous where the paper
allows; NaN = unscored: left out of its group, advantage 0). Every objective returns advantages w_i such that the
update is Σ_i w_i ∇log π(y_i) (what GRPO's on-policy `dr_grpo` loss computes from its advantages). Notation: n is
the number of scored samples of a group, g_(1) <= ... <= g_(n) its rewards sorted, c = Σ g_i for binary rewards,
ρ(n, c, k) = 1 - C(n-c, k)/C(n, k). The pass@k target of a sample, summed over the k-subsets S of the group, is

    T_i = C(n, k)^-1 Σ_{|S| = k, S ∋ i} max_{j ∈ S} g_j,   E[Σ_i T_i ∇log π(y_i)] = ∇ E[max of k samples],

so Σ_i T_i ∇log π(y_i) is an unbiased estimate of ∇pass@k (binary) or ∇maxg@k (continuous).

`OBJECTIVES` is the table (name -> `PassKObjective`); `pass_k_advantages(name, rewards, ...)` calls one. Binomial
ratios are exact integer quotients rounded once to float64 (`_coefficients`), so the weights are float64-exact to
~1e-16 relative for any n; every objective costs O(n log n) per group (a sort and cumulative sums).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from align.losses.pass_at_n import PASS_AT_N_ESTIMATORS, check_binary_rewards, pass_at_n_group_weights


PKPO_ESTIMATORS = ("loo-1", "loo", "plain")
DEFAULT_RISK_SEEKING_BETA = 2.0


def _comb(a: int, b: int) -> int:
    return math.comb(a, b) if 0 <= b <= a else 0


@functools.lru_cache(maxsize=1024)
def _coefficients(length: int, offset: int, lower: int, total: int, choose: int) -> torch.Tensor:
    """(C(j - offset, lower) / C(total, choose) for j = 1..length) in float64: Python's int / int rounds the exact
    quotient once, so no factorial overflows or cancels (C(1000, 500) has 300 digits)."""
    denominator = math.comb(total, choose)
    return torch.tensor([_comb(j - offset, lower) / denominator for j in range(1, length + 1)], dtype=torch.float64)


def _prefix_exclusive(x: torch.Tensor) -> torch.Tensor:
    """out[r] = Σ_{j < r} x[j] along the last dimension."""
    return torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1].cumsum(-1)], -1)


def _suffix_exclusive(x: torch.Tensor) -> torch.Tensor:
    """out[r] = Σ_{j > r} x[j] along the last dimension."""
    return torch.cat([x[..., 1:].flip(-1).cumsum(-1).flip(-1), torch.zeros_like(x[..., :1])], -1)


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, samples per group), got shape {tuple(rewards.shape)}.")
    return rewards.to(torch.float64)


def _check_k(k, group_size: int, objective: str, largest: int | None = None) -> int:
    largest = group_size if largest is None else largest
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= largest:
        raise ValueError(
            f"{objective}: k must be an integer in [1, {largest}] for groups of {group_size} samples, got {k!r}."
        )
    return int(k)


def _per_group_size(rewards: torch.Tensor, sorted_fn: Callable[[torch.Tensor], torch.Tensor], smallest: int):
    """Apply `sorted_fn` to the scored rewards of each group, sorted ascending, and put its outputs back in place.

    Groups are batched by their number n of scored samples (NaNs sort last, so a group's first n sorted entries are
    its scored rewards); `sorted_fn` maps (groups, n) sorted rewards to their advantages in the same order. Groups
    with n < `smallest` and unscored samples get 0.
    """
    scored = (~torch.isnan(rewards)).sum(-1)
    values, order = torch.sort(rewards, dim=-1, stable=True)
    out = torch.zeros_like(values)
    for n in scored.unique().tolist():
        if n < max(smallest, 1):
            continue
        rows = (scored == n).nonzero().squeeze(-1)
        out[rows, :n] = sorted_fn(values[rows, :n])
    return torch.zeros_like(rewards).scatter(-1, order, out)


# --- the objectives --------------------------------------------------------------------------------------------------


@torch.no_grad()
def dco_advantages(rewards: torch.Tensor, k, estimator: str = "plain") -> torch.Tensor:
    """DCO's on-policy pass@N weights (Chen, Raventós, Cheng, Ganguli, Druckmann 2025, arXiv 2502.07154), unchanged:
    w_i = F(N, p̂) r_i / c (`plain`) or F(N, p̂)/c · (r_i - (c - r_i)/(n - 1)) (`loo`), N = k (may be fractional or
    exceed n), p̂ = c/n, binary rewards. A plug-in estimate of ∇log pass@N: exact direction, p-dependent scale (see
    `align.losses.pass_at_n.pass_at_n_group_weights`)."""
    return pass_at_n_group_weights(rewards, k, estimator).weights


def _pkpo_plain(g: torch.Tensor, k: int) -> torch.Tensor:
    n = g.shape[-1]
    own = _coefficients(n, 1, k - 1, n, k).to(g.device)  # C(r-1, k-1)/C(n, k)
    later = _coefficients(n, 2, k - 2, n, k).to(g.device)  # C(j-2, k-2)/C(n, k)
    return own * g + _suffix_exclusive(later * g)


def _pkpo_loo(g: torch.Tensor, k: int) -> torch.Tensor:
    n = g.shape[-1]
    before = _coefficients(n, 1, k - 1, n - 1, k).to(g.device)  # C(j-1, k-1)/C(n-1, k)
    after = _coefficients(n, 2, k - 1, n - 1, k).to(g.device)  # C(j-2, k-1)/C(n-1, k)
    value_without_i = _prefix_exclusive(before * g) + _suffix_exclusive(after * g)  # ρ^g_{-i}(n-1, k)
    return _pkpo_plain(g, k) - k / (n - 1) * value_without_i


def _pkpo_loo_minus_one(g: torch.Tensor, k: int) -> torch.Tensor:
    n = g.shape[-1]
    if k == 1:  # Eq. 26: the leave-one-out mean as baseline, in the same normalisation (RLOO / n)
        return (n * g - g.sum(-1, keepdim=True)) / (n * (n - 1))
    # Σ_{j<r} C(j-1, k-2)(g_(r) - g_(j)) = Σ_{t<r} C(t, k-1)(g_(t+1) - g_(t)) (hockey stick): a cumulative sum of
    # non-negative terms, so the weights are >= 0 exactly, with no cancellation.
    coefficient = _coefficients(n - 1, 0, k - 1, n, k).to(g.device)  # C(t, k-1)/C(n, k), t = 1..n-1
    gaps = g[..., 1:] - g[..., :-1]
    return torch.cat([torch.zeros_like(g[..., :1]), (coefficient * gaps).cumsum(-1)], -1)


@torch.no_grad()
def pkpo_advantages(rewards: torch.Tensor, k, estimator: str = "loo-1") -> torch.Tensor:
    """PKPO (Walder & Karkhanis 2025, "Pass@K Policy Optimization", arXiv 2505.15201 v3+): unbiased estimators of
    ∇pass@k (binary) / ∇maxg@k (continuous rewards) for any k <= n, as a joint transform of the group's rewards.

    - `plain` (Eqs. 19-21, = T_i by Eq. 27): s_(r) = C(n,k)^-1 [C(r-1,k-1) g_(r) + Σ_{j>r} C(j-2,k-2) g_(j)].
      Binary: k/n on correct samples, (k/n)·ρ(n-1, c, k-1) on incorrect ones (Eq. 8).
    - `loo` (Eq. 29): s_i - k/(n-1)·ρ^g_{-i}(n-1, k), the leave-one-out value estimate as baseline; k <= n-1.
    - `loo-1` (Eqs. 33-34, default: "PKPO" in all the paper's LLM runs, §5.2, and the lowest-variance one, Fig. 4):
      C(n,k)^-1 Σ_{S ∋ i} (max_S g - max_{S∖i} g) = C(n,k)^-1 Σ_{j<r} C(j-1,k-2)(g_(r) - g_(j)). Never negative,
      invariant to g + a, zero for all-equal groups; binary: C(n-c, k-1)/C(n, k) on correct samples, 0 on
      incorrect. Undefined at k = 1 (Listing 1 divides by k - 1): there the paper switches to the LOO centring of
      Eq. 26, g_i - mean_{j≠i} g_j, "without which the training diverges". We use (g_i - mean_{j≠i} g_j)/n,
      RLOO/n: the unbiased ∇pass@1 estimate in the same normalisation as every other k (the paper does not state
      the scale at the switch; this choice keeps Σ_i w_i ∇log π(y_i) an estimate of ∇pass@k for every k).

    All three are unbiased for ∇pass@k (Thms 2, 4). Their scale is O(k/n), the paper's, not GRPO's O(1).
    A group with fewer scored samples than the estimator needs (k; k + 1 for `loo`; 2 for `loo-1`) gets 0.
    """
    rewards = _check_rewards(rewards)
    if estimator not in PKPO_ESTIMATORS:
        raise ValueError(f"pkpo estimator must be one of {PKPO_ESTIMATORS}, got {estimator!r}.")
    group_size = rewards.shape[-1]
    largest = group_size - 1 if estimator == "loo" else group_size
    k = _check_k(k, group_size, f"pkpo ({estimator})", largest)
    if estimator == "plain":
        return _per_group_size(rewards, lambda g: _pkpo_plain(g, k), k)
    if estimator == "loo":
        return _per_group_size(rewards, lambda g: _pkpo_loo(g, k), k + 1)
    return _per_group_size(rewards, lambda g: _pkpo_loo_minus_one(g, k), max(k, 2))


@functools.lru_cache(maxsize=256)
def _analytic_table(n: int, k: int) -> torch.Tensor:
    """(n + 1, 2): (A_pos, A_neg) for c = 0..n, from exact fractions; 0 where σ = 0."""
    rows = []
    for c in range(n + 1):
        q = Fraction(_comb(n - c, k), math.comb(n, k))  # 1 - R̄
        variance = q * (1 - q)
        if variance == 0:
            rows.append((0.0, 0.0))
            continue
        sigma = math.sqrt(variance)
        negative = q - Fraction(_comb(n - c - 1, k - 1), math.comb(n - 1, k - 1))
        rows.append((math.sqrt(q / (1 - q)), float(negative) / sigma))
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def passk_analytic_advantages(rewards: torch.Tensor, k) -> torch.Tensor:
    """Pass@k Training, analytic form (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of Large Reasoning Models", arXiv 2508.10751; RUCAIBox/Passk_Training `passk_adv.py`), binary.

    With R̄ = 1 - C(n-c, k)/C(n, k) and σ = √(R̄(1 - R̄)):
        A_pos = (1 - R̄)/σ,   A_neg = (1 - R̄ - C(n-c-1, k-1)/C(n-1, k-1))/σ,
    which is the mean over the k-subsets S ∋ i of (max_S r - R̄)/σ, σ² being the variance of max_S r over all
    subsets. Equivalently σA_i = (n/k)·s_i - R̄ with s PKPO's plain weights: self-inclusive centring shrinks the
    gradient by (1 - k/n), and dividing by the group's σ makes the estimator biased (the paper's choice). σ = 0
    (c = 0, or c > n - k so R̄ = 1) gives 0 exactly, where the authors' code divides by σ + 1e-6; k = n gives 0
    everywhere (one subset). At k = 1 it is GRPO's (r - p̂)/std with the population std (ddof 0).
    """
    rewards = _check_rewards(rewards)
    check_binary_rewards(rewards, "passk_analytic advantages")
    group_size = rewards.shape[-1]
    k = _check_k(k, group_size, "passk_analytic")

    def analytic(r: torch.Tensor) -> torch.Tensor:
        table = _analytic_table(r.shape[-1], k).to(r.device)
        c = r.sum(-1).long()
        positive, negative = table[c, 0][:, None], table[c, 1][:, None]
        return torch.where(r > 0, positive, negative)

    return _per_group_size(rewards, analytic, k)


@torch.no_grad()
def max_k_loo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """The leave-one-out max@k estimator with k = n (Tang, Zheng, Synnaeve, Munos 2025, "Optimizing Language Models
    for Inference Time Objectives using Reinforcement Learning", arXiv 2503.19595; verl's `grpo_passk`).

    A_i = max_j g_j - max_{j≠i} g_j: the best sample gets its gap over the second best, g_(n) - g_(n-1), every other
    sample 0 (ties at the top: all 0). Binary: 1 on the single correct sample when c = 1, else 0. Unbiased for
    ∇maxg@n; it equals PKPO's `loo-1` at k = n. Std normalisation: none. verl divides by the group's std (ddof 1),
    which for binary rewards is a constant √n-ish rescale but for continuous rewards a reward-dependent one that
    biases the estimator; without it the objective stays on the same footing as `pkpo`. A group with fewer than 2
    scored samples gets 0 (verl raises).
    """
    rewards = _check_rewards(rewards)

    def top_gap(g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(g)
        out[:, -1] = g[:, -1] - g[:, -2]
        return out

    return _per_group_size(rewards, top_gap, 2)


@torch.no_grad()
def risk_seeking_advantages(rewards: torch.Tensor, beta: float = DEFAULT_RISK_SEEKING_BETA) -> torch.Tensor:
    """RS-GRPO's risk-seeking advantage (arXiv 2509.24261; Jackory/RS-GRPO `risk_sensitive_adv.py`): the objective
    J = (1/β) log E[e^{βr}] (the mean as β -> 0, the max as β -> ∞; β = 2 recommended), estimated per group as

        Â_i = (1/β) (e^{βg_i} / (n^-1 Σ_j e^{βg_j}) - 1)    (computed as expm1(βg_i - logmeanexp(βg)) / β).

    Continuous rewards allowed. Σ_i Â_i = 0; all-equal groups give 0. Binary: Â_i = (r_i - p̂)·J'(p̂),
    J'(p) = (e^β - 1)/(β(1 + p(e^β - 1))): the Dr.GRPO advantage with a per-prompt weight that falls as p̂ rises.
    A self-normalised ratio, so biased (no unbiased estimator exists for β ≠ 0). A group of one scored sample
    gets 0 (nothing to compare with; the authors' code gives it (e^{βr} - 1)/β).
    """
    rewards = _check_rewards(rewards)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"risk_seeking: beta must be a finite number > 0 (2 is the paper's), got {beta!r}.")

    def risk_seeking(g: torch.Tensor) -> torch.Tensor:
        z = beta * g
        log_mean = torch.logsumexp(z, -1, keepdim=True) - math.log(g.shape[-1])
        return torch.expm1(z - log_mean) / beta

    return _per_group_size(rewards, risk_seeking, 1)


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's advantage without std scaling, g_i - mean_j g_j (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): what
    TRL's GRPOTrainer computes with `scale_rewards="none"`. The trainer's `grpo` objective keeps TRL's own
    advantages (any `scale_rewards`); this function is the k = 1 reference the other objectives reduce to."""
    rewards = _check_rewards(rewards)
    return _per_group_size(rewards, lambda g: g - g.mean(-1, keepdim=True), 1)


# --- the table -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassKObjective:
    """One objective: its advantage function, which of (k, estimator, beta) it takes, its source."""

    function: Callable[..., torch.Tensor]
    parameters: tuple[str, ...]
    binary_only: bool
    estimators: tuple[str, ...]
    paper: str


OBJECTIVES: dict[str, PassKObjective] = {
    "dco": PassKObjective(dco_advantages, ("k", "estimator"), True, PASS_AT_N_ESTIMATORS, "arXiv 2502.07154"),
    "pkpo": PassKObjective(pkpo_advantages, ("k", "estimator"), False, PKPO_ESTIMATORS, "arXiv 2505.15201"),
    "passk_analytic": PassKObjective(passk_analytic_advantages, ("k",), True, (), "arXiv 2508.10751"),
    "max_k_loo": PassKObjective(max_k_loo_advantages, (), False, (), "arXiv 2503.19595"),
    "risk_seeking": PassKObjective(risk_seeking_advantages, ("beta",), False, (), "arXiv 2509.24261"),
    "grpo": PassKObjective(grpo_advantages, (), False, (), "arXiv 2402.03300, 2503.20783"),
}
PASS_K_OBJECTIVES = tuple(OBJECTIVES)


def pass_k_advantages(objective: str, rewards: torch.Tensor, k=None, estimator: str | None = None, beta=None):
    """(G, K) advantages of `objective` (a key of `OBJECTIVES`) for (G, K) rewards; k, estimator and beta are
    passed to the objectives that take them (None: the function's default) and ignored by the others."""
    if objective not in OBJECTIVES:
        raise ValueError(f"pass@k objective must be one of {PASS_K_OBJECTIVES}, got {objective!r}.")
    entry = OBJECTIVES[objective]
    given = {"k": k, "estimator": estimator, "beta": beta}
    return entry.function(rewards, **{name: given[name] for name in entry.parameters if given[name] is not None})
