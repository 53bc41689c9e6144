"""`align diagnose entanglement RUN/entanglement.jsonl [--output PNG]`: plot a run's gradient-entanglement records.

The records are written by `align train margin` with `entanglement_steps > 0` (one JSON line per diagnosed pair).
The figure shows the chosen/rejected log-prob trajectories of the sampled pairs, the condition ratio
⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²) over steps, the fraction of pairs in each predicted regime, and how often the
first-order prediction got the sign of the measured Δlog π right. A one-line summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


HELP = "Plot gradient entanglement of a margin-loss run (entanglement.jsonl -> PNG)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align diagnose entanglement", description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="entanglement.jsonl written by `align train margin` (entanglement_steps > 0)")
    parser.add_argument("--output", "-o", help="PNG to write (default: entanglement.png next to the records)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from align.diagnostics.entanglement import plot_entanglement, read_records, summarize

    if not os.path.isfile(args.records):
        print(
            f"align diagnose entanglement: {args.records} does not exist. Train with `align train margin` and "
            "`entanglement_steps: k` (k > 0); the records are written to <output_dir>/entanglement.jsonl.",
            file=sys.stderr,
        )
        return 2
    try:
        records = read_records(args.records)
    except ValueError as error:
        print(f"align diagnose entanglement: {error}", file=sys.stderr)
        return 2
    if not records:
        print(f"align diagnose entanglement: {args.records} holds no records yet.", file=sys.stderr)
        return 2
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.records)), "entanglement.png")
    plot_entanglement(records, output)
    summary = {"records": len(records), "steps": len({r["step"] for r in records}), "plot": output}
    summary.update({key.split("/", 1)[1]: round(value, 4) for key, value in summarize(records).items()})
    print(json.dumps(summary))
    return 0
