"""Finding the softmax-attention modules of a transformers model, the modules `entropy_eager` runs in."""

from __future__ import annotations

from torch import nn

from align.attention.kernel import ATTENTION_IMPLEMENTATION


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
