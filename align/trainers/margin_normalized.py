"""The one-backward pairwise normalized update of `MarginPreferenceTrainer` (`normalize_pair_gradients`).

The update of a micro-batch of B pairs is (Yuan et al. 2024, arXiv 2410.13828; docs/margin.md "The fix")

    −ḡ = (1/B) Σ_i c_i (g_w,i/‖g_w,i‖ − g_l,i/‖g_l,i‖),     g = ∇θ log π (sequence log-prob), c = pair weight,

i.e. ḡ = Σ_n w_n g_n over the 2B sequences with w = −c_i/(B‖g_w,i‖) for a chosen response and +c_i/(B‖g_l,i‖) for a
rejected one (0 for a zero gradient): the gradient of the per-sequence path's `normalized_pair_surrogate(...).mean()`.
When every trainable parameter is a bias-free linear weight (PEFT LoRA), `align.per_sample_grads` gets every ‖g_n‖
and ḡ from the policy forward TRL runs anyway plus one backward to the layer outputs, instead of one forward and
backward per sequence.
"""

from __future__ import annotations

import torch

from align.losses.margin import normalized_update_coefficients
from align.per_sample_grads import LinearGradTape, unsupported_reason


def one_backward_blocker(trainer, unwrapped: torch.nn.Module) -> str | None:
    """Why the one-backward path would not be exact for this trainer (None: it is)."""
    args = trainer.args
    if args.entanglement_params != "trainable":
        # The per-sequence path normalizes over the regex's parameters but updates every trainable one.
        return "entanglement_params is a regular expression"
    if trainer.aux_loss_enabled:
        return "the MoE aux loss adds a gradient outside the pair log-probs"
    if args.gradient_checkpointing:
        return "gradient checkpointing"
    if args.ddp_static_graph:
        # DDP's static-graph sink queues its delayed all-reduce on the first backward through the model outputs,
        # which here would be the autograd.grad to the layer outputs, before any gradient exists.
        return "ddp_static_graph"
    return unsupported_reason(unwrapped, trainer._selected_params)


def one_backward_normalized_loss(
    loss: torch.Tensor,
    tape: LinearGradTape,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    pair_weight: torch.Tensor,
) -> torch.Tensor:
    """A loss whose value is `loss` and whose gradient w.r.t. each recorded parameter p is ḡ_p = Σ_n w_n G_n,p.

    `tape` recorded the policy forward that produced the (B,) `chosen_logps` and `rejected_logps` (the batch is
    [chosen; rejected]). One `autograd.grad` of their sum to the recorded layer outputs gives the factors of every
    G_n,p, hence ‖g_n‖² = Σ_p ‖G_n,p‖², the weights w and ḡ_p (module doc). The result is
    loss.detach() + Σ_p ⟨p, ḡ_p⟩ − (the same, detached), so the Trainer's backward only writes ḡ_p (times its 1/GA)
    into each `.grad`. That autograd.grad frees the forward's graph: nothing may backpropagate through it again.

    Gradient accumulation: each micro-batch's backward adds its ḡ/GA to `.grad`, as the per-sequence path's surrogate
    does. DDP: the `autograd.grad` runs only the nodes between the log-probs and the layer outputs, never a parameter's
    AccumulateGrad node, so none of DDP's reducer hooks fire there; the Trainer's backward of ⟨p, ḡ_p⟩ ends in every
    used trainable parameter's AccumulateGrad node, whose hooks fire as after an ordinary backward (and inside
    `no_sync` they wait for the last micro-batch), so DDP averages ḡ over the processes as usual.
    """
    if tape.num_calls == 0:
        raise RuntimeError("normalize_pair_gradients: the policy forward called none of the trainable layers.")
    num_pairs = chosen_logps.size(0)
    grads = tape.gradients(torch.cat([chosen_logps, rejected_logps]))
    norm_sq = grads.squared_norms().to(chosen_logps.device)
    d_w, d_l = normalized_update_coefficients(pair_weight.detach().double(), norm_sq[:num_pairs], norm_sq[num_pairs:])
    weights = torch.cat([-d_w, d_l]) / num_pairs
    # A parameter no recorded call reached gets no term: its gradient stays None, as after an ordinary backward.
    terms = [(p * g).sum() for p, g in zip(tape.params, grads.weighted_sum(weights), strict=True) if g is not None]
    surrogate = torch.stack(terms).sum()
    return loss.detach() + (surrogate - surrogate.detach())
