"""Model-side attention machinery for entropy-regularized attention (Jha & Reagen 2025).

- `kernel`: `entropy_eager`, the attention function registered with transformers that records row entropies and
  applies learned per-head temperatures (it is on the update path, not an observer);
- `recorder`: the `with recorder:` window that receives one `LayerRecord` per layer from the kernel;
- `parameters`: the learnable per-(layer, head) thresholds and temperatures, attached to the policy and saved apart;
- `folding`: folding learned temperatures into the query projections for a plain checkpoint;
- `modules`: finding a model's attention modules.

The math lives in `align.losses.attention_entropy`, the reports in `align.diagnostics`, the training wiring in
`align.trainers.entropy`; nothing here imports the trainers.
"""
