"""`align data pairs`: (correct, incorrect) sampled traces of the same problem, for margin losses and PRM pairs.

align data pairs --model M --dataset synthetic --limit 512 --k 8 --output data/pairs
align train margin --config RECIPE.yaml --dataset_name data/pairs/pairs.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass

from align.commands.data._builder import run_builder


HELP = "Sample k traces per problem; pair correct with incorrect ones (preference data) -> OUT/pairs.jsonl"


@dataclass
class PairsOptions:
    """`align data pairs` has no options of its own."""


def make_rows(records, problems, args, options):
    from align.data.sampled import pair_rows

    rows, counts = pair_rows(records, instruction=args.prompt_instruction, style=args.prompt_style)
    return {"pairs.jsonl": rows}, counts


def main(argv: list[str]) -> int:
    return run_builder("pairs", argv, PairsOptions, make_rows, HELP)
