"""`align data <builder>`: build training data by sampling from a model and grading (one module per builder)."""

from align.cli import dispatch


HELP = "Build training data by sampling and grading: coverage (DCO p_hat), pairs, outcome labels."


def main(argv: list[str]) -> int:
    return dispatch("align data", __name__, argv)
