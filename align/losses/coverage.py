"""Direct Coverage Optimization (DCO): the pass@N loss and its confidence-limiting weight.

Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting
Confidence Improves Mathematical Reasoning" (arXiv 2502.07154).

If the model gives the target y the probability p̂ = p_θ(y | x), the chance that at least one of N independent
samples is y (the coverage, pass@N for one correct answer) is

    C_N(p̂) = 1 - (1 - p̂)^N.

DCO minimises its negative log

    ℓ_N(p̂) = -log(1 - (1 - p̂)^N),

whose gradient is the cross-entropy gradient scaled by a per-example weight

    ∂ℓ_N / ∂log p̂ = -F(N, p̂),    F(N, p̂) = N p̂ (1 - p̂)^(N-1) / (1 - (1 - p̂)^N)  ∈ [0, 1].

F(1, p̂) = 1 (N = 1 is cross-entropy); F ≈ 1 while N p̂ ≪ 1 (hard examples keep the full CE gradient) and F → 0 once
p̂ ≳ 1/N, which is what stops the model from becoming over-confident on examples it already covers.

Numerics. p̂ is a product of token probabilities and underflows (e^-104 in fp32), so everything here takes
s = log p̂ and works in log space with log1mexp(a) = log(1 - e^a):

    log(1 - p̂) = log1mexp(s),    log C_N = log1mexp(N · log1mexp(s)),
    log F = log N + s + (N - 1) · log1mexp(s) - log C_N.

Where N p̂ is tiny (s + log N < -10), log1mexp(s) rounds to 0 and the exact form gives log 0; there the
expansion 1 - (1 - p̂)^N = N p̂ (1 - (N - 1) p̂ / 2 + (N - 1)(N - 2) p̂^2 / 6 - ...) is used instead, whose
neglected term is below 1e-13 relative at the switch. Inputs of any float dtype are computed in at least fp32.

The functions are organized in three layers so other objectives can reuse them (the online pass@N group weights
of `align.losses.pass_at_n` use the first): elementwise `coverage_loss` / `coverage_weight` / `coverage` on a
tensor of log p̂; `sequence_log_probs` and `segment_log_probs`, which sum per-token log-probs into per-sequence or
per-step log p̂; the batch reductions `dco_loss` and `dco_estimated_loss`, which apply ε filtering and the
per-sequence mean. A tensor of probabilities p̂ (not logs) is passed as `torch.log(p_hat)`; p̂ = 0 gives F = 1 and
C = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# Below this value of s + log N (i.e. N p̂ < e^-10 ≈ 4.5e-5) the small-p̂ expansion replaces the exact form.
SMALL_COVERAGE_LOG_THRESHOLD = -10.0
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate over the whole range (Mächler 2012, "Accurately Computing log(1-exp(-|a|))").

    Near 0, 1 - e^x cancels, so -expm1(x) is used; far from 0, e^x is small and log1p(-e^x) keeps its precision.
    log1mexp(0) = -inf and log1mexp(-inf) = 0; neither branch produces NaN on [-inf, 0].
    """
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # bf16/fp16 inputs are computed in fp32 (the brief's floor); fp64 inputs stay fp64.
    return torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else torch.float32


def _budget(n, like: torch.Tensor) -> torch.Tensor | float:
    """The sample budget N (finite, >= 1, possibly fractional): a float, or a tensor broadcastable to `like`."""
    if isinstance(n, torch.Tensor):
        budget = n.to(device=like.device, dtype=like.dtype)
        invalid = ~torch.isfinite(budget) | (budget < 1)
        if bool(invalid.any()):
            bad = budget[invalid].flatten()[:5].tolist()
            raise ValueError(f"The sample budget N must be finite and >= 1 for every example; got {bad}.")
        try:
            torch.broadcast_shapes(budget.shape, like.shape)
        except RuntimeError as error:
            raise ValueError(
                f"A per-example N of shape {tuple(budget.shape)} does not broadcast to log p̂ of shape "
                f"{tuple(like.shape)}; pass one N per example (same shape) or a scalar."
            ) from error
        return budget
    value = float(n)
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"The sample budget N must be finite and >= 1, got {n!r} (N = 1 is cross-entropy).")
    return value


def _log_coverage_and_weight(s: torch.Tensor, n: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """log C_N(p̂) and F(N, p̂) from s = log p̂ <= 0 (no autograd; see the module docstring for the formulas).

    A scalar N (the common case) takes a few branches in Python that a per-example N needs as `torch.where`.
    """
    per_example = isinstance(n, torch.Tensor)
    if not per_example and n == 1:  # cross-entropy exactly: C = p̂, F = 1
        return s.clone(), torch.ones_like(s)
    log_n = torch.log(n) if per_example else math.log(n)
    # Exact form in log space.
    log_q = log1mexp(s)  # log(1 - p̂): -inf at p̂ = 1
    log_c_exact = log1mexp(n * log_q)
    log_q_rest = (n - 1) * log_q
    if per_example:  # (N - 1) log(1 - p̂) is 0 * -inf = NaN at N = 1, p̂ = 1, where its value is 0
        log_q_rest = torch.where(n > 1, log_q_rest, torch.zeros_like(log_q))
    weight_exact = torch.exp(log_n + s + log_q_rest - log_c_exact)
    # Small N p̂: C = N p̂ (1 - a + b + O((N p̂)^3)) with a = (N - 1) p̂ / 2 and b = (N - 1)(N - 2) p̂^2 / 6, so
    # log C = log N + s + log1p(b - a); F = -dℓ/ds of that same expression (da/ds = a, db/ds = 2b), which keeps the
    # loss and its gradient consistent on both sides of the switch.
    p = torch.exp(s)
    first = (n - 1) * p / 2
    second = first * (n - 2) * p / 3
    log_c_small = log_n + s + torch.log1p(second - first)
    weight_small = (1 - 2 * first + 3 * second) / (1 - first + second)
    small = (s + log_n) < SMALL_COVERAGE_LOG_THRESHOLD
    log_c = torch.where(small, log_c_small, log_c_exact)
    weight = torch.where(small, weight_small, weight_exact)
    if per_example:  # N = 1 rows are cross-entropy exactly (rather than the log1mexp round trip, which rounds)
        is_ce = n == 1
        log_c = torch.where(is_ce, s, log_c)
        weight = torch.where(is_ce, torch.ones_like(weight), weight)
    return log_c, weight


class _CoverageLoss(torch.autograd.Function):
    """(ℓ_N(p̂), F(N, p̂)) as functions of s = log p̂, with the analytic gradient dℓ/ds = -F(N, p̂).

    A hand-written backward rather than autograd through the branches: `torch.where` back-propagates NaN from the
    branch it did not select (e.g. the exact form at underflow), and the closed-form F is cheaper and exact.
    `torch.autograd.gradcheck` checks this backward against finite differences of the forward (see the tests).
    F is returned too (not differentiable) so that a caller needing both evaluates the formulas once.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, n: torch.Tensor | float):
        # A log-probability is <= 0; a positive value can only be rounding noise of a log-softmax.
        log_c, weight = _log_coverage_and_weight(s.clamp(max=0), n)
        ctx.save_for_backward(weight)
        ctx.mark_non_differentiable(weight)
        return -log_c, weight

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_weight: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return -weight * grad_loss, None


def _loss_and_weight(seq_logp: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    s = seq_logp.to(_compute_dtype(seq_logp))
    return _CoverageLoss.apply(s, _budget(n, s))


def coverage_loss(seq_logp: torch.Tensor, n) -> torch.Tensor:
    """Elementwise DCO loss ℓ_N = -log(1 - (1 - p̂)^N) of s = `seq_logp` = log p̂, differentiable in s.

    Args:
        seq_logp: log p̂ of each target (any shape, any float dtype; computed in at least fp32).
        n: the sample budget N >= 1, a number or a tensor broadcastable to `seq_logp` (one N per example).

    Returns:
        ℓ with the shape of `seq_logp`; its gradient with respect to `seq_logp` is -F(N, p̂) (see `coverage_weight`).
    """
    return _loss_and_weight(seq_logp, n)[0]


@torch.no_grad()
def coverage_weight(seq_logp: torch.Tensor, n) -> torch.Tensor:
    """F(N, p̂) = N p̂ (1 - p̂)^(N-1) / (1 - (1 - p̂)^N) ∈ [0, 1] of s = `seq_logp` = log p̂ (no gradient).

    The factor by which DCO scales an example's cross-entropy gradient; -F is the derivative of `coverage_loss`.
    """
    s = seq_logp.to(_compute_dtype(seq_logp))
    return _log_coverage_and_weight(s.clamp(max=0), _budget(n, s))[1]


@torch.no_grad()
def coverage(seq_logp: torch.Tensor, n) -> torch.Tensor:
    """C_N(p̂) = 1 - (1 - p̂)^N, the probability that N samples contain the target (no gradient)."""
    s = seq_logp.to(_compute_dtype(seq_logp))
    return torch.exp(_log_coverage_and_weight(s.clamp(max=0), _budget(n, s))[0])


def segment_log_probs(token_logp: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probabilities into per-segment log p̂ (a sequence, or each step of a sequence).

    Args:
        token_logp: (B, T) log-probability of each label token (any float dtype; summed in at least fp32).
        segment_ids: (B, T) integer segment of each token, 0, 1, 2, ... within a row; -1 for tokens outside every
            segment (prompt, padding). One segment per row gives the sequence log-probability.

    Returns:
        (log p̂ of shape (B, S), mask of shape (B, S) that is True where the segment has at least one token), with
        S = 1 + the largest segment id in the batch (at least 1).
    """
    if token_logp.shape != segment_ids.shape:
        raise ValueError(
            f"token_logp {tuple(token_logp.shape)} and segment_ids {tuple(segment_ids.shape)} must have one shape."
        )
    inside = segment_ids >= 0
    index = segment_ids.clamp(min=0).long()
    num_segments = int(index.max().item()) + 1 if index.numel() else 1
    values = torch.where(inside, token_logp.to(_compute_dtype(token_logp)), 0.0)
    sums = values.new_zeros(token_logp.shape[0], num_segments).scatter_add(1, index, values)
    counts = torch.zeros_like(sums).scatter_add(1, index, inside.to(sums.dtype))
    return sums, counts > 0


def sequence_log_probs(token_logp: torch.Tensor, label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) log p̂ of each sequence's label tokens (summed in at least fp32) and (B,) True where it has any."""
    values = torch.where(label_mask, token_logp.to(_compute_dtype(token_logp)), 0.0)
    return values.sum(-1), label_mask.any(-1)


@dataclass(frozen=True)
class CoverageLossOutput:
    """A reduced DCO loss and the per-unit quantities behind it (a unit is a sequence, or a step in step mode).

    Attributes:
        loss: scalar, the sum of the kept units' losses divided by the number of sequences with a kept unit.
        unit_loss: (B, S) loss of each unit before filtering (0 where `unit_mask` is False).
        weight: (B, S) F of each unit, the factor on its cross-entropy gradient (detached).
        coverage: (B, S) C_N of each unit (detached).
        unit_mask: (B, S) True for real units (False for padding).
        kept: (B, S) True for real units with F >= ε, the ones that contribute to `loss`.
        seq_logp: (B,) the per-sequence log-probability of the trained tokens (detached).
    """

    loss: torch.Tensor
    unit_loss: torch.Tensor
    weight: torch.Tensor
    coverage: torch.Tensor
    unit_mask: torch.Tensor
    kept: torch.Tensor
    seq_logp: torch.Tensor


def _as_units(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(-1) if tensor.dim() == 1 else tensor


def _kept_sequence_mean(unit_loss, weight, unit_mask, weight_threshold: float):
    """Σ over kept units / number of sequences with at least one kept unit; a batch with none gives a zero loss.

    ε filtering (Chen et al. 2025): units with F < ε carry almost no gradient, so they leave the batch entirely and
    the mean is over what is left, instead of diluting the kept examples' gradients by the raw batch size.
    """
    if not 0.0 <= weight_threshold <= 1.0:
        raise ValueError(f"weight_threshold (ε) must be in [0, 1], got {weight_threshold!r}.")
    kept = unit_mask & (weight >= weight_threshold)
    # `where` (not a product) so that a dropped unit's loss cannot leak in as inf * 0 = NaN; the zero it leaves is
    # still connected to the graph, so an all-dropped batch back-propagates zeros instead of failing.
    per_sequence = torch.where(kept, unit_loss, torch.zeros_like(unit_loss)).sum(-1)
    kept_sequences = kept.any(-1).sum()
    return per_sequence.sum() / kept_sequences.clamp(min=1), kept


def dco_loss(
    unit_logp: torch.Tensor, n, weight_threshold: float = 0.0, unit_mask: torch.Tensor | None = None
) -> CoverageLossOutput:
    """DCO over a batch: Σ_kept ℓ_N(p̂_u) / (number of sequences with a kept unit).

    With one unit per sequence ((B,) input: p̂ = probability of the whole target) this is the paper's DCO; with
    (B, S) step log-probabilities and N = N_eff it is DCO_step, ℓ = Σ_i ℓ_{N_eff}(p̂(step_i)), where each step's
    cross-entropy gradient is weighted by F(N_eff, p̂(step_i)). N = 1 gives the per-sequence cross-entropy
    Σ_b -log p̂_b / B in both cases.

    Args:
        unit_logp: (B,) per-sequence or (B, S) per-step log p̂.
        n: sample budget N (or N_eff), a number or a tensor broadcastable to the units.
        weight_threshold: ε; units with F < ε are dropped from the loss and from the count it is divided by.
        unit_mask: (B,) or (B, S) bool, True for real units (default: all).
    """
    unit_logp = _as_units(unit_logp)
    unit_mask = torch.ones_like(unit_logp, dtype=torch.bool) if unit_mask is None else _as_units(unit_mask)
    if isinstance(n, torch.Tensor):
        n = _as_units(n)
    unit_loss, weight = _loss_and_weight(unit_logp, n)
    loss, kept = _kept_sequence_mean(unit_loss, weight, unit_mask, weight_threshold)
    masked_logp = torch.where(unit_mask, unit_logp.detach(), 0.0)
    return CoverageLossOutput(
        loss=loss,
        unit_loss=torch.where(unit_mask, unit_loss, 0.0),
        weight=weight,
        coverage=torch.exp(-unit_loss.detach()),
        unit_mask=unit_mask,
        kept=kept,
        seq_logp=masked_logp.to(unit_loss.dtype).sum(-1),
    )


def dco_estimated_loss(
    seq_logp: torch.Tensor,
    p_hat: torch.Tensor,
    n,
    weight_threshold: float = 0.0,
    mask: torch.Tensor | None = None,
) -> CoverageLossOutput:
    """DCO_a (chain of thought): the trace's cross-entropy weighted by F(N, p̂_est), mean over kept sequences.

    With a chain of thought, p̂ = P(correct final answer | x) sums over all traces and is intractable, so it is
    estimated outside the model (e.g. the fraction of k sampled completions graded correct) and the weight
    F(N, p̂_est) multiplies the cross-entropy -log p_θ(trace | x) of a correct trace: loss_b = F_b · (-seq_logp_b).

    Args:
        seq_logp: (B,) log-probability of each training trace.
        p_hat: (B,) estimated probability in [0, 1] that the model answers the problem correctly.
        n: sample budget N, a number or a (B,) tensor.
        weight_threshold: ε; sequences with F(N, p̂_est) < ε are dropped from the loss and its count.
        mask: (B,) bool, True for real sequences (default: all).
    """
    if p_hat.shape != seq_logp.shape:
        raise ValueError(f"p_hat {tuple(p_hat.shape)} must have the shape of seq_logp {tuple(seq_logp.shape)}.")
    estimate = p_hat.to(_compute_dtype(seq_logp))
    invalid = ~((estimate >= 0) & (estimate <= 1))  # also catches NaN
    if bool(invalid.any()):
        bad = estimate[invalid][:5].tolist()
        raise ValueError(f"p_hat must be a probability in [0, 1]; got {bad}. Recompute the p_hat column.")
    log_estimate = torch.log(estimate)  # p̂ = 0 -> -inf -> F = 1: an unsolved problem keeps the full CE gradient
    with torch.no_grad():
        estimate_loss, weight = (_as_units(x) for x in _loss_and_weight(log_estimate, n))
    unit_mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else _as_units(mask)
    trace_logp = _as_units(seq_logp.to(weight.dtype))
    unit_loss = weight * -trace_logp
    loss, kept = _kept_sequence_mean(unit_loss, weight, unit_mask, weight_threshold)
    return CoverageLossOutput(
        loss=loss,
        unit_loss=torch.where(unit_mask, unit_loss, 0.0),
        weight=weight,
        coverage=torch.exp(-estimate_loss),
        unit_mask=unit_mask,
        kept=kept,
        seq_logp=torch.where(unit_mask, trace_logp.detach(), 0.0).sum(-1),
    )
