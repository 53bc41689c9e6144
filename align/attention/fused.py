"""`entropy_fused`: fused (flash-style) attention that records exact per-row attention entropy without a T x T tensor.

For one query row with scores s_j = scale * q.k_j / t over the keys it may see, p = softmax(s) and LSE = log sum_j
exp(s_j), the row entropy is

    H = -sum_j p_j log p_j = -sum_j p_j (s_j - LSE) = LSE - sum_j p_j s_j,
    sum_j p_j s_j = (scale / t) * q . (sum_j p_j k_j)

so it needs only the row's log-sum-exp, which fused attention kernels compute anyway, and one more attention call
with the keys as values (sum_j p_j k_j). Written with stop-gradients (bars: detached),

    H = LSE-bar - (scale / t) * q-bar . attention(q, k, value=k-bar)

has the value of H and exactly H's gradient through the softmax: dH = dLSE - sum_j dp_j s_j - sum_j p_j ds_j and
dLSE = sum_j p_j ds_j, so dH = -sum_j dp_j s_j, which is the differential of the stop-gradient form (only p moves).
No custom backward is needed; masks, grouped-query attention and the learned temperature (here: q / t per head,
which equals dividing the scores) carry over, and masked keys have p_j = 0. Checked against `entropy_eager` to 1e-15
in float64 (tests/test_fused_entropy_attention.py). Soft-capped scores break the linearity in q, and attention sinks
and training-time dropout change the rows, so those calls go to `entropy_eager` (logged once).

Kernels: on CPU `aten._scaled_dot_product_flash_attention_for_cpu` returns (output, logsumexp), differentiable and
with native GQA; elsewhere `scaled_dot_product_attention` gives the output and sum_j p_j k_j and the LSE comes from a
no-grad blockwise pass over query blocks (`blockwise_score_stats`, O(T * block) memory). The max attention logit
(Wortsman et al. 2024) needs a blockwise pass over QK^T too (costly: docs/attention_entropy.md), so it is computed
only when the open recorder asks for it (`AttentionEntropyRecorder.record_max_logit`); otherwise it is -inf.

The mask registered with `AttentionMaskInterface` is transformers' `sdpa_mask`: None when causal alone suffices (no
padding: nothing of size T x T exists), otherwise one (batch, 1, T, T) mask shared by all layers, made additive
(0 / -inf) once per forward on CPU, where the kernel requires the query's dtype.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from align.attention import kernel as eager
from align.attention.parameters import attached_temperature
from align.attention.recorder import LayerRecord, active_recorder


ATTENTION_IMPLEMENTATION = "entropy_fused"
# `attention_entropy_kernel` values and the attention implementations they select.
KERNELS = {"fused": ATTENTION_IMPLEMENTATION, "eager": eager.ATTENTION_IMPLEMENTATION}
# Query rows per block of the no-grad passes over QK^T: (batch, heads, QUERY_BLOCK, keys) scores at a time.
QUERY_BLOCK = 256
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

logger = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()
# The last mask converted to another dtype (weak references: source, converted): one mask per forward serves every
# layer, so under autocast the layers share one converted copy (and autograd saves it once) instead of one each.
_last_conversion: list[tuple] = []


def entropy_fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Fused attention with the same output as sdpa, recording row entropies by the LSE identity (module docstring).

    Shapes as in transformers: query (batch, heads, queries, dim), key/value (batch, kv_heads, keys, dim). A None
    mask means causal attention (as for sdpa) unless the module or `is_causal` says otherwise.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    queries = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and queries > 1
    if causal and key.shape[2] > queries:  # prefill into an empty static cache: the later keys are empty (as sdpa)
        key, value = key[:, :, :queries], value[:, :, :queries]
    reason = _eager_only(module, softcap, dropout, kwargs)
    if reason is not None:
        _log_fallback_once(reason)
        mask = _additive_mask(attention_mask, causal, query, key)
        return eager.entropy_eager_attention(module, query, key, value, mask, scaling, dropout, softcap, **kwargs)

    if torch.is_autocast_enabled(query.device.type):  # what autocast does to scaled_dot_product_attention
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    temperature = attached_temperature(module)
    if temperature is not None:  # scale / t on the scores = q / t per head (differentiable in t)
        query = query / temperature.to(query.dtype).view(1, -1, 1, 1)
    use_cpu_kernel = query.device.type == "cpu" and query.dtype in _CPU_KERNEL_DTYPES
    use_cpu_kernel = use_cpu_kernel and value.shape[-1] == query.shape[-1]
    mask = _kernel_mask(attention_mask, query.dtype if use_cpu_kernel else None)

    recorder = active_recorder()
    if not (torch.is_grad_enabled() or (recorder is not None and recorder.include_no_grad)):
        output = _attention(query, key, value, mask, causal, scaling, use_cpu_kernel)[0]
        return output.transpose(1, 2).contiguous(), None

    # Always when gradients are on, recorder or not: checkpoint recomputation must replay the same operations.
    output, log_sum_exp = _attention(query, key, value, mask, causal, scaling, use_cpu_kernel)
    with torch.profiler.record_function("attention_entropy"):
        mean_key = _attention(query, key, key.detach(), mask, causal, scaling, use_cpu_kernel)[0]
        if log_sum_exp is None:
            log_sum_exp = blockwise_score_stats(query, key, mask, causal, scaling)[0]
        wide = torch.promote_types(query.dtype, torch.float32)  # the difference cancels: at least float32
        dot = (query.detach().to(wide) * mean_key.to(wide)).sum(-1)
        entropy = log_sum_exp.detach().to(wide) - scaling * dot
        if recorder is not None and recorder.accepts():
            with torch.no_grad():
                valid, visible = row_masks(mask, causal, query, key)
                max_logit = torch.tensor(-math.inf, device=query.device)
                if recorder.record_max_logit:
                    with torch.profiler.record_function("attention_max_logit"):
                        max_logit = blockwise_score_stats(query, key, mask, causal, scaling, valid, lse=False)[1]
                recorder.add(LayerRecord(module.layer_idx, entropy, valid, visible, max_logit.float()))
    return output.transpose(1, 2).contiguous(), None


def _attention(query, key, value, mask, causal, scale, use_cpu_kernel):
    """(output, logsumexp or None): the CPU flash kernel (GQA native) or `scaled_dot_product_attention`."""
    if use_cpu_kernel:
        output, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask, scale=scale
        )
        return output, log_sum_exp
    groups = query.shape[1] // key.shape[1]
    key, value = eager.repeat_kv(key, groups), eager.repeat_kv(value, groups)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scale), None


@torch.no_grad()
def blockwise_score_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    valid: torch.Tensor | None = None,
    lse: bool = True,
    block: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row log-sum-exp (batch, heads, queries) or None, max logit over `valid` rows), without gradients.

    Scores s = scale * q.k are formed for `block` query rows at a time, (batch, heads, block, keys), never the whole
    QK^T; causal blocks stop at their last query's key. Rows that see no key get LSE 0, as the flash kernels give.
    """
    block = block or QUERY_BLOCK
    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups, queries, dim)
    key_t = key.transpose(-1, -2)
    wide = torch.promote_types(query.dtype, torch.float32)
    sums = torch.empty(batch, heads, queries, dtype=wide, device=query.device) if lse else None
    best = torch.tensor(-math.inf, device=query.device)
    for start in range(0, queries, block):
        stop = min(start + block, queries)
        width = stop if causal else keys
        rows = grouped[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), dim) * scale
        # one batched matmul per KV head group, then masked in place (no further block-sized temporaries)
        scores = torch.matmul(rows, key_t[..., :width]).view(batch, heads, stop - start, width).to(wide)
        if mask is not None:
            piece = mask[:, :, start:stop, :width]
            scores.masked_fill_(~piece, -math.inf) if piece.dtype == torch.bool else scores.add_(piece)
        elif causal:  # only the diagonal tile has hidden keys
            later = torch.arange(start, stop, device=query.device)
            scores[..., start:stop].masked_fill_(later > later[:, None], -math.inf)
        if lse:
            block_lse = torch.logsumexp(scores, -1)
            sums[:, :, start:stop] = block_lse.masked_fill(block_lse == -math.inf, 0.0)
        row_max = scores.amax(-1)
        if valid is not None:
            row_max = row_max.masked_fill(~valid[:, None, start:stop], -math.inf)
        best = torch.maximum(best, row_max.amax())
    return sums, best


def row_masks(mask: torch.Tensor | None, causal: bool, query: torch.Tensor, key: torch.Tensor):
    """(valid query rows, visible key counts), both (batch, queries): from positions when there is no mask, else by
    reductions over the (batch, 1, queries, keys) mask (`entropy_eager`'s rule: padding rows cannot see themselves)."""
    batch, queries, keys = query.shape[0], query.shape[2], key.shape[2]
    if mask is not None:
        return eager.row_masks(mask, batch, queries, keys, query.device)
    valid = torch.ones(batch, queries, dtype=torch.bool, device=query.device)
    if not causal:
        return valid, torch.full((batch, queries), keys, dtype=torch.long, device=query.device)
    return valid, torch.arange(1, queries + 1, device=query.device).expand(batch, queries)


def _eager_only(module: nn.Module, softcap, dropout: float, kwargs: dict) -> str | None:
    """Why this call must run eager attention (the identity does not cover it), or None."""
    if softcap is not None:
        return "score soft-capping (tanh) is not linear in q, so the LSE identity does not give the entropy"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (`s_aux`) add a softmax column"
    if dropout > 0 and module.training:
        return f"attention dropout {dropout} in training changes the rows the fused kernel would use"
    return None


def _log_fallback_once(reason: str) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        logger.warning("%s: %s; using %s for these layers.", ATTENTION_IMPLEMENTATION, reason, KERNELS["eager"])


def _kernel_mask(mask: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The mask as the kernel takes it: additive in `dtype` for the CPU kernel (dtype given), else as it is."""
    if mask is None or dtype is None or mask.dtype == dtype:
        return mask
    if _last_conversion:
        source, converted_dtype, converted = _last_conversion[0]
        if source() is mask and converted_dtype == dtype and converted() is not None:
            return converted()
    if mask.dtype == torch.bool:
        converted = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    else:
        converted = mask.to(dtype)
    _last_conversion[:] = [(weakref.ref(mask), dtype, weakref.ref(converted))]
    return converted


def _additive_mask(mask, causal: bool, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The mask `entropy_eager` expects (additive, or None for full attention), for a fallback call."""
    if mask is None and causal:
        queries, keys = query.shape[2], key.shape[2]
        mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)[None, None]
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(query.dtype).min
    )


def fused_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """transformers' `sdpa_mask` (None when causal alone suffices), made additive once per forward on CPU."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    on_cpu = mask is not None and mask.device.type == "cpu" and dtype in _CPU_KERNEL_DTYPES
    return _kernel_mask(mask, dtype) if on_cpu else mask


def register() -> None:
    """Register `entropy_fused` (attention + sdpa-style mask) with transformers; idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, entropy_fused_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, fused_mask)


register()
