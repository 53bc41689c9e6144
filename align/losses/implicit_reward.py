"""Implicit rewards r = β·log π_θ/π_ref: the outcome objectives that train them and the process rewards they give.

Yuan et al. 2024, "Free Process Rewards without Process Labels" (arXiv 2412.01981), §3:

- outcome reward       r_θ(y) = β Σ_{i=1..T} log π_θ(y_i|y_<i)/π_ref(y_i|y_<i)       (completion tokens only)
- Q value at token t   q^t    = β Σ_{i=1..t} log π_θ(y_i|y_<i)/π_ref(y_i|y_<i)
                              = β log E_{π_ref(y|y_≤t)}[exp(r_θ(y)/β)]                 (Proposition 3.1)
- step k reward        r^k    = q^{e_k} − q^{e_{k−1}}   (e_k: the token boundary where step k ends, q^{e_0} = 0)

so step rewards are partial sums of per-token log-ratios, and Σ_k r^k = q^T = r_θ(y) for any training loss. The
objectives, on r = β·(log π_θ(y) − log π_ref(y)) with sequence log-probs summed over completion tokens:

- `ce`  (unpaired, label l ∈ {0, 1}):  −[l·log σ(r) + (1 − l)·log(1 − σ(r))]           (paper Eq. 5)
- `dpo` (correct y_w, incorrect y_l):  −log σ(r_w − r_l)
- `nca` (pairs, Chen et al. 2024):     −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)

Everything here is a tensor function (no model, no trainer): `align.trainers.implicit_prm` feeds it sequence
log-probs, `align.prm` feeds it per-token log-probs.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F


AGGREGATES = ("min", "mean", "last", "sum")
BALANCE_MODES = ("none", "dataset", "instruction")


def implicit_ce_loss(
    logratios: torch.Tensor, labels: torch.Tensor, beta: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example binary cross-entropy of σ(β·logratio) against the outcome label (the paper's CE objective).

    `logratios` = log π_θ(y) − log π_ref(y) per example, `labels` are bools/0-1. Computed from logits with
    `binary_cross_entropy_with_logits`, which stays finite where σ(r) rounds to 0 or 1. `weights` (per example)
    scale each term, e.g. to weight the correct and incorrect classes differently.
    """
    rewards = beta * logratios
    losses = F.binary_cross_entropy_with_logits(rewards, labels.to(rewards.dtype), reduction="none")
    return losses if weights is None else losses * weights


def implicit_dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair −log σ(r_w − r_l), with r = β·logratio (DPO on correct/incorrect pairs)."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def implicit_nca_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair NCA loss −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l) (Chen et al. 2024, "Noise Contrastive Alignment").

    Unlike DPO it anchors r_w above 0 instead of only above r_l, so the correct completions' likelihood rises.
    """
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def token_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """β·(log π_θ − log π_ref) per token, exactly 0 where `mask` is 0 (prompt and padding).

    `ref_logps=None` is the reference-free variant of §5.5.2 (β·log π_θ): with a uniform reference, log π_ref is a
    per-token constant that cancels when ranking completions of equal length.
    """
    logratio = policy_logps if ref_logps is None else policy_logps - ref_logps
    return torch.where(mask.bool(), beta * logratio, torch.zeros_like(logratio))


def cumulative_q(token_rewards: torch.Tensor) -> torch.Tensor:
    """q^t = Σ_{i≤t} token_rewards[..., i] along the last dimension (masked tokens contribute 0)."""
    return token_rewards.cumsum(dim=-1)


def process_rewards(
    token_rewards: torch.Tensor, step_ends: torch.Tensor, step_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q values and step rewards at step boundaries: returns (q, r), each shaped like `step_ends`.

    `token_rewards` (..., T) are per-token rewards (0 on masked tokens). `step_ends` (..., K) are exclusive token
    boundaries: step k covers tokens [step_ends[k−1], step_ends[k]), so q^k is the sum of the first step_ends[k]
    token rewards (a boundary of 0 gives q = 0, a step without tokens gets r = 0). `step_mask` marks real steps in a
    padded batch; padded steps get q = r = 0.
    """
    zeros = torch.zeros_like(token_rewards[..., :1])
    q_at_boundary = torch.cat([zeros, cumulative_q(token_rewards)], dim=-1)  # q_at_boundary[..., b] = Σ_{i<b}
    q = q_at_boundary.gather(-1, step_ends.long())
    r = torch.diff(q, dim=-1, prepend=torch.zeros_like(q[..., :1]))
    if step_mask is not None:
        keep = step_mask.bool()
        q, r = q.masked_fill(~keep, 0.0), r.masked_fill(~keep, 0.0)
    return q, r


def aggregate_step_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor, how: str = "min") -> torch.Tensor:
    """One score per completion from its step rewards (..., K) and real-step mask (..., K).

    `min`: the lowest step reward, the paper's best-of-N score (§4.1: a solution is as good as its worst step);
    `mean`; `last`: the last real step's reward; `sum`: Σ_k r^k = q^T, the outcome reward. A row without steps
    scores 0 (its outcome reward).
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    keep = step_mask.bool()
    count = keep.sum(dim=-1)
    masked = step_rewards.masked_fill(~keep, 0.0)
    if how == "sum":
        return masked.sum(dim=-1)
    if how == "mean":
        return masked.sum(dim=-1) / count.clamp(min=1)
    if how == "last":
        last = (count - 1).clamp(min=0).unsqueeze(-1)
        return masked.gather(-1, last).squeeze(-1)
    lowest = step_rewards.masked_fill(~keep, float("inf")).amin(dim=-1)
    return torch.where(count > 0, lowest, torch.zeros_like(lowest))


def balanced_subset(
    labels: Sequence[bool], groups: Sequence[Hashable] | None = None, mode: str = "dataset", seed: int = 0
) -> list[int]:
    """Indices of a class-balanced subset of an outcome dataset, for the CE objective (paper Table 1, "balanced").

    `dataset`: subsample the majority class (over the whole dataset) down to the size of the minority class.
    `instruction`: within each group (one instruction / prompt), keep as many correct as incorrect completions;
    groups with a single class contribute nothing, since no balanced subset of them exists. `none`: every index.
    The kept indices are returned in their original order; the choice of which to drop is seeded.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"class balance mode must be one of {BALANCE_MODES}, got {mode!r}")
    if mode == "none":
        return list(range(len(labels)))
    if mode == "instruction" and groups is None:
        raise ValueError("instruction-wise balancing needs one group key (the instruction) per example")
    rng = random.Random(seed)
    buckets: dict[Hashable, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for index, label in enumerate(labels):
        key = groups[index] if mode == "instruction" else None
        buckets[key][0 if label else 1].append(index)
    kept = []
    for correct, incorrect in buckets.values():
        size = min(len(correct), len(incorrect))
        kept += rng.sample(correct, size) + rng.sample(incorrect, size)
    return sorted(kept)
