"""Greedy-answer confidence p̂(ŷ_greedy | x): the DCO paper's diagnostic of over-confidence.

Chen et al. 2025 explain why pass@N falls under long cross-entropy fine-tuning: the model's probability of its own
greedy answer is pushed towards 1, also on problems it gets wrong, so sampling N times keeps returning the same
wrong answer. This module measures that probability: decode greedily, then p̂ = Π_t π(ŷ_t | x, ŷ_<t) over the
generated tokens (end-of-sequence token included).
"""

from __future__ import annotations

import math


def greedy_confidence(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16):
    """For each rendered prompt: the greedy completion, its log-probability and probability.

    Returns a list of dicts `{"completion", "token_ids", "logp", "prob", "num_tokens", "finished"}`; `finished` is
    False when the completion hit `max_new_tokens` (then p̂ is the probability of the truncated prefix).
    """
    import torch

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end of every row
    results = []
    try:
        model.eval()
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
                token_logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            generated = out.sequences[:, batch["input_ids"].shape[1] :]
            eos_ids = _eos_ids(model, tokenizer)
            for row, logps in zip(generated, token_logps):
                length = _length_through_eos(row.tolist(), eos_ids)
                logp = float(logps[:length].sum())
                results.append(
                    {
                        "completion": tokenizer.decode(row[:length], skip_special_tokens=True),
                        "token_ids": row[:length].tolist(),
                        "logp": logp,
                        "prob": math.exp(logp),
                        "num_tokens": length,
                        "finished": length < len(row) or (length > 0 and row[length - 1].item() in eos_ids),
                    }
                )
    finally:
        tokenizer.padding_side = padding_side
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _length_through_eos(tokens: list[int], eos_ids: set[int]) -> int:
    """Tokens up to and including the first end-of-sequence token (generation pads after it)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return index + 1
    return len(tokens)
