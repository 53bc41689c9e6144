"""The one-shot GPU verification kit (docs/gpu.md): `bash benchmarks/gpu/run.sh [--tiny] [--device D] OUTDIR`."""
