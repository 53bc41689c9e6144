"""Live gradient-entanglement diagnostics for margin-based preference training.

Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement" (ICLR 2025,
arXiv 2410.13828): with g_w = ∇θ log π(y_w|x) and g_l = ∇θ log π(y_l|x), a margin loss whose negative gradient is
d_w g_w − d_l g_l raises the chosen log-prob only while ⟨g_w, g_l⟩ < (d_w/d_l)‖g_w‖² and lowers the rejected one only
while ⟨g_w, g_l⟩ < (d_l/d_w)‖g_l‖² (algebra in `align.losses.margin`).

One module per job:

- `gradients`: per-pair g_w, g_l over the selected parameters and their geometry (inner product, squared norms);
- `prediction`: (d_w, d_l) of the update, the first-order predicted Δlog π and regime, and the comparison with the
  measured change;
- `records`: the `entanglement.jsonl` file (append, read, restart on resume);
- `report`: the `entanglement/*` metrics and the plot of a run;
- `monitor`: `EntanglementMonitor` and `EntanglementCallback`, which run the above around each diagnosed step.

The diagnostics never change the update: gradients are taken with `torch.autograd.grad` (nothing is accumulated into
`.grad`, so DDP's reducer and the optimizer never see them), on the unwrapped module, under a forked RNG, and the
pair sampling uses its own seeded generator.
"""

from align.diagnostics.entanglement.gradients import (
    PairGeometry,
    isolated_rng,
    pair_geometry,
    pair_logps,
    response_row,
    select_parameters,
    sequence_logp,
)
from align.diagnostics.entanglement.monitor import EntanglementCallback, EntanglementMonitor
from align.diagnostics.entanglement.prediction import REGIMES, first_order_prediction, regime, update_coefficients
from align.diagnostics.entanglement.records import ENTANGLEMENT_FILE, append_records, read_records
from align.diagnostics.entanglement.report import plot_entanglement, summarize


__all__ = [
    "ENTANGLEMENT_FILE",
    "REGIMES",
    "EntanglementCallback",
    "EntanglementMonitor",
    "PairGeometry",
    "append_records",
    "first_order_prediction",
    "isolated_rng",
    "pair_geometry",
    "pair_logps",
    "plot_entanglement",
    "read_records",
    "regime",
    "response_row",
    "select_parameters",
    "sequence_logp",
    "summarize",
    "update_coefficients",
]
