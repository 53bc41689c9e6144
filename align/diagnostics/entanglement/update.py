"""What the real optimizer step did to a diagnosed pair's log-probs, and where it came from.

The paper's prediction (`prediction`) is the pair's own plain-gradient step. The real step is the optimizer's parameter
change Δθ = θ_after − θ_before over the whole batch, so its first-order effect on a response is

    Δlog π ≈ g · Δθ,     g = ∇θ log π(y|x) at θ_before,

which should get the sign of the measured change right whenever that change is above float resolution.

Decomposition. For Adam/AdamW (torch.optim), step t with learning rate η, betas (β1, β2), ε, weight decay λ and the
clipped batch gradient G:

    m_t = β1 m_{t−1} + (1 − β1) G,    v_t = β2 v_{t−1} + (1 − β2) G²,
    P_t = 1 / (sqrt(v_t / (1 − β2^t)) + ε),
    Δθ  = −η λ θ_before  −  η/(1 − β1^t) · P_t ⊙ (β1 m_{t−1} + (1 − β1) G)          (AdamW: decoupled λ)

With the preconditioner P_t fixed at its value of step t, Δθ is affine in G, so it splits exactly into

    weight decay  −η λ θ_before                       (Adam without decoupling: −η κ P_t ⊙ λ θ_before instead)
    momentum      −η β1/(1 − β1^t) · P_t ⊙ m_{t−1}     (the optimizer's memory of earlier batches)
    this batch    −η κ P_t ⊙ G,  κ = (1 − β1)/(1 − β1^t)

and the batch term splits again by pairs, since G = s Σ_j ∇ℓ_j / (B · GA · W) (s the gradient-clipping factor,
B pairs per micro-batch, GA accumulation steps, W processes): the pair's own contribution is −η κ P_t ⊙ (scale · ∇ℓ_i)
with ∇ℓ_i = −(d_w g_w − d_l g_l), and the rest of the batch is the remainder. Only the own term is what the paper
analyses; "other pairs" is the cross-pair entanglement. (v_t itself contains G², so P_t depends on the batch; holding
it fixed is what makes the split linear, and is exact for the step that was taken.) Plain SGD is the case P = 1,
κ = 1 (or 1 − dampening after the first step with momentum), with a momentum buffer instead of m.

Other optimizers (or DeepSpeed's, whose gradients are partitioned away from `.grad`) get the prediction from Δθ but no
decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


Vectors = list[torch.Tensor]  # one tensor per diagnosed parameter, in the parameter order


def dot(a: Vectors, b: Vectors) -> float:
    """Σ_p ⟨a_p, b_p⟩ in float64."""
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b, strict=True)))


def _combine(pairs: list[tuple[float, Vectors]]) -> Vectors:
    """Σ_k coefficient_k · vectors_k."""
    out = [torch.zeros_like(t, dtype=torch.float32) for t in pairs[0][1]]
    for coefficient, vectors in pairs:
        for o, v in zip(out, vectors, strict=True):
            o.add_(v.float(), alpha=coefficient)
    return out


@dataclass
class UpdateModel:
    """The step's Δθ as an affine map of the batch gradient: Δθ = batch_term(G) + momentum + weight_decay."""

    optimizer: str
    # Per parameter, the linear map of a gradient-like vector v to its contribution to Δθ: coefficient ⊙ v.
    gradient_coefficient: Vectors
    weight_decay: Vectors

    def batch_term(self, gradient: Vectors) -> Vectors:
        return [c * g.float() for c, g in zip(self.gradient_coefficient, gradient, strict=True)]


def unsupported_reason(optimizer) -> str | None:
    """None when `update_model` can decompose this optimizer's step, else why not (one line)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not isinstance(inner, (torch.optim.Adam, torch.optim.SGD)):
        return f"{type(inner).__name__} (decomposed: torch Adam, AdamW, SGD)"
    for group in inner.param_groups:
        if group.get("maximize"):
            return f"{type(inner).__name__} with maximize=True"
        if isinstance(inner, torch.optim.SGD) and group.get("nesterov"):
            return "SGD with nesterov=True"
    return None


def sgd_buffers_exist(optimizer, params: list[torch.nn.Parameter]) -> list[bool]:
    """Before the step: whether SGD's momentum buffer of each parameter exists (its first step skips dampening)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [inner.state.get(p, {}).get("momentum_buffer") is not None for p in params]


def update_model(
    optimizer, params: list[torch.nn.Parameter], theta_before: Vectors, buffers_existed: list[bool] | None = None
) -> UpdateModel:
    """The affine map of the step that `optimizer` has just taken (call it right after `optimizer.step()`).

    `buffers_existed`: `sgd_buffers_exist` before the step (SGD with momentum only).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    coefficients, decay = [], []
    buffers_existed = buffers_existed or [False] * len(params)
    for param, before, existed in zip(params, theta_before, buffers_existed, strict=True):
        group, state = group_of[id(param)], inner.state.get(param, {})
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if isinstance(inner, torch.optim.Adam):
            beta1, beta2 = group["betas"]
            step = float(state["step"])
            second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            precondition = 1.0 / (second.float().sqrt() / math.sqrt(1 - beta2**step) + group["eps"])
            gradient = -lr * (1 - beta1) / (1 - beta1**step) * precondition
            # AdamW shrinks θ before its step; Adam adds λθ to the gradient, which is then preconditioned.
            decoupled = group.get("decoupled_weight_decay", isinstance(inner, torch.optim.AdamW))
            weight = -lr * wd * before.float() if decoupled else gradient * wd * before.float()
        else:  # SGD: buffer = μ·buffer + (1 − dampening)·(G + λθ), first step buffer = G + λθ; Δθ = −η·buffer
            momentum, dampening = float(group["momentum"]), float(group["dampening"])
            scale = 1.0 - dampening if momentum != 0 and existed else 1.0
            gradient = torch.full_like(before, -lr * scale, dtype=torch.float32)
            weight = gradient * wd * before.float()
        coefficients.append(gradient)
        decay.append(weight)
    return UpdateModel(type(inner).__name__, coefficients, decay)


@dataclass
class PairUpdate:
    """Projections g · (term) of one response, in nats per step (first order)."""

    predicted: float
    own: float | None = None
    other_pairs: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None


def decompose(
    delta: Vectors,
    gradients: list[tuple[Vectors, Vectors]],
    pair_loss_gradients: list[Vectors | None],
    batch_gradient: Vectors | None,
    model: UpdateModel | None,
) -> list[tuple[PairUpdate, PairUpdate]]:
    """(chosen, rejected) `PairUpdate` of each diagnosed pair.

    `delta`: the real Δθ. `gradients[k]`: (g_w, g_l) of pair k. `pair_loss_gradients[k]`: the pair's own share of the
    batch gradient G (scale · ∇ℓ_k, None when its loss coefficients are unknown). `batch_gradient`: G as the optimizer
    saw it (after clipping and the cross-process reduction). Without `model` or G, only the prediction is given.
    """
    if model is not None and batch_gradient is not None:
        batch = model.batch_term(batch_gradient)
        momentum = [d.float() - b - w for d, b, w in zip(delta, batch, model.weight_decay, strict=True)]
    out = []
    for (g_w, g_l), own_gradient in zip(gradients, pair_loss_gradients, strict=True):
        pair = []
        for g in (g_w, g_l):
            update = PairUpdate(predicted=dot(g, delta))
            if model is not None and batch_gradient is not None:
                update.momentum, update.weight_decay = dot(g, momentum), dot(g, model.weight_decay)
                if own_gradient is not None:
                    own = model.batch_term(own_gradient)
                    update.own = dot(g, own)
                    update.other_pairs = dot(g, batch) - update.own
            pair.append(update)
        out.append((pair[0], pair[1]))
    return out


def pair_loss_gradient(g_w: Vectors, g_l: Vectors, d_w: float, d_l: float, scale: float) -> Vectors:
    """scale · ∇ℓ = scale · (−d_w g_w + d_l g_l): the pair's share of the batch gradient."""
    return _combine([(-scale * d_w, g_w), (scale * d_l, g_l)])
