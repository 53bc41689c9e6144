"""`align diagnose <report>`: plots and reports of training diagnostics (one module per report)."""

from align.cli import dispatch


HELP = (
    "Reports and plots: entanglement (margin losses), pairs (CHES of preference pairs, before training), steps (PRM "
    "step rewards), attention (entropy heatmaps)."
)


def main(argv: list[str]) -> int:
    return dispatch("align diagnose", __name__, argv)
