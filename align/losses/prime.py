"""PRIME's advantages: implicit process rewards and verifier outcome rewards, leave-one-out baselined per group.

Cui et al. 2025, "Process Reinforcement through Implicit Rewards" (arXiv 2502.01456), §3.2 Eq. 5. For the K samples
y^1..y^K of one prompt, with token process rewards r_φ(y^i_s) = β·log π_φ/π_ref (`implicit_reward.token_rewards`)
and outcome rewards r_o(y^i) from the verifier:

    A^i_t = Σ_{s=t}^{|y^i|} γ^{s−t} [ r_φ(y^i_s) − (1/(K−1)) Σ_{j≠i} m_j ]  +  r_o(y^i) − (1/(K−1)) Σ_{j≠i} r_o(y^j)

with m_j = Σ_s r_φ(y^j_s) / |y^j| the per-token mean of sample j: a leave-one-out (RLOO) baseline for each source,
the process one on the per-token mean, and the process return summed from token t to the end.

Two modes, because the paper and its code differ after the first token:
- `paper`: Eq. 5 as written.
- `verl`: what PRIME-RL/PRIME and verl's prime recipe compute. Each token reward becomes (K/(K−1))·(r_{i,s} − m̄)
  with m̄ the group's mean of m_j, the outcome (K/(K−1))·(r_o − mean r_o) (exact RLOO) is placed on the last valid
  token, and the sum is reverse-cumulated with γ. Equal to `paper` at t = 0 (and everywhere for γ = 1 and constant
  rewards); differs by (1/(K−1))·Σ_{s≥t}(r_{i,s} − m_i) elsewhere.

The code first divides the token rewards by the batch's largest |process return| (`batch_norm_process_rewards`,
its `prime_norm=batch_norm`). Both then whiten over every valid token of the batch, (x − μ)/√(σ²_unbiased + 1e-8),
no mean added back (verl's `masked_whiten`). `accuracy_band` is PRIME's prompt filter (keep a prompt whose K samples
are neither all right nor all wrong: mean accuracy within [0.2, 0.8], inclusive as the code, strict as Alg. 1).

Pure tensor functions; groups are K contiguous rows (TRL's GRPO layout). `align.trainers` wires them.
"""

from __future__ import annotations

import torch


MODES = ("paper", "verl")


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"leave-one-out baselines need group_size >= 2, got {group_size}")
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} rows do not split into groups of {group_size}")
    return values.reshape(-1, group_size, *values.shape[1:])


def leave_one_out_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) mean of the other K − 1 values of each row's group: (Σ_group − v_i)/(K − 1)."""
    grouped = _groups(values, group_size)
    return ((grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)).reshape(values.shape)


def rloo_advantages(outcome: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) r_o(y^i) − mean_{j≠i} r_o(y^j) = (K/(K−1))·(r_o − group mean): RLOO's advantage."""
    return outcome - leave_one_out_mean(outcome, group_size)


def per_token_mean(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) m_i = Σ_s r_{i,s}/|y^i| over the valid tokens (0 for an empty completion)."""
    mask = mask.to(token_rewards.dtype)
    return (token_rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def reverse_returns(values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, T) Σ_{s≥t} γ^{s−t}·values_s over valid tokens (0 on padding). Padding may sit anywhere after the
    completion: masked tokens contribute nothing and are skipped by the discount (γ counts valid tokens only)."""
    values = values * mask.to(values.dtype)
    if gamma == 1.0:
        returns = values.flip(-1).cumsum(-1).flip(-1)
    else:
        returns = torch.zeros_like(values)
        running = torch.zeros_like(values[:, 0])
        for t in range(values.shape[1] - 1, -1, -1):
            valid = mask[:, t].bool()
            running = torch.where(valid, values[:, t] + gamma * running, running)
            returns[:, t] = running
    return returns * mask.to(values.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ)/√(σ² + eps) over the valid entries (unbiased σ²), 0 elsewhere; no mean is added back."""
    valid = mask.bool()
    count = valid.sum()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {int(count)}")
    selected = values[valid]
    mean = selected.mean()
    variance = ((selected - mean) ** 2).sum() / (count - 1)
    return torch.where(valid, (values - mean) / torch.sqrt(variance + eps), torch.zeros_like(values))


def batch_norm_process_rewards(token_rewards: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """r / (max_{i,t} |Σ_{s≥t} r_{i,s}| + eps): the code's `prime_norm=batch_norm`, applied to the token rewards
    before the advantages. It bounds every process return by 1 (so β cancels) and fixes the process/outcome scale;
    the max runs over the valid tokens of the batch handed in (the code takes it per data-parallel shard)."""
    returns = reverse_returns(token_rewards, mask)
    peak = returns.abs().masked_fill(~mask.bool(), 0).max() if mask.any() else returns.new_zeros(())
    return token_rewards / (peak + eps)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid token (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(-1)


def prime_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    outcome: torch.Tensor,
    group_size: int,
    *,
    mode: str = "paper",
    gamma: float = 1.0,
    whiten: bool = True,
) -> torch.Tensor:
    """(B, T) token advantages of the module docstring from `token_rewards` (B, T) (0 on padding), the completion
    `mask` (B, T) and `outcome` (B,) rewards; rows in groups of `group_size` contiguous samples of one prompt."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if token_rewards.shape != mask.shape or outcome.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)}, mask {tuple(mask.shape)} and outcome "
            f"{tuple(outcome.shape)} must be (B, T), (B, T) and (B,)"
        )
    rewards = token_rewards.double() * mask.double()
    means = per_token_mean(rewards, mask)
    outcome = outcome.double()
    if mode == "paper":
        process = reverse_returns(rewards - leave_one_out_mean(means, group_size)[:, None], mask, gamma)
        advantages = process + rloo_advantages(outcome, group_size)[:, None]
    else:
        k = group_size
        group_mean = _groups(means, k).mean(dim=1, keepdim=True).expand(-1, k).reshape(means.shape)
        shaped = k / (k - 1) * (rewards - group_mean[:, None])
        rows = torch.arange(len(outcome), device=outcome.device)
        shaped[rows, last_valid_index(mask)] += rloo_advantages(outcome, k)
        advantages = reverse_returns(shaped, mask, gamma)
    advantages = advantages * mask.double()
    return (masked_whiten(advantages, mask) if whiten else advantages).to(token_rewards.dtype)


def accuracy_band(
    outcome: torch.Tensor, group_size: int, low: float = 0.2, high: float = 0.8, *, inclusive: bool = True
) -> torch.Tensor:
    """(num_groups,) True where the group's mean outcome lies in [low, high] (`inclusive`, as PRIME's code) or
    (low, high) (strict, as its Alg. 1): groups of all-right or all-wrong samples carry no relative signal."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    accuracy = _groups(outcome.double(), group_size).mean(dim=1)
    if inclusive:
        return (accuracy >= low) & (accuracy <= high)
    return (accuracy > low) & (accuracy < high)
