"""Margin-based preference losses, their gradient coefficients, and the first-order gradient-entanglement algebra.

Every loss here depends on the policy through the two sequence log-probabilities log π(y_w|x) and log π(y_l|x)
(summed over response tokens). Its gradient with respect to the parameters therefore always has the form

    −∇θ ℓ = d_w ∇θ log π_w − d_l ∇θ log π_l,   d_w = −∂ℓ/∂log π_w,   d_l = ∂ℓ/∂log π_l,

and each loss returns (d_w, d_l) per pair in closed form next to the loss. Yuan et al., "A Common Pitfall of
Margin-based Language Model Alignment: Gradient Entanglement" (ICLR 2025, arXiv 2410.13828) show that one gradient
step then changes the log-probs, to first order in the step size η, by

    Δ log π_w ≈ η (d_w ‖g_w‖² − d_l ⟨g_w, g_l⟩),   Δ log π_l ≈ η (d_w ⟨g_w, g_l⟩ − d_l ‖g_l‖²),

with g = ∇θ log π. So the chosen log-prob rises only while ⟨g_w, g_l⟩ < (d_w/d_l) ‖g_w‖², and the rejected one falls
only while ⟨g_w, g_l⟩ < (d_l/d_w) ‖g_l‖²; outside that regime both move together ("entanglement").

Pure tensor functions: no model, no trainer. Inputs are 1-D tensors over pairs; lengths are completion token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class MarginLossTerms(NamedTuple):
    """Per-pair loss and its gradient coefficients.

    `d_chosen` = −∂ℓ/∂log π_w and `d_rejected` = ∂ℓ/∂log π_l (detached). `pair_weight` is c = −∂ℓ/∂u, the derivative
    with respect to the loss's margin u in log-prob units (after its own length normalization), i.e. the weight of
    the pairwise normalized update c·(g_w/‖g_w‖ − g_l/‖g_l‖); `None` for losses that are not a function of one margin.
    """

    loss: torch.Tensor
    d_chosen: torch.Tensor
    d_rejected: torch.Tensor
    pair_weight: torch.Tensor | None


@dataclass(frozen=True)
class MarginHyperparameters:
    """β and the per-loss constants: SimPO's target margin γ, R-DPO's length weight α, DPOP's λ, CPO's NLL weight."""

    beta: float = 0.1
    simpo_gamma: float = 0.5
    rdpo_alpha: float = 0.2
    dpop_lambda: float = 50.0
    cpo_alpha: float = 1.0


def _lengths(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # An empty completion (possible after truncation) would divide by zero; TRL clamps the same way.
    return lengths.to(like.dtype).clamp(min=1.0)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> MarginLossTerms:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), TRL's `sigmoid`.

    z = β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)],  ℓ = −log σ(z),  d_w = d_l = c = β σ(−z).
    """
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    weight = (beta * torch.sigmoid(-z)).detach()
    return MarginLossTerms(-F.logsigmoid(z), weight, weight, weight)


def ipo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, beta: float
) -> MarginLossTerms:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17 with τ = β), length-normalized as in TRL's `ipo`.

    u = (log π_w − log π_ref,w)/|y_w| − (log π_l − log π_ref,l)/|y_l|,  ℓ = (u − 1/(2β))²,
    c = 2(1/(2β) − u),  d_w = c/|y_w|,  d_l = c/|y_l|.  c < 0 once the margin overshoots 1/(2β): IPO then pulls the
    two log-probs back together.
    """
    len_w, len_l = _lengths(chosen_lengths, chosen_logps), _lengths(rejected_lengths, rejected_logps)
    u = (chosen_logps - ref_chosen_logps) / len_w - (rejected_logps - ref_rejected_logps) / len_l
    target = 1.0 / (2.0 * beta)
    c = (2.0 * (target - u)).detach()
    return MarginLossTerms((u - target) ** 2, c / len_w, c / len_l, c)


def slic_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> MarginLossTerms:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv 2305.10425) on the DPO log-ratio margin, TRL's `hinge`.

    z = β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)],  ℓ = max(0, 1 − z),  d_w = d_l = c = β·1[z < 1].
    """
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    weight = (beta * (z < 1).to(z.dtype)).detach()
    return MarginLossTerms(torch.relu(1 - z), weight, weight, weight)


def simpo_loss(
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float, gamma: float
) -> MarginLossTerms:
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free and length-normalized.

    z = β(log π_w/|y_w| − log π_l/|y_l|) − γ,  ℓ = −log σ(z),  c = β σ(−z),  d_w = c/|y_w|,  d_l = c/|y_l|.
    """
    len_w, len_l = _lengths(chosen_lengths, chosen_logps), _lengths(rejected_lengths, rejected_logps)
    z = beta * (chosen_logps / len_w - rejected_logps / len_l) - gamma
    c = (beta * torch.sigmoid(-z)).detach()
    return MarginLossTerms(-F.logsigmoid(z), c / len_w, c / len_l, c)


def r_dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta: float,
    alpha: float,
) -> MarginLossTerms:
    """R-DPO, length-regularized DPO (Park et al. 2024, arXiv 2403.19159).

    m = β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)] + α(|y_w| − |y_l|),  ℓ = −log σ(m),
    d_w = d_l = c = β σ(−m). A longer chosen response already earns margin, so it gets less push.
    """
    len_w, len_l = chosen_lengths.to(chosen_logps.dtype), rejected_lengths.to(rejected_logps.dtype)
    m = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)) + alpha * (len_w - len_l)
    weight = (beta * torch.sigmoid(-m)).detach()
    return MarginLossTerms(-F.logsigmoid(m), weight, weight, weight)


def dpop_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, lam: float
) -> MarginLossTerms:
    """DPOP / DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228).

    m = β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l) − λ·max(0, log π_ref,w − log π_w)],  ℓ = −log σ(m),
    d_w = β σ(−m)(1 + λ·1[log π_w < log π_ref,w]),  d_l = β σ(−m). Not a single-margin loss (no pair weight).
    """
    below_reference = torch.relu(ref_chosen_logps - chosen_logps)
    m = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps) - lam * below_reference)
    base = (beta * torch.sigmoid(-m)).detach()
    penalty_active = (chosen_logps < ref_chosen_logps).to(base.dtype)
    return MarginLossTerms(-F.logsigmoid(m), base * (1 + lam * penalty_active), base, None)


def cpo_loss(
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float, alpha: float
) -> MarginLossTerms:
    """CPO (Xu et al. 2024, arXiv 2401.08417): a reference-free sigmoid margin plus NLL on the chosen response.

    z = β(log π_w − log π_l),  ℓ = −log σ(z) − α log π_w/|y_w|  (the NLL is the per-token mean, as CPO trains it),
    d_w = β σ(−z) + α/|y_w|,  d_l = β σ(−z). Not a single-margin loss (no pair weight). `rejected_lengths` is taken
    because every length-using loss has the same signature (see `margin_loss`); CPO normalizes by |y_w| only.
    """
    len_w = _lengths(chosen_lengths, chosen_logps)
    z = beta * (chosen_logps - rejected_logps)
    base = (beta * torch.sigmoid(-z)).detach()
    loss = -F.logsigmoid(z) - alpha * chosen_logps / len_w
    return MarginLossTerms(loss, base + alpha / len_w, base, None)


@dataclass(frozen=True)
class MarginLoss:
    """One row of `MARGIN_LOSS_TABLE`: a loss function and what it reads.

    `margin_loss` calls `function(chosen_logps, rejected_logps, [ref_chosen_logps, ref_rejected_logps,]
    [chosen_lengths, rejected_lengths,] beta[, constant])`, the bracketed groups only when `needs_reference`,
    `uses_lengths` and `constant` (a field of `MarginHyperparameters`) say so. `single_margin`: ℓ is a function of one
    margin u only, so the loss has a pair weight c = −∂ℓ/∂u and the pairwise normalized update is defined for it.
    """

    function: Callable[..., MarginLossTerms]
    needs_reference: bool
    uses_lengths: bool
    single_margin: bool
    constant: str | None
    paper: str


# A new loss is one function above plus one row here; the name sets below, the trainer config's `choices` and the
# list in docs/margin.md (checked by tests/test_margin_losses.py) follow from it. DPOP and CPO add a term on the
# chosen response alone, so they are not single-margin losses.
# fmt: off
MARGIN_LOSS_TABLE: dict[str, MarginLoss] = {
    #                   function    reference lengths single constant       paper
    "dpo":   MarginLoss(dpo_loss,   True,     False,  True,  None,          "Rafailov et al. 2023, arXiv 2305.18290"),
    "ipo":   MarginLoss(ipo_loss,   True,     True,   True,  None,          "Azar et al. 2023, arXiv 2310.12036"),
    "slic":  MarginLoss(slic_loss,  True,     False,  True,  None,          "Zhao et al. 2023, arXiv 2305.10425"),
    "simpo": MarginLoss(simpo_loss, False,    True,   True,  "simpo_gamma", "Meng et al. 2024, arXiv 2405.14734"),
    "r_dpo": MarginLoss(r_dpo_loss, True,     True,   True,  "rdpo_alpha",  "Park et al. 2024, arXiv 2403.19159"),
    "dpop":  MarginLoss(dpop_loss,  True,     False,  False, "dpop_lambda", "Pal et al. 2024, arXiv 2402.13228"),
    "cpo":   MarginLoss(cpo_loss,   False,    True,   False, "cpo_alpha",   "Xu et al. 2024, arXiv 2401.08417"),
}
# fmt: on
MARGIN_LOSSES = tuple(MARGIN_LOSS_TABLE)
# Losses that never read the reference model's log-probs.
REFERENCE_FREE_LOSSES = frozenset(name for name, row in MARGIN_LOSS_TABLE.items() if not row.needs_reference)
# Losses of one margin u (ℓ = f(u)); they define the pairwise normalized update below.
PURE_MARGIN_LOSSES = frozenset(name for name, row in MARGIN_LOSS_TABLE.items() if row.single_margin)


def margin_loss(
    name: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    hparams: MarginHyperparameters,
) -> MarginLossTerms:
    """The loss called `name` (a key of `MARGIN_LOSS_TABLE`), called with the arguments its row says it reads."""
    row = MARGIN_LOSS_TABLE.get(name)
    if row is None:
        raise ValueError(f"Unknown margin loss {name!r}; expected one of {MARGIN_LOSSES}.")
    args = [chosen_logps, rejected_logps]
    if row.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"margin loss {name!r} needs the reference log-probs, got None.")
        args += [ref_chosen_logps, ref_rejected_logps]
    if row.uses_lengths:
        args += [chosen_lengths, rejected_lengths]
    args.append(hparams.beta)
    if row.constant is not None:
        args.append(getattr(hparams, row.constant))
    return row.function(*args)


def normalized_pair_surrogate(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    pair_weight: torch.Tensor,
    chosen_grad_norm: torch.Tensor,
    rejected_grad_norm: torch.Tensor,
) -> torch.Tensor:
    """Per-pair surrogate whose gradient is the pairwise normalized update (Yuan et al. 2024, §4.3 of our notes).

    s = −c·log π_w/‖g_w‖ + c·log π_l/‖g_l‖ with c and the norms held constant, so −∇θ s = c(g_w/‖g_w‖ − g_l/‖g_l‖)
    exactly when the norms are the exact per-pair gradient norms. A zero norm means the response does not depend on
    the parameters; its term is dropped instead of dividing by zero.
    """
    inverse_w = _inverse_or_zero(chosen_grad_norm).detach()
    inverse_l = _inverse_or_zero(rejected_grad_norm).detach()
    c = pair_weight.detach()
    return -c * inverse_w * chosen_logps + c * inverse_l * rejected_logps


def first_order_deltas(
    d_chosen: torch.Tensor,
    d_rejected: torch.Tensor,
    inner: torch.Tensor,
    chosen_norm_sq: torch.Tensor,
    rejected_norm_sq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Δlog π_w and Δlog π_l per unit step size for the update d_w g_w − d_l g_l (see the module doc)."""
    return d_chosen * chosen_norm_sq - d_rejected * inner, d_chosen * inner - d_rejected * rejected_norm_sq


def normalized_update_coefficients(
    pair_weight: torch.Tensor, chosen_norm_sq: torch.Tensor, rejected_norm_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_w, d_l) of the normalized update c(g_w/‖g_w‖ − g_l/‖g_l‖): c/‖g_w‖ and c/‖g_l‖ (0 for a zero gradient).

    With them `first_order_deltas` gives Δlog π_w = c‖g_w‖(1 − cos) ≥ 0 and Δlog π_l = −c‖g_l‖(1 − cos) ≤ 0 for c ≥ 0.
    """
    d_w = pair_weight * _inverse_or_zero(chosen_norm_sq.sqrt())
    d_l = pair_weight * _inverse_or_zero(rejected_norm_sq.sqrt())
    return d_w, d_l


def _inverse_or_zero(norm: torch.Tensor) -> torch.Tensor:
    """1/norm where norm > 0, else 0. The exact inverse for every positive norm, however small: clamping the
    denominator instead would change the update direction for norms below the clamp (and torch.where evaluates both
    branches, so the zero branch must not divide by zero either)."""
    positive = norm > 0
    return torch.where(positive, 1.0 / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def condition_ratio(inner: torch.Tensor, chosen_norm_sq: torch.Tensor, rejected_norm_sq: torch.Tensor) -> torch.Tensor:
    """The paper's "Grad_Condition" ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²); < 1 is the ideal regime when d_w = d_l.

    The official analysis script divides by min(‖g_w‖², ‖g_w‖²) (the chosen norm twice); the intended and used
    denominator here is the minimum over both responses.

    Defined as 0 where min(‖g_w‖², ‖g_l‖²) = 0 (0/0 otherwise), as `cosine` is: then ⟨g_w, g_l⟩ = 0 by
    Cauchy-Schwarz and the two gradients share no direction. The ratio alone does not give the regime of such a pair
    (a zero g_w cannot rise); `first_order_deltas` does. The gradient there is 0 as well, not NaN.
    """
    denominator = torch.minimum(chosen_norm_sq, rejected_norm_sq)
    return inner * _inverse_or_zero(denominator)


def cosine(inner: torch.Tensor, chosen_norm_sq: torch.Tensor, rejected_norm_sq: torch.Tensor) -> torch.Tensor:
    """cos(g_w, g_l) = ⟨g_w, g_l⟩ / (‖g_w‖ ‖g_l‖), from the inner product and the two squared norms.

    Defined as 0 where either norm is 0 (0/0 otherwise): a zero vector is orthogonal to every vector. The square
    roots are taken of the positive norms only, so the gradient there is 0 as well, not NaN (d√x/dx is infinite at 0).
    """
    positive = (chosen_norm_sq > 0) & (rejected_norm_sq > 0)
    safe_w = torch.where(positive, chosen_norm_sq, torch.ones_like(chosen_norm_sq))
    safe_l = torch.where(positive, rejected_norm_sq, torch.ones_like(rejected_norm_sq))
    return torch.where(positive, inner / (safe_w.sqrt() * safe_l.sqrt()), torch.zeros_like(inner))
