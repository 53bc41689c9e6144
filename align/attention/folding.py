"""Folding learned per-head attention temperatures into the query projections, for a plain checkpoint.

softmax(q.k / (t sqrt(d))) with q = W_q x + b equals softmax(q'.k / sqrt(d)) with q' = (W_q x + b) / t, and rotary
embeddings are linear in q, so dividing each head's rows of W_q (and b) by its t gives an ordinary model computing
the same function. That needs a plain `q_proj` Linear with one block of rows per head and no query normalization
(a `q_norm` after the projection would undo the scaling): `check_foldable`.
"""

from __future__ import annotations

import torch
from torch import nn

from align.attention.modules import attention_modules
from align.attention.parameters import AttentionEntropyParameters


def check_foldable(model: nn.Module) -> None:
    """Raise ValueError unless every attention module of `model` can take its temperatures into `q_proj`."""
    heads = model.config.get_text_config().num_attention_heads
    for module in attention_modules(model):
        projection = getattr(module, "q_proj", None)
        if not isinstance(projection, nn.Linear) or hasattr(module, "q_norm") or projection.out_features % heads:
            raise ValueError(
                f"attention_entropy_learnable_temperature cannot be folded into {type(module).__name__}: it needs a "
                "plain `q_proj` Linear with one block of rows per head and no query normalization (`q_norm`)."
            )


@torch.no_grad()
def fold_attention_temperature(model: nn.Module, parameters: AttentionEntropyParameters) -> None:
    """Divide each head's query projection by its learned temperature, then reset the temperatures to 1."""
    if parameters.log_temperature is None:
        return
    for module in attention_modules(model):
        projection = module.q_proj
        temperature = torch.exp(parameters.log_temperature[module.layer_idx]).to(projection.weight.dtype)
        heads = temperature.numel()
        scale = (1 / temperature).repeat_interleave(projection.out_features // heads)
        projection.weight.mul_(scale[:, None])
        if projection.bias is not None:
            projection.bias.mul_(scale)
    parameters.log_temperature.zero_()
