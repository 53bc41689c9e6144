"""Live gradient-entanglement diagnostics for margin-based preference training.

Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement" (ICLR 2025,
arXiv 2410.13828): with g_w = ∇θ log π(y_w|x) and g_l = ∇θ log π(y_l|x), a margin loss whose negative gradient is
d_w g_w − d_l g_l raises the chosen log-prob only while ⟨g_w, g_l⟩ < (d_w/d_l)‖g_w‖² and lowers the rejected one only
while ⟨g_w, g_l⟩ < (d_l/d_w)‖g_l‖² (algebra in `align.losses.margin`).

One module per job:

- `gradients`: per-pair g_w, g_l over the selected parameters and their geometry (inner product, squared norms);
- `prediction`: (d_w, d_l) of the update, the first-order predicted Δlog π and regime, and the comparison with the
  measured change;
- `update`: the real optimizer step Δθ projected on g_w, g_l (the update-based prediction g·Δθ) and split into the
  pair's own contribution, the other pairs of the batch, momentum and weight decay;
- `records`: the `entanglement.jsonl` file (append, read, restart on resume);
- `report`: the `entanglement/*` metrics and the plot of a run;
- `monitor`: `EntanglementMonitor`, which runs the above around each diagnosed step;
- `callback`: `EntanglementCallback`, which drives the monitor from the Trainer's events, on any TRL `DPOTrainer`
  (`trainer.add_callback(EntanglementCallback(trainer))`) or inside `MarginPreferenceTrainer`.

The diagnostics never change the update: gradients are taken with `torch.autograd.grad` (nothing is accumulated into
`.grad`, so DDP's reducer and the optimizer never see them), on the unwrapped module, under a forked RNG, and the
pair sampling uses its own seeded generator.
"""

from align.diagnostics.entanglement.callback import EntanglementCallback, check_supported
from align.diagnostics.entanglement.gradients import (
    PairGeometry,
    isolated_rng,
    pair_geometry,
    pair_gradients,
    pair_logps,
    response_row,
    select_parameters,
    sequence_logp,
)
from align.diagnostics.entanglement.monitor import EntanglementMonitor
from align.diagnostics.entanglement.prediction import (
    REGIMES,
    SIGN_RESOLUTION_NATS,
    first_order_prediction,
    regime,
    update_coefficients,
)
from align.diagnostics.entanglement.records import ENTANGLEMENT_FILE, append_records, read_records
from align.diagnostics.entanglement.report import plot_entanglement, summarize


__all__ = [
    "ENTANGLEMENT_FILE",
    "REGIMES",
    "EntanglementCallback",
    "EntanglementMonitor",
    "SIGN_RESOLUTION_NATS",
    "PairGeometry",
    "append_records",
    "check_supported",
    "first_order_prediction",
    "isolated_rng",
    "pair_geometry",
    "pair_gradients",
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
