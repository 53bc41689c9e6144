"""Attention entropy, the entropy-band regularizer and the output z-loss, as pure tensor functions.

Sources:
- Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489; repo
  Nandan91/entropy-guided-attention-llm), Algorithm 1. For a head h of layer l with attention rows a_i:

      H_i      = -sum_j a_ij log a_ij                      (row entropy; masked keys have a_ij = 0)
      E^(l,h)  = mean over query rows i of H_i             (head entropy, following Zhai et al. 2023)
      delta    = E^(l,h) - theta^(l,h) * E_max             (E_max = log T)
      penalty  = delta^2 * 1[|delta| > gamma * E_max]      (the FULL squared deviation once outside the band)
      L_entropy = (1/L) sum_l (1/H) sum_h penalty          and   L_total = L_task + lambda * L_entropy

  (`attention_entropy_penalty` below is L_entropy; `entropy_band_penalty` is one layer's (1/H) sum_h penalty.)

  The paper's reference code instead applies the band per query row and SUMS the row penalties over the batch and
  positions before dividing by the number of heads. Both are available (`convention="paper"` / `"code"`); they give
  different numbers (methods.md §5.6: 0 vs 1.125308 for one causal uniform head of length 4).
- Wortsman et al. 2024, "Small-scale proxies for large-scale Transformer training instabilities" (arXiv 2309.14322):
  z-loss = coef * mean_tokens (log Z)^2, where Z is the output softmax normalizer (their coefficient: 1e-4).

Normalization ("what is E_max of a row"), `entropy_units` below:
- `context`: E_max = log T with T the sequence's length (its number of non-padding tokens). With packed, fixed-length
  sequences this is the paper's log T; entropies stay in nats.
- `visible`: each row is divided by the log of the number of keys it can see, so a row's entropy is a fraction of its
  own maximum (uniform attention over what it sees = 1) and E_max = 1. Rows that see a single key carry no choice
  (their entropy is 0 by construction) and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


CONVENTIONS = ("paper", "code")
NORMALIZATIONS = ("context", "visible")


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RowEntropy(torch.autograd.Function):
    """H = -sum_j p_j log p_j over the last dim, with a backward that saves only `p`.

    Autograd through `p * log(p)` would keep a second (batch, heads, queries, keys) tensor, `log p`, alive until the
    backward; here the backward recomputes it from `p`, which the softmax and the value product keep anyway (the same
    tensor, so no extra memory). Where p = 0 (masked keys) the gradient -(log p + 1) is infinite, but the softmax
    backward multiplies it by p = 0; log p is clamped at the smallest normal float so that product is 0, not NaN.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        p = probs.to(_at_least_float32(probs.dtype))
        return -torch.xlogy(p, p).sum(-1)

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        dtype = _at_least_float32(probs.dtype)
        # One full-size temporary, updated in place: -(log max(p, tiny) + 1) * grad
        grad = probs.to(dtype, copy=True).clamp_min_(torch.finfo(dtype).tiny)
        grad.log_().add_(1).mul_(-grad_entropy.unsqueeze(-1).to(dtype))
        return grad.to(probs.dtype)


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of `probs` (softmax output, any leading shape), computed in float32 or wider.

    Rows that put all mass on one key give ~0; uniform rows over n keys give log n. Differentiable.
    """
    return _RowEntropy.apply(probs)


def entropy_units(
    entropy: torch.Tensor, valid_rows: torch.Tensor, visible_keys: torch.Tensor, normalization: str = "context"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Express row entropies in the units of `normalization` (module docstring).

    Args:
        entropy: (batch, heads, queries) row entropies in nats.
        valid_rows: (batch, queries) bool, False for padding query rows.
        visible_keys: (batch, queries) number of keys each row may attend to.
    Returns:
        `(units, max_units, weights)`: units (batch, heads, queries), each row's E_max in the same units
        (batch, queries), and the rows' weights (batch, queries; 0 for rows that do not count).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    valid = valid_rows.to(torch.bool)
    if normalization == "context":
        length = valid.sum(-1, keepdim=True).clamp(min=1).to(entropy.dtype)
        max_units = torch.log(length).expand(valid.shape)
        return entropy, max_units, valid.to(entropy.dtype)
    counts = visible_keys.to(entropy.dtype)
    weights = valid & (visible_keys > 1)
    log_counts = torch.where(weights, torch.log(counts.clamp(min=2)), torch.ones_like(counts))
    units = torch.where(weights.unsqueeze(1), entropy / log_counts.unsqueeze(1), torch.zeros_like(entropy))
    return units, torch.ones_like(counts), weights.to(entropy.dtype)


def head_means(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over query rows per (batch, head): values (B, H, Q), weights (B, Q) -> (B, H).

    A sequence with no counted row gets 0 (and should be left out by the caller via `weights.sum(-1) > 0`).
    Rows of weight 0 are masked out (`_zero_where_unweighted`), so a NaN or inf value there (the softmax of a query
    row with every key masked) changes neither the mean nor its gradient.
    """
    total = weights.sum(-1, keepdim=True)
    weights = weights.unsqueeze(1)
    weighted = _zero_where_unweighted(values, weights) * weights
    return weighted.sum(-1) / total.clamp(min=torch.finfo(values.dtype).tiny)


def _zero_where_unweighted(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`values` with exactly 0 where the (broadcast) weight is 0. Multiplying by the weight alone keeps a NaN or inf
    value there (NaN * 0 = NaN) and its NaN gradient; `torch.where` sends no gradient to the branch it drops."""
    return torch.where(weights != 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def entropy_band_penalty(
    units: torch.Tensor,
    max_units: torch.Tensor,
    weights: torch.Tensor,
    threshold: torch.Tensor,
    tolerance: float,
    convention: str = "paper",
) -> torch.Tensor:
    """One layer's entropy-band penalty, already divided by the number of heads (Algorithm 1; module docstring).

    Args:
        units, max_units, weights: from `entropy_units` — (B, H, Q), (B, Q), (B, Q).
        threshold: (H,) target fractions theta of E_max, in (0, 1).
        tolerance: gamma; no penalty while |E - theta * E_max| <= gamma * E_max.
        convention: `paper` — per sequence and head, average the rows first, then penalize the head mean; the
            result is the mean over heads and sequences. `code` — penalize every query row and sum over the batch and
            rows (the reference implementation), then divide by the number of heads.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    num_heads = units.shape[1]
    theta = threshold.to(units.dtype).view(1, num_heads, 1)
    if convention == "code":
        units = _zero_where_unweighted(units, weights.unsqueeze(1))  # rows that do not count may hold NaN
        target = theta * max_units.unsqueeze(1)
        deviation = units - target
        outside = deviation.abs() > tolerance * max_units.unsqueeze(1)
        penalty = deviation.square() * outside * weights.unsqueeze(1)
        return penalty.sum() / num_heads
    counted = weights.sum(-1) > 0  # sequences with at least one counted row
    head_entropy = head_means(units, weights)  # (B, H)
    head_max = head_means(max_units.unsqueeze(1), weights)  # (B, 1): the sequence's E_max
    deviation = head_entropy - theta.view(1, num_heads) * head_max
    outside = deviation.abs() > tolerance * head_max
    penalty = (deviation.square() * outside).mean(-1)  # mean over heads, per sequence
    return (penalty * counted).sum() / counted.sum().clamp(min=1)


class LayerRows(Protocol):
    """What one attention layer saw in one forward (`align.attention.recorder.LayerRecord` is one)."""

    layer: int  # row of the thresholds table
    entropy: torch.Tensor  # (batch, heads, queries) row entropies in nats
    valid_rows: torch.Tensor  # (batch, queries) bool, False for padding query rows
    visible_keys: torch.Tensor  # (batch, queries) number of keys each row may attend to


def attention_entropy_penalty(
    layers: Sequence[LayerRows],
    thresholds: torch.Tensor,
    tolerance: float,
    convention: str = "paper",
    normalization: str = "context",
) -> torch.Tensor:
    """L_entropy = (1/L) sum_l penalty_l over the given layers, each penalty_l already a mean over heads (Algorithm 1).

    The regularized loss is L_task + lambda * L_entropy; lambda is applied by the caller, which also logs L_entropy.

    Args:
        layers: one entry per layer; `layer` selects that layer's row of `thresholds`.
        thresholds: (num_layers, heads) target fractions theta of E_max, in (0, 1).
        tolerance, convention: as in `entropy_band_penalty`; normalization: as in `entropy_units`.
    """
    penalties = [
        entropy_band_penalty(
            *entropy_units(rows.entropy, rows.valid_rows, rows.visible_keys, normalization),
            thresholds[rows.layer],
            tolerance,
            convention,
        )
        for rows in layers
    ]
    return torch.stack(penalties).mean()


def log_partition_from_log_probs(target_logits: torch.Tensor, target_log_probs: torch.Tensor) -> torch.Tensor:
    """log Z of the output softmax from the target token's logit and log-probability: log p_y = z_y - log Z.

    This is how log Z is recovered from a fused LM head that never materializes the (tokens, vocab) logits: the
    target logit costs one dot product per token, and the gradient flows through both terms.
    """
    return target_logits - target_log_probs


def z_loss(log_z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (log Z)^2 over the tokens in `mask` (all tokens if None), without the coefficient."""
    squared = log_z.float().square()
    if mask is None:
        return squared.mean()
    mask = mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)
