"""Speed and memory benchmarks: ours vs the baseline, side by side in one process run, printed as JSON lines."""
