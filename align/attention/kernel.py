"""`entropy_eager`: eager attention that also records per-row attention entropy and applies learned temperatures.

The one entry point is `entropy_eager_attention`, the function transformers calls for
`attn_implementation="entropy_eager"`; importing this module registers it (`register`). It is registered with
transformers' `AttentionInterface` and, which is required, with `AttentionMaskInterface`: without a mask
registration transformers hands a custom implementation no mask at all, neither causal nor padding.

It computes exactly what eager attention computes and, from the same softmax it already has, the entropy of every
attention row (`align.losses.attention_entropy.row_entropy`) plus the largest attention logit (Wortsman et al. 2024,
"Small-scale proxies for large-scale Transformer training instabilities"), which it hands to the open recorder
(`align.attention.recorder`) as one `LayerRecord` per layer. The entropy is computed whenever gradients are enabled,
open recorder or not, so that gradient-checkpoint recomputation replays the same operations as the original forward
(non-reentrant checkpointing requires it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from align.attention.parameters import attached_temperature
from align.attention.recorder import LayerRecord, active_recorder
from align.losses.attention_entropy import row_entropy


ATTENTION_IMPLEMENTATION = "entropy_eager"


def entropy_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (same operations, same output) that also records per-row entropies and the max logit.

    Shapes as in transformers: query (batch, heads, queries, dim), key/value (batch, kv_heads, keys, dim); grouped
    query attention is handled by repeating KV heads. Learnable per-head temperatures attached to `module`
    (`align.attention.parameters`) divide the logits before the soft-cap and the mask (so they can be folded into
    the query projection).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{ATTENTION_IMPLEMENTATION} does not support attention sinks (`s_aux`, e.g. gpt-oss): their extra "
            "softmax column changes the attention rows. Use a model without sinks, or eager attention without entropy."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key_states = repeat_kv(key, groups)
    value_states = repeat_kv(value, groups)

    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    temperature = attached_temperature(module)
    if temperature is not None:
        scores = scores / temperature.to(scores.dtype).view(1, -1, 1, 1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key_states.shape[-2]]
        scores = scores + mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    recorder = active_recorder()
    if torch.is_grad_enabled() or (recorder is not None and recorder.include_no_grad):
        with torch.profiler.record_function("attention_entropy"):
            entropy = row_entropy(weights)
            if recorder is not None and recorder.accepts():
                with torch.no_grad():
                    batch, _, queries, keys = scores.shape
                    valid, visible = row_masks(mask, batch, queries, keys, scores.device)
                    row_max = scores.detach().amax(-1).masked_fill(~valid[:, None, :], -math.inf)
                    recorder.add(LayerRecord(module.layer_idx, entropy, valid, visible, row_max.amax().float()))

    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value_states)
    return output.transpose(1, 2).contiguous(), weights


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim): a KV head serves `groups` query heads."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return (
        states[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)
    )


def row_masks(mask: torch.Tensor | None, batch: int, queries: int, keys: int, device) -> tuple[torch.Tensor, ...]:
    """(valid query rows, visible key counts), both (batch, queries), from a 4-D eager mask.

    A query row is padding when it may not attend to its own position (the diagonal, offset by any cached keys):
    causal and padding masks both keep the diagonal for real tokens and mask it for padding tokens.
    """
    if mask is None:
        return (
            torch.ones(batch, queries, dtype=torch.bool, device=device),
            torch.full((batch, queries), keys, dtype=torch.long, device=device),
        )
    visible = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    visible = visible.expand(batch, queries, keys)
    offset = keys - queries
    rows = torch.arange(queries, device=visible.device)
    return visible[:, rows, rows + offset], visible.sum(-1)


def register() -> None:
    """Register `entropy_eager` (attention + eager mask) with transformers; idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, entropy_eager_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


register()
