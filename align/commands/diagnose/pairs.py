"""`align diagnose pairs`: CHES of every preference pair under a model, before training (Razin et al. 2025).

CHES(x, y⁺, y⁻) = ⟨Σ_k h_{x,y⁺<k}, Σ_k' h_{x,y⁻<k'}⟩ − ‖Σ_k h_{x,y⁺<k}‖² (h: the last hidden state, the LM head's
input, at each position that predicts a response token) and its length-normalized variant ln-CHES (means instead of
sums); pairs with high CHES are those whose chosen log-prob DPO lowers (`align.diagnostics.ches`). The pairs are
tokenized as TRL's DPOTrainer tokenizes them. Writes one JSON line per pair, highest CHES first (`rank`, `index` in
the dataset, `ches`, `ln_ches`, `chosen_tokens`, `rejected_tokens`, `id` when the row has one), and prints a summary.

    align diagnose pairs --model smollm2-135m-instruct --dataset synthetic --limit 64
    align diagnose pairs --model runs/my-sft --dataset data/smollm2_pairs.jsonl --max-length 256 --output ches.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys


HELP = "CHES likelihood-displacement scores of preference pairs under a model (JSONL, highest first; no training)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align diagnose pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, local directory or Hub id.")
    parser.add_argument(
        "--dataset",
        default="synthetic",
        help="`synthetic` (the pairs `align train margin` trains on by default) or a .jsonl/.json/.parquet of "
        "prompt/chosen/rejected rows (e.g. from `align data pairs`).",
    )
    parser.add_argument("--output", "-o", help="JSONL to write (default: <dataset stem>_ches.jsonl here).")
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs per forward (default: 8).")
    parser.add_argument(
        "--max-length", type=int, default=None, help="Cut each prompt + response to N tokens, as DPO's max_length."
    )
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N pairs.")
    parser.add_argument("--top", type=int, default=10, help="Indices of the N highest-CHES pairs in the summary.")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16.")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available).")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0) or args.top < 0:
        print("align diagnose pairs: --batch-size and --limit must be > 0, --top >= 0", file=sys.stderr)
        return 2
    if args.max_length is not None and args.max_length <= 1:
        print("align diagnose pairs: --max-length must be > 1", file=sys.stderr)
        return 2
    import torch

    from align.diagnostics.ches import (
        default_output,
        load_preference_pairs,
        rank_by_ches,
        score_preference_dataset,
        summarize_ches,
        write_jsonl,
    )
    from align.models import load_model_and_tokenizer

    # rows first: a bad row is reported before the model loads
    rows, source = load_preference_pairs(args.dataset, args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    records = score_preference_dataset(
        model, tokenizer, rows, batch_size=args.batch_size, max_length=args.max_length, source=source
    )
    ranked = rank_by_ches(records, rows)
    output = write_jsonl(ranked, args.output or default_output(args.dataset))
    summary = {"model": args.model, "dataset": source, **summarize_ches(ranked, args.top), "output": str(output)}
    print(json.dumps(summary))
    return 0
