"""`align data coverage`: correct sampled traces with their p_hat = c/k, the training data of DCO.

align data coverage --model M --dataset synthetic --limit 512 --k 8 --output data/coverage
align train dco --config RECIPE.yaml --dataset_name data/coverage/coverage.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.commands.data._builder import run_builder


HELP = "Sample k traces per problem; keep the correct ones with p_hat = c/k (DCO data) -> OUT/coverage.jsonl"


@dataclass
class CoverageOptions:
    include_reference: bool = field(
        default=False,
        metadata={
            "help": "For problems with no correct sample, add the dataset's reference solution with p_hat = 0 "
            "(otherwise they are only counted)."
        },
    )


def make_rows(records, problems, args, options):
    from align.data.sampled import coverage_rows

    references = {problem.id: problem.solution for problem in problems} if options.include_reference else None
    rows, counts = coverage_rows(
        records, instruction=args.prompt_instruction, style=args.prompt_style, references=references
    )
    return {"coverage.jsonl": rows}, counts


def main(argv: list[str]) -> int:
    return run_builder("coverage", argv, CoverageOptions, make_rows, HELP)
