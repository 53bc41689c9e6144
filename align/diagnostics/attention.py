"""Attention-health reports: per-(layer, head) attention entropy statistics, their summary, JSON report and heatmap.

The statistics come from the `LayerRecord`s that `entropy_fused` (`align.attention.fused`, the default) or
`entropy_eager` attention (`align.attention.kernel`, the reference) hands to an
open `AttentionEntropyRecorder` (`align.attention.recorder`): during training (`align.trainers.entropy`) or offline,
over any texts, with `measure_attention_entropy` (`align diagnose attention`).

Head entropies are binned the way Jha & Reagen 2025 ("Entropy-Guided Attention for Private LLMs") bin them, as
fractions of the maximum: collapsed < 1/4, overloaded > 3/4 (here the maximum is the configured normalization's E_max;
see `align.losses.attention_entropy`). The max attention logit per layer is the monitor of Wortsman et al. 2024
("Small-scale proxies for large-scale Transformer training instabilities").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from align.attention.fused import KERNELS
from align.attention.recorder import AttentionEntropyRecorder, LayerRecord


COLLAPSED_BELOW = 0.25
OVERLOADED_ABOVE = 0.75


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


# --- Measuring a model without training (`align diagnose attention`) ---------------------------------------------


def pack_token_ids(encoded: list[list[int]], length: int, count: int | None, separator: int | None) -> list[list[int]]:
    """Concatenate token sequences (each followed by `separator`, e.g. EOS) and cut `count` sequences of exactly
    `length` tokens (all the full ones when `count` is None); raises InputError when the texts are too short."""
    from align.errors import InputError

    stream = [token for ids in encoded for token in (*ids, *([] if separator is None else [separator]))]
    available = len(stream) // length
    if available == 0 or (count is not None and available < count):
        raise InputError(
            f"The texts hold {len(stream)} tokens: not enough for {count or 1} packed sequences of {length} tokens. "
            "Read more problems (--limit) or pack fewer or shorter sequences (--num-sequences, --pack-length)."
        )
    return [stream[i * length : (i + 1) * length] for i in range(available if count is None else count)]


@torch.no_grad()
def measure_attention_entropy(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 4,
    max_length: int = 1024,
    progress: bool = True,
    kernel: str = "fused",
    pack_length: int | None = None,
    num_sequences: int | None = None,
) -> HeadEntropyAccumulator:
    """Per-(layer, head) attention entropy of `model` over `texts` (one forward per batch, no gradients).

    Switches the model to the `kernel` attention (`fused` or `eager`, align.attention.fused.KERNELS). Texts are
    truncated to `max_length` tokens and batched by length to keep padding small; or, with `pack_length`,
    concatenated (EOS between texts) into `num_sequences` sequences of exactly that many tokens (no padding).
    """
    from tqdm.auto import tqdm

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(KERNELS[kernel])
    model.eval()
    config = base.config.get_text_config()
    accumulator = HeadEntropyAccumulator(config.num_hidden_layers, config.num_attention_heads)
    if pack_length is None:
        encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    else:
        encoded = [tokenizer(text)["input_ids"] for text in texts]
        encoded = pack_token_ids(encoded, pack_length, num_sequences, tokenizer.eos_token_id)
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
