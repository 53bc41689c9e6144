"""Attention-health diagnostics: per-head attention entropy and the stability monitors, collected in the forward pass.

How it works. `entropy_eager` is an attention implementation registered with transformers' `AttentionInterface`
(and, which is required, with `AttentionMaskInterface`: without a mask registration transformers hands a custom
implementation no mask at all, neither causal nor padding). It computes exactly what eager attention computes and,
from the same softmax it already has, the entropy of every attention row (`align.losses.attention_entropy`) plus the
largest attention logit. An `AttentionEntropyRecorder` that is open (`with recorder:`) receives one `LayerRecord` per
layer. Nothing else is recorded, so:

- reference passes (run under `torch.no_grad()`) are not recorded, unless a recorder asks for no-grad forwards
  (`include_no_grad=True`, for `align diagnose attention`);
- gradient-checkpoint recomputation (during the backward, after the trainer has closed its recorder) is not
  recorded. The entropy is computed whenever gradients are enabled, open recorder or not, so that the recomputation
  replays the same operations as the original forward (non-reentrant checkpointing requires it);
- a second grad-enabled forward inside one window is counted in `recorder.duplicates`, not recorded.

Stability monitors from Wortsman et al. 2024 ("Small-scale proxies for large-scale Transformer training
instabilities"): the max attention logit per layer (here, from the same scores tensor), and log Z of the output
softmax (`OutputLogZProbe`: recovered from a fused LM head's target log-probabilities, no extra vocabulary pass).

Head entropies are binned the way Jha & Reagen 2025 bin them, as fractions of the maximum: collapsed < 1/4,
overloaded > 3/4 (here the maximum is the configured normalization's E_max; see `align.losses.attention_entropy`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from align.losses.attention_entropy import row_entropy


ATTENTION_IMPLEMENTATION = "entropy_eager"
# Name of the attribute an attention module carries when a trainer attached learnable per-head parameters to it.
PARAMETERS_ATTRIBUTE = "_align_attention_entropy"
COLLAPSED_BELOW = 0.25
OVERLOADED_ABOVE = 0.75


@dataclass
class LayerRecord:
    """What one attention layer saw in one forward."""

    layer: int
    entropy: torch.Tensor  # (batch, heads, queries) row entropies in nats; differentiable in training forwards
    valid_rows: torch.Tensor  # (batch, queries) bool: False for padding query rows
    visible_keys: torch.Tensor  # (batch, queries) number of keys each row may attend to
    max_logit: torch.Tensor  # scalar: largest pre-softmax attention logit over the valid rows (detached)


class AttentionEntropyRecorder:
    """Collects one `LayerRecord` per layer from `entropy_eager` attention while open (`with recorder: ...`).

    Also receives `log_z` / `log_z_mask` from an `OutputLogZProbe`. Entering clears what the previous window held.
    """

    def __init__(self, include_no_grad: bool = False):
        self.include_no_grad = include_no_grad
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
    return _ACTIVE[-1] if _ACTIVE else None


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim): a KV head serves `groups` query heads."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return (
        states[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)
    )


def _row_masks(mask: torch.Tensor | None, batch: int, queries: int, keys: int, device) -> tuple[torch.Tensor, ...]:
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
    query attention is handled by repeating KV heads. Learnable per-head temperatures attached by a trainer divide
    the logits before the soft-cap and the mask (so they can be folded into the query projection).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{ATTENTION_IMPLEMENTATION} does not support attention sinks (`s_aux`, e.g. gpt-oss): their extra "
            "softmax column changes the attention rows. Use a model without sinks, or eager attention without entropy."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, groups)
    value_states = _repeat_kv(value, groups)

    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    parameters = getattr(module, PARAMETERS_ATTRIBUTE, None)
    temperature = parameters.temperature(module.layer_idx) if parameters is not None else None
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
                    valid, visible = _row_masks(mask, batch, queries, keys, scores.device)
                    row_max = scores.detach().amax(-1).masked_fill(~valid[:, None, :], -math.inf)
                    recorder.add(LayerRecord(module.layer_idx, entropy, valid, visible, row_max.amax().float()))

    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value_states)
    return output.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register `entropy_eager` (attention + eager mask) with transformers; idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, entropy_eager_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


register()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The softmax-attention modules of a transformers model (`*Attention` with a `layer_idx`), by layer."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    layers = [m.layer_idx for m in found]
    if not found or len(set(layers)) != len(layers):
        raise ValueError(
            f"Cannot find one attention module per layer in {type(model).__name__} (found layers {layers}). "
            f"{ATTENTION_IMPLEMENTATION} needs transformers attention modules named `*Attention` with a `layer_idx`."
        )
    return sorted(found, key=lambda m: m.layer_idx)


# --- Per-(layer, head) statistics ---------------------------------------------------------------------------------


class HeadEntropyAccumulator:
    """Running per-(layer, head) means of raw and normalized row entropy, over any number of forwards.

    `context`-normalized rows are H / log T (T: the sequence's number of real tokens; sequences of one token are
    skipped); `visible`-normalized rows are H / log n (n: keys the row sees; rows with n = 1 are skipped).
    """

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.sums = torch.zeros(3, num_layers, num_heads, dtype=torch.float64)  # raw, context, visible
        self.rows = torch.zeros(3, num_layers, 1, dtype=torch.float64)
        self.max_logit = torch.full((num_layers,), -math.inf, dtype=torch.float64)

    @torch.no_grad()
    def add(self, records: list[LayerRecord]) -> None:
        if not records:
            return
        sums, rows, maxima = [], [], []
        for record in records:
            entropy = record.entropy.detach().double()
            valid = record.valid_rows
            length = valid.sum(-1, keepdim=True).expand(valid.shape)
            kinds = [
                (valid, torch.ones_like(entropy[:, 0])),
                (valid & (length > 1), length.double().clamp(min=2).log()),
                (valid & (record.visible_keys > 1), record.visible_keys.double().clamp(min=2).log()),
            ]
            sums.append(torch.stack([((entropy / m[:, None]) * w[:, None]).sum((0, 2)) for w, m in kinds]))
            rows.append(torch.stack([w.sum() for w, _ in kinds]).double())
            maxima.append(record.max_logit.double())
        # One device-to-host copy for the whole forward instead of several per layer
        layers = [record.layer for record in records]
        sums, rows, maxima = torch.stack(sums).cpu(), torch.stack(rows).cpu(), torch.stack(maxima).cpu()
        self.sums[:, layers] += sums.transpose(0, 1)
        self.rows[:, layers, 0] += rows.transpose(0, 1)
        self.max_logit[layers] = torch.maximum(self.max_logit[layers], maxima)

    def merge(self, other: HeadEntropyAccumulator) -> None:
        self.sums += other.sums
        self.rows += other.rows
        self.max_logit = torch.maximum(self.max_logit, other.max_logit)

    def state(self) -> torch.Tensor:
        """Flat tensor of the sums (for a cross-process sum; max logits are combined separately)."""
        return torch.cat([self.sums.flatten(), self.rows.flatten()])

    def load_state(self, flat: torch.Tensor) -> None:
        split = self.sums.numel()
        self.sums = flat[:split].view_as(self.sums).double().cpu()
        self.rows = flat[split:].view_as(self.rows).double().cpu()

    def has_data(self) -> bool:
        return bool((self.rows[0] > 0).any())

    def table(self) -> dict[str, torch.Tensor]:
        """(layers, heads) means: `raw` (nats), `context`, `visible` (fractions of the maximum); NaN where no data."""
        means = self.sums / self.rows.clamp(min=1)
        means[(self.rows == 0).expand_as(means)] = math.nan
        return {"raw": means[0], "context": means[1], "visible": means[2], "max_logit": self.max_logit.clone()}


def head_entropy_bins(normalized: torch.Tensor) -> dict[str, float]:
    """Fractions of heads per quarter of the maximum entropy (Jha & Reagen's bins) and the two tails."""
    values = normalized[~torch.isnan(normalized)].float()
    if values.numel() == 0:
        return {"collapsed_frac": math.nan, "overloaded_frac": math.nan, "quarter_fracs": [math.nan] * 4}
    quarters = torch.bucketize(values.clamp(0, 1), torch.tensor([0.25, 0.5, 0.75]), right=True)
    return {
        "collapsed_frac": float((values < COLLAPSED_BELOW).float().mean()),
        "overloaded_frac": float((values > OVERLOADED_ABOVE).float().mean()),
        "quarter_fracs": [float((quarters == q).float().mean()) for q in range(4)],
    }


def summarize(table: dict[str, torch.Tensor], normalization: str = "context") -> dict:
    """Scalar summary of a `HeadEntropyAccumulator.table()` for logs and reports."""
    normalized = table[normalization]
    return {
        "normalization": normalization,
        "mean_entropy": float(torch.nanmean(table["raw"])),
        "mean_normalized_entropy": float(torch.nanmean(normalized)),
        **head_entropy_bins(normalized),
        "layer_mean_entropy": [float(torch.nanmean(row)) for row in table["raw"]],
        "layer_mean_normalized_entropy": [float(torch.nanmean(row)) for row in normalized],
        "layer_max_logit": [float(x) for x in table["max_logit"]],
    }


def _as_lists(tensor: torch.Tensor) -> list:
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in tensor.tolist()]


def write_report(table: dict[str, torch.Tensor], path: str | Path, normalization: str, **meta) -> dict:
    """Write the per-(layer, head) tables and the summary as JSON; return the summary."""
    summary = summarize(table, normalization)
    report = {
        **meta,
        "summary": summary,
        "entropy_nats": _as_lists(table["raw"]),
        "entropy_normalized_context": _as_lists(table["context"]),
        "entropy_normalized_visible": _as_lists(table["visible"]),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    return summary


def write_heatmap(normalized: torch.Tensor, path: str | Path, title: str) -> None:
    """Heatmap PNG of normalized head entropy, layers (rows) by heads (columns), on the fixed scale [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = normalized.shape
    figure, axes = plt.subplots(figsize=(max(5.0, 0.45 * heads + 2.5), max(3.0, 0.28 * layers + 1.5)))
    image = axes.imshow(normalized.float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(heads))
    axes.set_yticks(range(0, layers, max(1, layers // 16)))
    axes.set_title(title, fontsize=9)
    bar = figure.colorbar(image, ax=axes)
    bar.set_label("entropy / max entropy")
    for level in (COLLAPSED_BELOW, OVERLOADED_ABOVE):
        bar.ax.axhline(level, color="white", linewidth=1)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- Output log Z (Wortsman et al.) -------------------------------------------------------------------------------


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

        from align.losses.attention_entropy import log_partition_from_log_probs

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


# --- Measuring a model without training (`align diagnose attention`) ---------------------------------------------


@torch.no_grad()
def measure_attention_entropy(
    model, tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 1024, progress: bool = True
) -> HeadEntropyAccumulator:
    """Per-(layer, head) attention entropy of `model` over `texts` (one forward each, no gradients).

    Switches the model to `entropy_eager` attention. Texts are batched by length to keep padding small.
    """
    from tqdm.auto import tqdm

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    model.eval()
    config = base.config.get_text_config()
    accumulator = HeadEntropyAccumulator(config.num_hidden_layers, config.num_attention_heads)
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    recorder = AttentionEntropyRecorder(include_no_grad=True)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="attention entropy", disable=not progress):
        longest = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
            attention[row, : len(encoded[index])] = 1
        with recorder:
            model(input_ids=ids.to(device), attention_mask=attention.to(device), logits_to_keep=1, use_cache=False)
        accumulator.add(recorder.layer_records())
    return accumulator
