"""Model-side attention machinery for entropy-regularized attention (Jha & Reagen 2025).

- `fused`: `entropy_fused`, the default attention function registered with transformers: fused attention that
  records exact row entropies from the row log-sum-exp (no T x T tensor) and applies learned per-head temperatures
  (it is on the update path, not an observer); `KERNELS` maps `attention_entropy_kernel` to the implementations;
- `kernel`: `entropy_eager`, the reference: eager attention that takes the entropies from the full softmax;
- `recorder`: the `with recorder:` window that receives one `LayerRecord` per layer from the kernel;
- `parameters`: the learnable per-(layer, head) thresholds and temperatures, attached to the policy and saved apart;
- `folding`: folding learned temperatures into the query projections for a plain checkpoint;
- `modules`: finding a model's attention modules.

The math lives in `align.losses.attention_entropy`, the reports in `align.diagnostics`, the training wiring in
`align.trainers.entropy`; nothing here imports the trainers.
"""
