"""`align diagnose attention`: per-(layer, head) attention entropy of any model on any dataset, without training.

Writes `attention_entropy.json` (raw entropy in nats and both normalizations per layer and head, the max attention
logit per layer, and the summary: collapsed / overloaded head fractions as Jha & Reagen 2025 bin them) and
`attention_entropy.png` (the heatmap) to `--output-dir`, and prints the summary.

    align diagnose attention --model smollm2-135m-instruct --dataset math500.jsonl --limit 64 --output-dir runs/diag
    align diagnose attention --dataset math500.jsonl --limit 500 --pack-length 4096 --num-sequences 8 \
        --batch-size 1 --output-dir runs/diag-4k      # long contexts: texts concatenated into 8 x 4096 tokens
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from align.errors import InputError


HELP = "Attention entropy per (layer, head) of a model on a dataset: heatmap PNG + JSON (no training)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align diagnose attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, local directory or Hub id.")
    parser.add_argument(
        "--dataset", default="synthetic", help="`synthetic`, or any dataset `align.data.load_problems` reads."
    )
    parser.add_argument("--split", default="test", help="Split to read (default: test).")
    parser.add_argument("--limit", type=int, default=64, help="Number of problems (default: 64).")
    parser.add_argument(
        "--text",
        choices=("prompt_solution", "prompt"),
        default="prompt_solution",
        help="What the model reads: the prompt followed by the reference solution (default), or the prompt only.",
    )
    parser.add_argument("--prompt-style", choices=("chat", "plain"), default="chat")
    parser.add_argument(
        "--normalization",
        choices=("context", "visible"),
        default="context",
        help="Maximum entropy of a row for the heatmap and bins: log of the sequence length (paper) or of the "
        "number of keys the row sees.",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024, help="Truncate texts to this many tokens.")
    parser.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="Concatenate the texts (EOS between them) into sequences of exactly this many tokens (no truncation, "
        "no padding) instead of reading them one by one.",
    )
    parser.add_argument(
        "--num-sequences", type=int, default=None, help="With --pack-length: how many sequences (default: all full)."
    )
    parser.add_argument(
        "--kernel",
        choices=("fused", "eager"),
        default="fused",
        help="Attention that measures: fused (default; no T x T tensor) or eager (the reference, T x T per head).",
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16.")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available).")
    parser.add_argument("--output-dir", required=True, help="Directory for attention_entropy.{json,png}.")
    return parser


def texts_for(problems, tokenizer, text: str, style: str) -> list[str]:
    from align.data.prompts import render_prompt

    rendered = []
    for problem in problems:
        prompt = render_prompt(problem.problem, tokenizer, style=style)
        if text == "prompt_solution":
            if not problem.solution:
                raise InputError(f"Problem {problem.id!r} has no solution to read; use --text prompt (no solutions).")
            prompt += problem.solution
        rendered.append(prompt)
    return rendered


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.limit <= 0 or args.batch_size <= 0 or args.max_length <= 1:
        print("align diagnose attention: --limit and --batch-size must be > 0, --max-length > 1", file=sys.stderr)
        return 2
    if (args.pack_length is not None and args.pack_length <= 1) or (args.num_sequences or 1) <= 0:
        print("align diagnose attention: --pack-length must be > 1 and --num-sequences > 0", file=sys.stderr)
        return 2
    if args.num_sequences is not None and args.pack_length is None:
        print("align diagnose attention: --num-sequences needs --pack-length", file=sys.stderr)
        return 2
    import torch

    from align.data.loaders import load_problems
    from align.diagnostics.attention import measure_attention_entropy, write_heatmap, write_report
    from align.models import load_model_and_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_problems(args.dataset, args.split, limit=args.limit)
    if not loaded.problems:
        print(f"align diagnose attention: no problems in {args.dataset!r} ({args.split})", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, attn_implementation="sdpa", device=device
    )
    texts = texts_for(loaded.problems, tokenizer, args.text, args.prompt_style)
    accumulator = measure_attention_entropy(
        model,
        tokenizer,
        texts,
        batch_size=args.batch_size,
        max_length=args.max_length,
        kernel=args.kernel,
        pack_length=args.pack_length,
        num_sequences=args.num_sequences,
    )
    if args.pack_length is None:
        read = f"{len(texts)} texts"
    else:  # every packed sequence contributes exactly pack_length query rows
        read = f"{int(accumulator.rows[0, 0, 0]) // args.pack_length} x {args.pack_length} packed tokens"
    table = accumulator.table()
    output = Path(args.output_dir)
    summary = write_report(
        table,
        output / "attention_entropy.json",
        args.normalization,
        model=args.model,
        dataset=loaded.source,
        num_texts=len(texts),
        text=args.text,
        max_length=args.max_length,
        kernel=args.kernel,
        pack_length=args.pack_length,
        read=read,
    )
    write_heatmap(
        table[args.normalization],
        output / "attention_entropy.png",
        f"{Path(args.model).name} on {Path(loaded.source).name} ({read})\n"
        f"{args.normalization}-normalized: collapsed {summary['collapsed_frac']:.0%}, "
        f"overloaded {summary['overloaded_frac']:.0%}",
    )
    brief = {k: v for k, v in summary.items() if not k.startswith("layer_")}
    print(json.dumps(brief))
    print(f"wrote {output / 'attention_entropy.json'} and {output / 'attention_entropy.png'}")
    return 0
