"""Timed steps for the GPU kit: interleaved variants, CUDA-synchronized, paired ratios, tokens/s and peak memory.

As in benchmarks/common.py, variants alternate within a round (A, B, A, B, ...; reversed every other round so
neither always goes first) and the ratio of a variant to the baseline is the median over rounds of the two steps'
times in the same round. On CUDA a step is timed between two `torch.cuda.synchronize()` calls (kernels run
asynchronously) and its memory is `torch.cuda.max_memory_allocated` over the step; on CPU, the peak RSS above the
step's start (benchmarks.common.peak_rss).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

from benchmarks.common import peak_rss
from benchmarks.gpu.kit import Kit, batch_tokens


def timed_rounds(kit: Kit, variants: dict[str, Callable[[], int]], baseline: str | None, rounds: int) -> dict:
    """Warm each variant up once, then run up to `rounds` rounds (at least one; none started after the kit's soft
    deadline). Each variant returns the tokens it processed, for tokens/s."""
    for fn in variants.values():
        fn()
    kit.synchronize()
    times = {name: [] for name in variants}
    tokens = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    names = list(variants)
    for index in range(rounds):
        if index > 0 and kit.out_of_time():
            break
        for name in names if index % 2 == 0 else names[::-1]:
            kit.reset_peak()
            with peak_rss() as rss:
                kit.synchronize()
                began = time.perf_counter()
                tokens[name].append(variants[name]())
                kit.synchronize()
                times[name].append(time.perf_counter() - began)
            peak = kit.peak_mib()
            peaks[name] = max(peaks[name], peak if peak is not None else rss["peak_mib"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "step_s": {name: round(value, 4) for name, value in medians.items()},
        "tokens_per_s": {name: round(statistics.median(tokens[name]) / medians[name], 1) for name in names},
        "peak_mib": peaks,
        "memory": "cuda max_memory_allocated" if kit.cuda else "peak RSS above the step's start",
        "rounds": len(times[names[0]]),
    }
    if baseline is not None:
        result["baseline"] = baseline
        result["ratios"] = {
            name: round(statistics.median(t / b for t, b in zip(times[name], times[baseline])), 3)
            for name in names
            if name != baseline
        }
    return result


def training_step_fn(
    kit: Kit, trainer, batches: list, reseed: bool = False, count: Callable = batch_tokens
) -> Callable[[], int]:
    """One optimizer step of `trainer` on the next of `batches`: its own `training_step` (inputs prepared, loss,
    backward) under the kit's autocast, then AdamW and zero_grad; `global_step` advances as in `train()`.

    With `reseed`, torch's seed is set to the step's index first, so two trainers that sample (GRPO) draw the same
    completions in the same round. `count(batch)` is what the step reports it processed (tokens by default)."""
    import torch

    trainer.create_optimizer()
    trainer.model.train()
    if trainer.args.gradient_checkpointing:  # the Trainer turns it on in `train()`, which timed steps bypass
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
        if not trainer.model.is_gradient_checkpointing:
            raise RuntimeError(f"{type(trainer).__name__}: gradient checkpointing did not turn on")
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which training_step runs inside
    cycle = itertools.cycle(batches)
    seeds = itertools.count()

    def step() -> int:
        batch = next(cycle)
        if reseed:
            torch.manual_seed(next(seeds))
        with kit.autocast():
            # a copy: training_step may add keys; GRPO's batches are lists of rows, the others dicts of tensors
            trainer.training_step(trainer.model, dict(batch) if isinstance(batch, dict) else list(batch), None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        return count(batch)

    return step
