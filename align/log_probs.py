"""Per-token log-probs of a causal LM through TRL's fused LM head, without (batch, length, vocab) logits.

TRL's `add_fused_lm_head` makes `model(..., labels=labels, fused_lm_head=True)` return `log_probs[b, t] =
log π(x_{t+1} | x_{≤t})` for every label that is not -100, and 0 elsewhere. The implicit PRM scorer (`align.prm`), its
trainer (`align.trainers.implicit_prm`) and the gradient-entanglement diagnostic (`align.diagnostics.entanglement`)
all read log-probs this way, through `token_log_probs`. The module sits at the top of the package, below trainers/
and diagnostics/, so every room may use it; it imports TRL and PEFT only inside the functions that need them.
"""

from __future__ import annotations

import torch


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def enable_fused_log_probs(model) -> None:
    """Patch TRL's fused LM head onto `model` once (on the base model under PEFT, as TRL's trainers do).

    TRL's trainers patch the models they train themselves; this is for models scored outside a trainer.
    """
    from trl.trainer.utils import add_fused_lm_head

    target = model.get_base_model() if is_peft_model(model) else model
    if not getattr(target, "_align_fused_lm_head", False):
        add_fused_lm_head(target)
        target._align_fused_lm_head = True


def token_log_probs(
    model, input_ids: torch.Tensor, scored: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_kwargs
):
    """Per-token log-probs of the `scored` tokens, from one fused-head forward of `model`.

    Args:
        model: a causal LM carrying TRL's fused LM head (`enable_fused_log_probs`, or a TRL trainer's model, possibly
            wrapped by accelerate or PEFT).
        input_ids: (batch, length) token ids.
        scored: (batch, length) mask, nonzero where the token's log-prob is wanted (e.g. a completion mask).
        attention_mask: (batch, length), or None for unpadded input; (batch, past + length) with a cache.
        model_kwargs: passed to the forward, e.g. `past_key_values` of a shared prefix (then `input_ids` continue it).

    Returns:
        (log_probs, outputs): `log_probs[b, t] = log π(input_ids[b, t + 1] | input_ids[b, ≤ t])` of shape
        (batch, length − 1), 0 where `scored[b, t + 1]` is 0 (token 0 has no prediction, so it is never scored);
        `outputs` is the model's `FusedCausalLMOutput` (for `aux_loss` and the other fields it carries).
    """
    labels = input_ids.masked_fill(scored == 0, -100)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        use_cache=False,
        fused_lm_head=True,
        **model_kwargs,
    )
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens (as TRL does).
    return outputs.log_probs[:, -(input_ids.size(1) - 1) :], outputs


def cache_argument(model) -> str:
    """The forward's name for a key/value cache: `cache` (transformers >= 5.2x, which deprecates the old name), else
    `past_key_values`."""
    import inspect

    forward = (model.get_base_model() if is_peft_model(model) else model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def prefix_cache(model, prefix_ids: torch.Tensor, context=None):
    """The key/value cache of `prefix_ids` (1, P) under `model` (inside `context`, e.g. a LoRA model's
    `disable_adapter()`), through the decoder alone: no LM head, since nothing of a shared prefix is scored."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    causal_lm = model.get_base_model() if is_peft_model(model) else model
    with torch.inference_mode(), context or nullcontext():
        cache = DynamicCache(config=causal_lm.config)
        decoder = causal_lm.get_decoder()
        decoder(input_ids=prefix_ids, use_cache=True, **{cache_argument(decoder): cache})
    return cache


def repeated_cache(cache, batch_size: int):
    """A private copy of a (batch 1) prefix cache repeated `batch_size` times: a forward appends its batch's keys and
    values to the cache it is given, so the shared one must stay untouched."""
    import copy

    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(batch_size)
    return repeated
