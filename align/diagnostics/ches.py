"""CHES: which preference pairs will lower the chosen log-prob under DPO, read off the model before training.

Razin, Malladi, Bhaskar, Chen, Arora and Hanin, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization" (ICLR 2025, arXiv 2410.08847), Definition 2, the Centered Hidden Embedding Similarity of a
pair (x, y⁺, y⁻):

    CHES(x, y⁺, y⁻) = ⟨S⁺, S⁻⟩ − ‖S⁺‖²,     S⁺ = Σ_{k=1}^{|y⁺|} h_{x, y⁺_{<k}},   S⁻ = Σ_{k'=1}^{|y⁻|} h_{x, y⁻_{<k'}}

and its length-normalized variant (the paper filters data with it in Section 6), the same with per-response means:

    ln-CHES(x, y⁺, y⁻) = ⟨S⁺/|y⁺|, S⁻/|y⁻|⟩ − ‖S⁺/|y⁺|‖²   (the means S/|y| in place of the sums)

h_{x, y_{<k}} is the model's last hidden representation, the vector its unembedding (LM head) multiplies, at the
position that predicts response token k: the hidden state after the prompt and the first k − 1 response tokens. Each
sum therefore has |y| terms, from the last prompt token to the second-to-last response token. Pairs with high CHES
are those whose chosen log-prob DPO pushes down (likelihood displacement): their chosen and rejected responses look
alike to the model's last layer.

What the public reference implementation (github.com/princeton-nlp/unintentional-unalignment, commit dc50030) does,
and what is taken from it here:

- `ches/ches.py::compute_ches_scores` keeps the hidden embeddings from the last prompt token on and drops the last
  position of the sequence ("whose hidden embedding does not take part when computing CHES scores (this is usually
  the hidden embedding of the EOS token)"): |y| terms, as Definition 2. Its length-normalized score divides each
  response's sum by that response's own length |y| before the inner products: the ln-CHES above.
- `compute_preference_similarity_per_example.py` takes `outputs.hidden_states[-1]` of a Hugging Face forward, one
  unpadded sequence at a time, in eval mode: the output of the final norm, which is what the LM head receives. Its
  slice `hidden_states[-1][0][query_len - 1:]` runs to the end of the sequence, so it also sums the hidden state of
  the last response token (|y| + 1 terms, and ln-CHES divides by |y| + 1). That is one term more than Definition 2
  and `ches/ches.py`; this module follows those two.

Here (`ches_from_batch`) the position t is summed when the token after it, t + 1, is a completion token of TRL's
collated batch, which is exactly k = 1..|y|. The hidden states come from one batched no-grad forward in eval mode
with `output_hidden_states=True`; transformers (≥ 5) ties `hidden_states[-1]` to the backbone's `last_hidden_state`,
the final-norm output, and the forward checks, on the last position, that this is the very vector the LM head gets.
Sums and inner products are taken in float64, since CHES is a difference of two large, close numbers. The pairs are
tokenized by TRL 1.16's own `DPOTrainer` preprocessing and collator (`tokenize_like_dpo`), so the responses scored
are the token sequences DPO would train on. Cost: one forward (no backward, no logits beyond the last position) per
response, i.e. 2 sequences per pair, `batch_size` pairs per forward.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from align.data.schema import InvalidRowError
from align.data.training import is_blank
from align.errors import InputError
from align.log_probs import is_peft_model


PAIR_FIELDS = ("prompt", "chosen", "rejected")
# TRL's tokenization reads these optional columns too (tool schemas, chat template arguments); they ride along.
OPTIONAL_TRL_FIELDS = ("tools", "chat_template_kwargs")
PAIR_HINT = (
    "Give every row a non-empty 'prompt', 'chosen' and 'rejected', all three strings or all three lists of chat "
    "messages, or drop the row."
)
# `align train margin`'s default pairs (recipes/smollm2-135m-instruct/margin_dpo.yaml): the synthetic task's level-1
# problems, one corrupted solution each, built with the recipe's seed.
SYNTHETIC_PAIRS = {"synthetic_levels": [1], "synthetic_num_train": 256, "negatives_per_problem": 1}
SYNTHETIC_SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# The score of a collated batch


@torch.no_grad()
def ches_from_batch(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(CHES, ln-CHES) of the pairs of a TRL-collated preference batch, float64 CPU tensors of shape (num_pairs,).

    `batch` holds `input_ids`, `attention_mask` and `completion_mask`, each (2P, L), right-padded, rows 0..P−1 the
    chosen responses and rows P..2P−1 the rejected responses of the same P pairs (`DataCollatorForPreference`'s
    layout). Position t of a row is summed when token t + 1 is a completion token, so each sum runs over the |y|
    hidden states that predict the response (module docstring). One no-grad forward of the whole batch, in eval mode
    (dropout off; the model's mode is restored after). Works for PEFT-wrapped models.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch["attention_mask"]
    completion_mask = batch["completion_mask"]
    if input_ids.dim() != 2 or input_ids.size(0) % 2:
        raise ValueError(
            f"Expected a (2P, L) [chosen; rejected] preference batch, got input_ids of shape {tuple(input_ids.shape)}."
        )
    num_pairs, length = input_ids.size(0) // 2, input_ids.size(1)
    # position t predicts token t + 1; it belongs to the sum when t + 1 is a (real, unpadded) completion token
    summed = (completion_mask[:, 1:] != 0) & (attention_mask[:, 1:] != 0)
    counts = summed.sum(dim=1)
    if (counts == 0).any():
        row = int((counts == 0).nonzero()[0, 0])
        side, pair = ("chosen", row) if row < num_pairs else ("rejected", row - num_pairs)
        raise ValueError(
            f"Pair {pair} of the batch has no scored {side} token (its completion_mask is empty after the first "
            "position), so its CHES is undefined."
        )

    device = model.get_input_embeddings().weight.device
    # (2P, L, d): what the LM head multiplies at every position
    hidden = _last_hidden_states(model, input_ids.to(device), attention_mask.to(device), length)
    weights = summed.to(device=device, dtype=torch.float64)
    # float64: CHES subtracts two large, close inner products
    sums = torch.einsum("bt,btd->bd", weights, hidden[:, :-1].double()).cpu()
    means = sums / counts.to(torch.float64)[:, None]
    return _centered_similarity(sums, num_pairs), _centered_similarity(means, num_pairs)


def _centered_similarity(vectors: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """⟨v⁺, v⁻⟩ − ‖v⁺‖² per pair, from the (2P, d) rows [chosen; rejected]."""
    chosen, rejected = vectors[:num_pairs], vectors[num_pairs:]
    return (chosen * rejected).sum(dim=1) - (chosen * chosen).sum(dim=1)


def _last_hidden_states(model, input_ids, attention_mask, length: int) -> torch.Tensor:
    """`hidden_states[-1]` of one no-grad forward in eval mode, checked against what the LM head receives."""
    causal_lm = model.get_base_model() if is_peft_model(model) else model
    kwargs = {}
    # Only the last position's logits: the full (batch, length, vocab) logits would be the largest tensor by far
    if "logits_to_keep" in inspect.signature(causal_lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    head_inputs = []
    head = causal_lm.get_output_embeddings()
    hook = None
    if head is not None:
        hook = head.register_forward_pre_hook(lambda _module, args: head_inputs.append(args[0][:, -1].detach()))
    was_training = model.training
    model.eval()
    try:
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
    hidden = outputs.hidden_states[-1][:, -length:]
    # Some architectures (e.g. Qwen2.5-Omni) leave hidden_states[-1] before the final norm: refuse rather than score
    # another vector than the paper's h
    if head_inputs and not torch.allclose(head_inputs[-1].float(), hidden[:, -1].float(), rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{type(causal_lm).__name__}'s hidden_states[-1] is not the input of its LM head, so CHES (defined on "
            "that input) cannot be read from it."
        )
    return hidden


# ---------------------------------------------------------------------------------------------------------------------
# Rows, tokenization and scoring of a dataset


def pair_row_error(row, conversational: bool | None = None) -> tuple[str, object, str] | None:
    """(field, value, reason) of what keeps a prompt/chosen/rejected row from being scored, or None.

    `conversational`: the format of the dataset's first row (TRL tokenizes every row in that format), if known.
    Identical chosen and rejected are fine here: such a pair has CHES 0.
    """
    if not isinstance(row, dict):
        return "<row>", row, f"expected a JSON object with {', '.join(PAIR_FIELDS)}, got {type(row).__name__}"
    for field in PAIR_FIELDS:
        value = row.get(field)
        if value is None:
            return field, value, "is missing"
        if not isinstance(value, (str, list)):
            return field, value, f"expected a string or a list of messages, got {type(value).__name__}"
        if is_blank(value):
            what = "a prompt" if field == "prompt" else "a response"
            return field, value, f"is empty, so there is no {what} to score"
    kinds = {field: isinstance(row[field], list) for field in PAIR_FIELDS}
    for field in ("chosen", "rejected"):
        if kinds[field] != kinds["prompt"]:
            return field, row[field], "is not in the same format as 'prompt' (string vs list of messages)"
    if conversational is not None and kinds["prompt"] != conversational:
        first = "lists of messages" if conversational else "strings"
        return "prompt", row["prompt"], f"is not in the format of row 0 ({first}), which TRL applies to every row"
    return None


def check_pair_rows(rows: Sequence, source: str = "dataset") -> None:
    """Raise `InvalidRowError` (one line: source, row index, field, why, how to fix) on the first unusable row."""
    conversational = None
    for index, row in enumerate(rows):
        problem = pair_row_error(row, conversational)
        if problem is not None:
            raise InvalidRowError(source, index, *problem, PAIR_HINT)
        if conversational is None:
            conversational = isinstance(row["prompt"], list)


def _pair_rows(dataset) -> list[dict]:
    """The prompt/chosen/rejected (and TRL's optional) columns of every row, as plain dicts."""
    keep = PAIR_FIELDS + OPTIONAL_TRL_FIELDS
    return [{k: v for k, v in row.items() if k in keep} if isinstance(row, dict) else row for row in dataset]


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def tokenize_like_dpo(processing_class, rows: Sequence[dict]) -> list[dict]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}` of each row, by TRL 1.16's own `DPOTrainer` preprocessing.

    `DPOTrainer._prepare_dataset` (EOS appended to plain-text responses, the chat template with the generation
    prompt for the prompt, the completion starting where prompt and prompt + response tokenizations diverge) is
    called as it is; its only use of the trainer is `self._tokenizer.eos_token`, and of the config three fields. The
    `max_length` filter is left out (`max_length=None`): truncation is the collator's, and a row whose prompt fills
    `max_length` is reported by `score_preference_dataset` instead of dropped, so every row gets a score.
    """
    import datasets
    from trl import DPOTrainer

    trainer = SimpleNamespace(_tokenizer=_tokenizer_of(processing_class))
    config = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    dataset = datasets.Dataset.from_list(list(rows))
    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per preprocessing step of a diagnostic is noise
    try:
        prepared = DPOTrainer._prepare_dataset(trainer, dataset, processing_class, config, "CHES")
    finally:
        if not bars_were_disabled:
            datasets.enable_progress_bars()
    return [
        {"prompt_ids": row["prompt_ids"], "chosen_ids": row["chosen_ids"], "rejected_ids": row["rejected_ids"]}
        for row in prepared
    ]


def preference_collator(processing_class, max_length: int | None = None):
    """TRL's `DataCollatorForPreference` as `DPOTrainer` builds it (pad token, `keep_start` truncation)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = _tokenizer_of(processing_class)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # padded positions are masked out of attention and of every sum, so the pad id never changes a score
    return DataCollatorForPreference(pad_token_id=pad, max_length=max_length, truncation_mode="keep_start")


def _check_tokenized(tokenized: list[dict], max_length: int | None, source: str) -> None:
    for index, row in enumerate(tokenized):
        for field in PAIR_FIELDS:
            if not row[f"{field}_ids"]:
                why = "tokenizes to no token" if field == "prompt" else "tokenizes to no completion token"
                raise InvalidRowError(source, index, field, "", why, PAIR_HINT)
        prompt = len(row["prompt_ids"])
        if max_length is not None and prompt >= max_length:
            why = f"fills max_length={max_length}, so no response token is left to score"
            hint = "Raise max_length (--max-length), or shorten or drop the row."
            raise InvalidRowError(source, index, "prompt", f"<{prompt} tokens>", why, hint)


def score_preference_dataset(
    model, processing_class, dataset, batch_size: int = 8, max_length: int | None = None, *, source: str = "dataset"
) -> list[dict]:
    """CHES and ln-CHES of every prompt/chosen/rejected row of `dataset`, in dataset order.

    `dataset`: a `datasets.Dataset` or a sequence of dicts, conversational or plain text, tokenized as TRL 1.16's
    `DPOTrainer` tokenizes them and cut to `max_length` tokens from the start (its collator's `keep_start`; None: no
    cut). Returns one `{"index", "ches", "ln_ches", "chosen_tokens", "rejected_tokens"}` per row, the token counts
    being the response tokens scored (after truncation). A bad row raises `InvalidRowError` (an `InputError`, a
    `ValueError`) naming `source`, the row and the field.
    """
    if batch_size <= 0:
        raise InputError(f"batch_size must be > 0, got {batch_size}.")
    if max_length is not None and max_length <= 1:
        raise InputError(f"max_length must be > 1 (or None), got {max_length}.")
    rows = _pair_rows(dataset)
    if not rows:
        return []
    check_pair_rows(rows, source)
    tokenized = tokenize_like_dpo(processing_class, rows)
    _check_tokenized(tokenized, max_length, source)
    collate = preference_collator(processing_class, max_length)
    records = []
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start : start + batch_size])
        ches, ln_ches = ches_from_batch(model, batch)
        num_pairs = ches.numel()
        # the scored tokens: completion tokens after the first position (which no position predicts)
        scored = ((batch["completion_mask"][:, 1:] != 0) & (batch["attention_mask"][:, 1:] != 0)).sum(dim=1)
        records += [
            {"index": start + i, "ches": float(ches[i]), "ln_ches": float(ln_ches[i])}
            | {"chosen_tokens": int(scored[i]), "rejected_tokens": int(scored[num_pairs + i])}
            for i in range(num_pairs)
        ]
    return records


# ---------------------------------------------------------------------------------------------------------------------
# `align diagnose pairs`: loading, ranking, summary


def load_preference_pairs(name: str, limit: int | None = None) -> tuple[list[dict], str]:
    """(rows, source) of `name`: `synthetic` (the pairs `align train margin` trains on by default: the margin
    recipe's `SYNTHETIC_PAIRS`, seed 0) or a local .jsonl/.json/.parquet (or Hub dataset) of prompt/chosen/rejected
    rows, its `train` split. The first `limit` rows (all if None), checked (`check_pair_rows`)."""
    if name == "synthetic":
        from align.configs import DataArguments
        from align.data.training import build_datasets

        data_args = DataArguments(dataset_name="synthetic", **SYNTHETIC_PAIRS)
        rows = build_datasets("preference", data_args, seed=SYNTHETIC_SEED)[0].to_list()
        source = "synthetic pairs (margin_dpo recipe)"
    else:
        from align.data.loaders import read_source

        read = read_source(name, "train")
        rows, source = read.rows, read.source
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise InputError(f"{source} has no rows to score.")
    check_pair_rows(rows, source)
    return rows, source


def default_output(name: str) -> Path:
    """`<dataset stem>_ches.jsonl` (or `synthetic_ches.jsonl`) in the current directory."""
    stem = "synthetic" if name == "synthetic" else Path(name.rstrip("/")).stem or "pairs"
    return Path(f"{stem.replace('/', '_')}_ches.jsonl")


def rank_by_ches(records: Iterable[dict], rows: Sequence[dict] | None = None) -> list[dict]:
    """The records sorted by CHES, highest first (ties by index), each with its `rank` (1 = highest CHES) and, when
    the source row has one, its `id`."""
    ranked = []
    for rank, record in enumerate(sorted(records, key=lambda r: (-r["ches"], r["index"])), start=1):
        entry = {"rank": rank, **record}
        row = rows[record["index"]] if rows is not None else None
        if isinstance(row, dict) and row.get("id") not in (None, ""):
            entry["id"] = row["id"]
        ranked.append(entry)
    return ranked


def summarize_ches(ranked: Sequence[dict], top: int = 10) -> dict:
    """Count, mean and median of CHES and ln-CHES, and the dataset indices of the `top` highest-CHES pairs."""
    if not ranked:
        return {"count": 0, "top_indices": []}
    ches = torch.tensor([r["ches"] for r in ranked], dtype=torch.float64)
    ln_ches = torch.tensor([r["ln_ches"] for r in ranked], dtype=torch.float64)
    return {
        "count": len(ranked),
        "mean_ches": float(ches.mean()),
        "median_ches": float(ches.quantile(0.5)),
        "mean_ln_ches": float(ln_ches.mean()),
        "median_ln_ches": float(ln_ches.quantile(0.5)),
        "top_indices": [r["index"] for r in sorted(ranked, key=lambda r: r["rank"])[: max(top, 0)]],
    }


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line, written to a temporary file first (a kill mid-write never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    tmp.replace(path)
    return path
