"""The recording window of `entropy_fused` / `entropy_eager` attention: one `LayerRecord` per layer per forward.

Only what arrives while a recorder is open (`with recorder:`) is recorded, and only from forwards with gradients
enabled unless the recorder asks for no-grad forwards (`include_no_grad=True`, for measuring a model offline):

- reference passes (run under `torch.no_grad()`) are not recorded;
- gradient-checkpoint recomputation (in the backward, after the trainer has closed its recorder) is not recorded;
- a second grad-enabled forward inside one window is counted in `recorder.duplicates`, not recorded.

A recorder also receives `log_z` of the output softmax from `align.diagnostics.log_z.OutputLogZProbe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerRecord:
    """What one attention layer saw in one forward."""

    layer: int
    entropy: torch.Tensor  # (batch, heads, queries) row entropies in nats; differentiable in training forwards
    valid_rows: torch.Tensor  # (batch, queries) bool: False for padding query rows
    visible_keys: torch.Tensor  # (batch, queries) number of keys each row may attend to
    max_logit: torch.Tensor  # scalar: largest pre-softmax attention logit over the valid rows (detached); -inf if
    # not measured (`entropy_fused` measures it only when the recorder's `record_max_logit` is on)


class AttentionEntropyRecorder:
    """Collects one `LayerRecord` per layer from the entropy attentions while open (`with recorder: ...`).

    Also receives `log_z` from an `OutputLogZProbe`. Entering clears what the previous window held.
    `record_max_logit` asks `entropy_fused` for the max attention logit, a no-grad pass over QK^T that it otherwise
    skips (`entropy_eager` has the scores at hand and always records it).
    """

    def __init__(self, include_no_grad: bool = False, record_max_logit: bool = True):
        self.include_no_grad = include_no_grad
        self.record_max_logit = record_max_logit
        self.records: dict[int, LayerRecord] = {}
        self.duplicates = 0
        self.log_z: torch.Tensor | None = None

    def accepts(self) -> bool:
        return torch.is_grad_enabled() or self.include_no_grad

    def add(self, record: LayerRecord) -> None:
        if record.layer in self.records:
            self.duplicates += 1
            return
        self.records[record.layer] = record

    def layer_records(self) -> list[LayerRecord]:
        return [self.records[layer] for layer in sorted(self.records)]

    def __enter__(self) -> AttentionEntropyRecorder:
        self.records = {}
        self.duplicates = 0
        self.log_z = None
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)


_ACTIVE: list[AttentionEntropyRecorder] = []


def active_recorder() -> AttentionEntropyRecorder | None:
    """The innermost open recorder, or None."""
    return _ACTIVE[-1] if _ACTIVE else None
