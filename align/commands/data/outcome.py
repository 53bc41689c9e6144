"""`align data outcome`: sampled traces with their outcome label (correct or not), for the implicit PRM's CE loss.

align data outcome --model M --dataset synthetic --limit 512 --k 8 --output data/outcome [--pairs]
align train prm --config RECIPE.yaml --dataset_name data/outcome/outcome.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.commands.data._builder import run_builder


HELP = "Sample k traces per problem and label each correct/incorrect (PRM ce data) -> OUT/outcome.jsonl"


@dataclass
class OutcomeOptions:
    pairs: bool = field(
        default=False, metadata={"help": "Also write OUT/pairs.jsonl (correct/incorrect pairs, for dpo/nca PRMs)."}
    )


def make_rows(records, problems, args, options):
    from align.data.sampled import outcome_label_rows, pair_rows

    rows, counts = outcome_label_rows(records, instruction=args.prompt_instruction, style=args.prompt_style)
    files = {"outcome.jsonl": rows}
    if options.pairs:
        pairs, pair_counts = pair_rows(records, instruction=args.prompt_instruction, style=args.prompt_style)
        files["pairs.jsonl"] = pairs
        counts = {**counts, "pairs": pair_counts}
    return files, counts


def main(argv: list[str]) -> int:
    return run_builder("outcome", argv, OutcomeOptions, make_rows, HELP)
