"""log Z of the output softmax at the trained tokens, a stability monitor and the z-loss's input.

Wortsman et al. 2024, "Small-scale proxies for large-scale Transformer training instabilities" (arXiv 2309.14322):
output-logit divergence shows as a drifting log Z = log sum_v exp(z_v); their z-loss penalizes mean (log Z)^2
(`align.losses.attention_entropy.z_loss`). `OutputLogZProbe` hands log Z of a recorded forward to the open
`AttentionEntropyRecorder` (`align.attention.recorder`), without a second pass over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from align.attention.recorder import AttentionEntropyRecorder, active_recorder
from align.losses.attention_entropy import log_partition_from_log_probs


def _output_logit_transform(config):
    """(scale, softcap) that turn `hidden @ lm_head.T` into the model's output logits (as TRL's fused head does)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


class OutputLogZProbe:
    """log Z of the output softmax at the trained positions of a recorded forward, delivered to the open recorder.

    With TRL's fused LM head the logits are never materialized; but log p_y = z_y - log Z, and the target logit z_y
    is one dot product per token (the last hidden state, captured by a hook on the backbone, times the target's row
    of the LM head). The result is differentiable, so it can carry a z-loss. With a plain forward, log Z is the
    logsumexp of the returned logits.
    """

    def __init__(self, causal_lm: nn.Module):
        self.causal_lm = causal_lm
        self.scale, self.softcap = _output_logit_transform(causal_lm.config)
        self._hidden = None
        backbone = getattr(causal_lm, "base_model", causal_lm)
        self._handles = [causal_lm.register_forward_hook(self._on_output, with_kwargs=True)]
        if backbone is not causal_lm:
            self._handles.append(backbone.register_forward_hook(self._on_backbone))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @staticmethod
    def _wanted() -> AttentionEntropyRecorder | None:
        recorder = active_recorder()
        return recorder if recorder is not None and recorder.accepts() and recorder.log_z is None else None

    def _on_backbone(self, module, args, output) -> None:
        if self._wanted() is not None:
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _on_output(self, module, args, kwargs, output) -> None:
        hidden, self._hidden = self._hidden, None
        recorder = self._wanted()
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if recorder is None or (labels is None and shift_labels is None):
            return
        targets = shift_labels if shift_labels is not None else labels[:, 1:]
        mask = targets != -100
        log_probs = getattr(output, "log_probs", None)
        logits = getattr(output, "logits", None)
        if log_probs is not None and hidden is not None:
            recorder.log_z = self._from_fused(
                hidden if shift_labels is not None else hidden[:, :-1], targets, mask, log_probs
            )
        elif logits is not None:
            shifted = logits if shift_labels is not None else logits[:, :-1]
            recorder.log_z = torch.logsumexp(shifted[mask].float(), dim=-1)

    def _from_fused(self, hidden, targets, mask, log_probs) -> torch.Tensor:
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        head = self.causal_lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        with maybe_gather_lm_head_ctx(weight, bias):
            rows = targets[mask]
            target_logits = (hidden[mask].to(weight.dtype) * weight[rows]).sum(-1)
            if bias is not None:
                target_logits = target_logits + bias[rows]
        target_logits = target_logits.float() * self.scale
        if self.softcap is not None:
            target_logits = self.softcap * torch.tanh(target_logits / self.softcap)
        return log_partition_from_log_probs(target_logits, log_probs[mask].float())
