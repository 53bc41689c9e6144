"""Shared measuring tools: interleaved timings, per-variant peak RSS, JSON-line output.

Absolute CPU times on a shared 2-core machine drift by +-20 % between runs, so every benchmark measures its variants
interleaved (A, B, A, B, ...) in the same process and reports the ratio of medians, plus each variant's peak
resident memory above the level it started from.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_rss():
    """Yields a dict that receives `peak_mib`: the peak RSS reached inside the block, minus the RSS at its start."""
    import gc

    gc.collect()
    result = {}
    can_reset = reset_peak_rss()
    start = _status_kib("VmRSS")
    try:
        yield result
    finally:
        peak = _status_kib("VmHWM") if can_reset else _status_kib("VmRSS")
        result["peak_mib"] = round(max(peak - start, 0) / 1024, 1)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run each variant `warmup` times, then `repeats` rounds of all variants in turn.

    Returns per variant: the list of times (s), the median, and the peak RSS above start of its runs (MiB).
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            with peak_rss() as memory:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory["peak_mib"])
    return {
        name: {
            "times_s": [round(t, 4) for t in times[name]],
            "median_s": round(statistics.median(times[name]), 4),
            "peak_rss_mib": peaks[name],
        }
        for name in variants
    }


def emit(benchmark: str, **fields) -> dict:
    """Print one JSON line (and return it as a dict)."""
    record = {"benchmark": benchmark, **fields}
    print(json.dumps(record), flush=True)
    return record


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("inf")


def cpu_threads() -> int:
    import torch

    return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") is None else int(os.environ["OMP_NUM_THREADS"])


# Trainer arguments every training-step benchmark shares: fp32 on CPU, no checkpoints, logging or progress bars that
# would land inside the timed steps.
CPU_TRAINER_ARGS = dict(
    report_to="none",
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)


def lora_config(enabled: bool = True):
    """align's LoRA adapter (r=16, alpha=32 on every linear layer) without dropout, so timed steps are deterministic,
    or None for full fine-tuning."""
    from align.models import build_lora_config

    return build_lora_config(lora_dropout=0.0) if enabled else None


def optimizer_step_fn(trainer, batches: list) -> Callable[[], None]:
    """One timed step of `trainer` on the next prepared batch: its own loss, backward, AdamW, zero_grad."""
    import itertools

    cycle = itertools.cycle(batches)

    def step():
        loss = trainer.compute_loss(trainer.model, dict(next(cycle)))
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def sampling_step_fn(trainer, batches: list) -> Callable[[], None]:
    """One timed step of a GRPO-style `trainer` on the next prompt batch: generate, grade, weigh, forward, backward,
    AdamW, zero_grad. Every trainer draws the same sequence of torch seeds, so trainers compared side by side
    sample the same completions."""
    import itertools

    import torch

    cycle = itertools.cycle(batches)
    seeds = itertools.count()

    def step():
        torch.manual_seed(next(seeds))
        trainer.training_step(trainer.model, next(cycle), None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step
