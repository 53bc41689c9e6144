"""Per-sample gradients of bias-free `nn.Linear` weights from one batched backward (LoRA's `lora_A`/`lora_B` are such).

A linear layer computes z = a Wᵀ, a: (..., in), z: (..., out), so for any scalar f, ∂f/∂W = Σ_t δ_t a_tᵀ with
δ_t = ∂f/∂z_t. Take f = Σ_n y_n for a per-sample objective y (e.g. the N sequence log-probs of a micro-batch) whose
value y_n depends on batch row n only. Then δ_{n,t} = ∂y_n/∂z_{n,t}, and the gradient of sample n alone is

    G_n = Σ_t δ_{n,t} a_{n,t}ᵀ       (Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799)

from the activations a and the output gradients δ of ONE backward, `torch.autograd.grad(y.sum(), outputs)`, which
stops at the layers' outputs (no parameter's `.grad` is touched, no DDP hook fires). A layer called several times in
one forward contributes one such sum per call: concatenating the calls along t keeps the formula.

`LinearGradTape` records (a, z) of each call during a forward; `PerSampleGrads` then gives, module by module
without holding every G_n at once:

- ⟨G_n, G_m⟩ and ‖G_n‖², either from G_n itself or, when that is cheaper, without it (the "ghost norm" of Li, Tramèr,
  Liang, Hashimoto 2022, arXiv 2110.05679): ⟨G_n, G_m⟩ = Σ_{t,s} (a_{n,t}·a_{m,s})(δ_{n,t}·δ_{m,s});
- Σ_n w_n G_n = (w ⊙ δ)ᵀ a, one matmul with the cost of an ordinary weight gradient, without any G_n.

Everything is computed in float32 (float64 for the sums of inner products), outside autocast.

The tape sees module calls only: a weight read outside its module's forward (TRL's fused LM head reads
`lm_head.weight` directly) or recomputed by activation checkpointing would be missed; `unsupported_reason` refuses
both, and any parameter that is not the weight of a plain `nn.Linear` with no trainable bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _linear_owners(model: nn.Module, params: list[nn.Parameter]) -> dict[int, list[nn.Module]]:
    """For each parameter (by id), the modules of `model` whose `.weight` it is (several when tied)."""
    wanted = {id(p) for p in params}
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in wanted:
            owners.setdefault(id(weight), []).append(module)
    return owners


def unsupported_reason(model: nn.Module, params: list[nn.Parameter]) -> str | None:
    """Why `LinearGradTape` cannot give exact per-sample gradients of `params` in `model`, or None when it can.

    It can when every parameter is the `.weight` of a plain `nn.Linear` (not a subclass, whose forward may differ)
    whose bias is absent or frozen, none is the output embedding (TRL's fused LM head reads that weight directly),
    and the model does not use gradient checkpointing (its recomputation would call the layers again in backward).
    """
    if not params:
        return "no parameters"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing recomputes the layers during backward"
    names = {id(p): name for name, p in model.named_parameters()}
    owners = _linear_owners(model, params)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_weight = getattr(head, "weight", None)
    for p in params:
        name = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
        modules = owners.get(id(p))
        if not modules:
            return f"{name} is not the weight of an nn.Linear"
        if p is head_weight:
            return f"{name} is the output embedding, which the fused LM head reads outside its module"
        for module in modules:
            if type(module) is not nn.Linear:
                return f"{name} is the weight of {type(module).__name__}, not of a plain nn.Linear"
            if module.bias is not None and module.bias.requires_grad:
                return f"{name} belongs to an nn.Linear with a trainable bias"
    return None


@dataclass
class _Call:
    activations: torch.Tensor  # the layer's input a, detached
    output: torch.Tensor  # the layer's output, still in the autograd graph
    versions: tuple[int, int]  # in-place counters at record time: a later in-place change would make δ or a wrong


class LinearGradTape:
    """Context manager recording every call of the linear layers owning `params` during a forward.

    Usage: `with tape: y = per_sample_objective(model(batch))`, then `grads = tape.gradients(y)`. Only calls made
    with gradients enabled and an output that requires grad are recorded (a `no_grad` reference forward is not).
    The hooks live only inside the `with` block; the recorded tensors until `gradients` (or `clear`).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        reason = unsupported_reason(model, params)
        if reason is not None:
            raise ValueError(f"LinearGradTape cannot take per-sample gradients here: {reason}.")
        self.params = list(params)
        owners = _linear_owners(model, self.params)
        self._owners = [owners[id(p)] for p in self.params]
        self._modules = list({id(m): m for modules in self._owners for m in modules}.values())
        self._calls: dict[int, list[_Call]] = {}
        self._handles = []

    def __enter__(self) -> LinearGradTape:
        self._handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in self._modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module, args, kwargs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        activations = (args[0] if args else kwargs["input"]).detach()
        call = _Call(activations, output, (activations._version, output._version))
        self._calls.setdefault(id(module), []).append(call)

    @property
    def num_calls(self) -> int:
        return sum(len(calls) for calls in self._calls.values())

    def clear(self) -> None:
        self._calls = {}

    def gradients(self, per_sample: torch.Tensor, retain_graph: bool = False) -> PerSampleGrads:
        """One backward of `per_sample.sum()` (shape (N,), sample n from batch row n) to the recorded outputs.

        With `retain_graph=False` the forward's graph is freed: the caller must not backpropagate through it again.
        """
        if per_sample.dim() != 1:
            raise ValueError(
                f"per_sample must be a vector of one value per sample, got shape {tuple(per_sample.shape)}"
            )
        calls = [call for calls in self._calls.values() for call in calls]
        if not calls:  # no layer ran with gradients: every G is 0
            return PerSampleGrads(self.params, [None] * len(self.params), per_sample.size(0))
        for call in calls:
            if (call.activations._version, call.output._version) != call.versions:
                raise RuntimeError("A recorded linear input or output was modified in place after its forward.")
        outputs = [c.output for c in calls]
        deltas = torch.autograd.grad(per_sample.sum(), outputs, allow_unused=True, retain_graph=retain_graph)
        delta_of = {id(c): d for c, d in zip(calls, deltas, strict=True)}
        num = per_sample.size(0)
        factors = []
        for modules in self._owners:
            # An output that does not reach y (allow_unused) has δ = 0.
            pieces = [
                (c.activations, torch.zeros_like(c.output) if delta_of[id(c)] is None else delta_of[id(c)])
                for m in modules
                for c in self._calls.get(id(m), [])
            ]
            factors.append(_concatenate(pieces, num) if pieces else None)
        self.clear()
        return PerSampleGrads(self.params, factors, num)


def _concatenate(pieces, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, δ) of all calls as (N, T, in) and (N, T, out), the calls side by side along T, in their own dtypes (each
    layer's pair is cast to float32 only while it is used, so a bf16 model holds no float32 copy of every layer)."""
    activations, deltas = [], []
    for a, delta in pieces:
        if a.size(0) != num:
            raise ValueError(
                f"A linear layer was called on a batch of {a.size(0)} rows for {num} samples: per-sample gradients "
                "need sample n in batch row n (no packing or padding-free batches)."
            )
        activations.append(a.reshape(num, -1, a.size(-1)))
        deltas.append(delta.reshape(num, -1, delta.size(-1)))
    if len(activations) == 1:
        return activations[0], deltas[0]
    return torch.cat(activations, dim=1), torch.cat(deltas, dim=1)


class PerSampleGrads:
    """The per-sample gradients G_{n,p} of `params` as factors (a, δ) per parameter (None: no recorded call, G = 0)."""

    def __init__(self, params: list[nn.Parameter], factors: list, num_samples: int):
        self.params = params
        self.factors = factors
        self.num_samples = num_samples

    def _no_autocast(self):
        device = next((a.device for f in self.factors if f is not None for a in f[:1]), torch.device("cpu"))
        return torch.autocast(device_type=device.type, enabled=False)

    def inner_products(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """⟨g_{left[k]}, g_{right[k]}⟩ summed over all parameters, float64 of shape (K,), on the parameters' device.

        Per layer, from G_n when out·in ≤ T·(in + out) (then G costs no more than the recorded a and δ), otherwise
        from the token Gram matrices Σ_{t,s}(a_{n,t}·a_{m,s})(δ_{n,t}·δ_{m,s}) without G.
        """
        left = torch.as_tensor(left, dtype=torch.long)
        right = torch.as_tensor(right, dtype=torch.long)
        total = None
        with torch.no_grad(), self._no_autocast():
            for factor in self.factors:
                if factor is None:
                    continue
                a, delta = factor[0].float(), factor[1].float()
                index_l, index_r = left.to(a.device), right.to(a.device)
                tokens, fan_in, fan_out = a.size(1), a.size(2), delta.size(2)
                if fan_out * fan_in <= tokens * (fan_in + fan_out):
                    grads = torch.bmm(delta.transpose(1, 2), a)  # (N, out, in): every G_n of this layer
                    value = (grads[index_l] * grads[index_r]).sum(dim=(1, 2))
                else:
                    gram_a = torch.bmm(a[index_l], a[index_r].transpose(1, 2))
                    gram_delta = torch.bmm(delta[index_l], delta[index_r].transpose(1, 2))
                    value = (gram_a * gram_delta).sum(dim=(1, 2))
                total = value.double() if total is None else total + value.double()
        if total is None:
            return torch.zeros(left.size(0), dtype=torch.float64)
        return total

    def squared_norms(self) -> torch.Tensor:
        """‖g_n‖² = Σ_p ‖G_{n,p}‖² for every sample, float64 of shape (N,)."""
        every = torch.arange(self.num_samples)
        return self.inner_products(every, every)

    def weighted_sum(self, weights: torch.Tensor) -> list[torch.Tensor | None]:
        """Σ_n w_n G_{n,p} = (w ⊙ δ)ᵀ a per parameter, in the parameter's dtype (None for a parameter never called)."""
        sums = []
        with torch.no_grad(), self._no_autocast():
            for p, factor in zip(self.params, self.factors, strict=True):
                if factor is None:
                    sums.append(None)
                    continue
                a, delta = factor[0].float(), factor[1].float()
                scaled = delta * weights.to(delta.device, torch.float32)[:, None, None]
                total = scaled.reshape(-1, delta.size(-1)).T @ a.reshape(-1, a.size(-1))
                sums.append(total.to(p.dtype))
        return sums
