"""Measurements of `align repro margin`: the pairs, their sequence log-probs under a model, and CHES.

A pair is tokenized exactly as TRL's `DPOTrainer` tokenizes it for training (`tokenize_pair`: the chat template of
the prompt with the generation prompt, of prompt + chosen and of prompt + rejected, the completion starting where
the tokenized prompt and prompt + completion diverge; EOS appended to plain-text completions; each sequence cut to
`max_length` from its start), so the log-probs measured here are the ones the trainer's loss saw. Sequence
log-prob = the sum over the completion's tokens of log π(token | everything before), from one no-grad forward
(right padding, eval mode, float32) through TRL's fused LM head (`align.log_probs`).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path


def tokenize_pair(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one prompt/chosen/rejected row, as `DPOTrainer._prepare_dataset`."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):  # conversational

        def encode(messages, **kwargs):
            return list(
                tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
            )

        prompt_ids = encode(prompt, add_generation_prompt=True)
        with_chosen, with_rejected = encode(prompt + chosen), encode(prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (text if text.endswith(eos) else text + eos for text in (chosen, rejected))
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        with_chosen = list(tokenizer(prompt + chosen)["input_ids"])
        with_rejected = list(tokenizer(prompt + rejected)["input_ids"])

    def shared(a: list[int], b: list[int]) -> int:
        count = 0
        for x, y in zip(a, b):
            if x != y:
                break
            count += 1
        return count

    prompt_len = min(shared(prompt_ids, with_chosen), shared(prompt_ids, with_rejected))
    return prompt_ids[:prompt_len], with_chosen[prompt_len:], with_rejected[prompt_len:]


def _sequences(tokenizer, rows: list[dict], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(ids, completion mask) of every chosen sequence, then of every rejected one, truncated like TRL's collator."""
    chosen, rejected = [], []
    for row in rows:
        prompt, chosen_ids, rejected_ids = tokenize_pair(tokenizer, row)
        for side, out in ((chosen_ids, chosen), (rejected_ids, rejected)):
            ids, mask = prompt + side, [0] * len(prompt) + [1] * len(side)
            out.append((ids[:max_length], mask[:max_length]) if max_length else (ids, mask))
    return chosen + rejected


def sequence_log_probs(
    model, tokenizer, rows: list[dict], *, max_length: int | None, batch_size: int = 8
) -> list[dict]:
    """Per row: `{"logp_chosen", "logp_rejected", "len_chosen", "len_rejected"}` (nats, completion tokens)."""
    import torch

    from align.log_probs import enable_fused_log_probs, token_log_probs

    enable_fused_log_probs(model)
    model.eval()
    sequences = _sequences(tokenizer, rows, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums, lengths = [], []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            scored = torch.tensor([mask + [0] * (width - len(mask)) for _, mask in batch])
            log_probs, _ = token_log_probs(model, input_ids, scored, attention)
            sums += log_probs.float().sum(dim=1).tolist()
            lengths += scored.sum(dim=1).tolist()
    half = len(rows)
    return [
        {
            "logp_chosen": sums[i],
            "logp_rejected": sums[half + i],
            "len_chosen": int(lengths[i]),
            "len_rejected": int(lengths[half + i]),
        }
        for i in range(half)
    ]


def write_json(path: Path, value) -> None:
    """Write atomically (a kill mid-write leaves the previous file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def _stamp(adapter: Path | None) -> list | None:
    """Size and modification time of the adapter's weights (None for the start model)."""
    if adapter is None:
        return None
    stat = (Path(adapter) / "adapter_model.safetensors").stat()
    return [stat.st_size, stat.st_mtime_ns]


def measure(
    path: Path, model: str, adapter: Path | None, splits: dict[str, list[dict]], *, max_length: int, batch_size: int
) -> dict[str, list[dict]]:
    """`{split: sequence_log_probs}` of the start model (`adapter` None) or of a trained LoRA adapter on it, cached in
    `path` (reused while it holds the same splits of the same model, and the adapter file is unchanged: a retrained
    run is measured again)."""
    stamp = _stamp(adapter)
    if path.exists():
        cached = json.loads(path.read_text())
        same = cached.get("model") == model and cached.get("adapter_stamp") == stamp
        if same and all(len(cached.get(split, ())) == len(rows) for split, rows in splits.items()):
            return cached
    from align.models import load_model_and_tokenizer

    network, tokenizer = load_model_and_tokenizer(
        model, dtype="float32", adapter_path=None if adapter is None else str(adapter)
    )
    result = {
        split: sequence_log_probs(network, tokenizer, rows, max_length=max_length, batch_size=batch_size)
        for split, rows in splits.items()
    }
    write_json(
        path, {**result, "model": model, "adapter": None if adapter is None else str(adapter), "adapter_stamp": stamp}
    )
    del network
    gc.collect()
    return result


def ches_scores(path: Path, model: str, rows: list[dict], *, max_length: int, batch_size: int) -> dict:
    """CHES and ln-CHES (Razin et al. 2025) of `rows` under the start model, cached in `path`:
    `{"records": [...]}` in row order, or `{"skipped": why}` (not cached) when `align.diagnostics.ches` is missing."""
    if path.exists():
        return json.loads(path.read_text())
    try:
        from align.diagnostics.ches import score_preference_dataset
    except ImportError as error:
        return {"skipped": f"align.diagnostics.ches is not importable ({error}); rerun to add CHES once it exists"}
    from datasets import Dataset

    from align.models import load_model_and_tokenizer

    network, tokenizer = load_model_and_tokenizer(model, dtype="float32")
    network.eval()
    dataset = Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])
    records = score_preference_dataset(network, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    records = sorted(records, key=lambda record: record["index"])
    if [record["index"] for record in records] != list(range(len(rows))):
        raise ValueError(f"CHES scored {len(records)} rows of {len(rows)}: expected one record per training pair")
    result = {
        "records": [{"index": r["index"], "ches": float(r["ches"]), "ln_ches": float(r["ln_ches"])} for r in records]
    }
    write_json(path, result)
    del network
    gc.collect()
    return result
