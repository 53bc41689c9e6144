"""`batch_size: auto` for the `hf` backend: the largest generate batch whose KV cache fits a share of free memory.

Decoding a causal LM keeps, per sequence, a key and a value vector per layer and KV head for every position:

    kv_bytes(sequence) = 2 * layers * kv_heads * head_dim * bytes(dtype) * (prompt_tokens + max_new_tokens)

plus the sampler's float32 logits over the vocabulary (kept with a few temporaries for top-p: ~4 copies). The auto
batch is `floor(MEMORY_SHARE * free_memory / per_sequence_bytes)`, capped: on a CPU the cap is where a bigger batch
stops paying (measured on SmolLM2-135M in bf16, 2 threads: batch 16 -> 64 gave 2.5x the tokens/s; see
benchmarks/generation.py), on a GPU where the KV cache of a large batch already saturates the device. Free memory is
`psutil.virtual_memory().available` on a CPU and `torch.cuda.mem_get_info` on a GPU, read when the batch is sized.
"""

from __future__ import annotations

import logging


logger = logging.getLogger("align.eval")

AUTO = "auto"
MEMORY_SHARE = 0.25  # leave the rest to the weights, activations, the grader pool and whatever else runs
BATCH_CAP = {"cpu": 64, "cuda": 256}
LOGIT_COPIES = 4
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parse_batch_size(value) -> int | str:
    """An int >= 1 or "auto"; anything else gets one line saying what is accepted."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return number


def kv_bytes_per_token(model_config, dtype: str) -> int:
    """Bytes of KV cache one token of one sequence occupies across all layers."""
    text = getattr(model_config, "text_config", None) or model_config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def auto_batch_size(model_config, dtype: str, sequence_tokens: int, device: str, free_bytes: int | None = None) -> int:
    """The largest batch whose per-sequence KV cache and logits fit MEMORY_SHARE of free memory, capped."""
    vocab = getattr(getattr(model_config, "text_config", None) or model_config, "vocab_size", 0) or 0
    per_sequence = sequence_tokens * kv_bytes_per_token(model_config, dtype) + LOGIT_COPIES * 4 * vocab
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return max(1, min(batch_cap(device), int(MEMORY_SHARE * free // max(per_sequence, 1))))


def batch_cap(device: str) -> int:
    return BATCH_CAP["cuda" if device.startswith("cuda") else "cpu"]
