"""Training-step cost of entropy-regularized attention on SmolLM2-135M-Instruct: fused and eager vs plain sdpa.

One full fine-tuning step (TRL's fused-LM-head forward, backward, AdamW) at batch 1 and sequence length T, for:

- `sdpa`: the baseline every TRL trainer uses by default;
- `fused`: `entropy_fused` (align.attention.fused) with the trainer's per-step work: the recorder, the band penalty
  with learnable thresholds, the per-(layer, head) statistics and the output log Z probe. The max attention logit is
  left to logging steps, as the trainer does; its cost is measured apart (`max_logit_s`: one step that records it);
- `eager`: `entropy_eager`, the reference (the full softmax per layer, kept for the backward), with the same work.

Every (variant, T) runs in a fresh subprocess, so each peak RSS is that variant's own (`peak_rss_mib`: the process's
high-water mark during the steps above its RSS once the model is loaded; AdamW's state included). A variant
that fails (out of memory) or exceeds `--time-budget` is reported as such and not run at longer T. Per T one JSON
line gives the step times, the time and peak-memory ratios against sdpa, the activations autograd keeps, and the
attention-only time from a profiled step (`attention_forward_s`: the attention calls, record_function regions;
`attention_backward_s`: the fused kernels' backward ops, which eager's generic matmul/softmax backward lacks).

    python -m benchmarks attention_entropy                      # make bench: T = 512, 1024
    python -m benchmarks.attention_entropy --lengths 512 1024 2048 4096 --repeats 3 --time-budget 1800
    python -m benchmarks.attention_entropy --model DIR --lengths 32 64 --repeats 1   # a tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import cpu_threads, emit, peak_rss, ratio


SEQUENCE_LENGTHS = (512, 1024)  # `make bench`; the table: --lengths 512 1024 2048 4096
VARIANTS = ("sdpa", "fused", "eager")
TIME_BUDGET_S = 1800  # per (variant, T) subprocess, model loading included


def _batch(tokenizer, length: int) -> dict:
    """One row of `length` real tokens of synthetic MATH-style text (no padding)."""
    from align.data.synthetic import generate_problems

    text = "\n\n".join(p.problem + "\n" + p.solution for p in generate_problems(2000, "train", levels=[1, 2, 3]))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < length:
        raise SystemExit(f"not enough synthetic text for {length} tokens")
    input_ids = ids[:length].view(1, length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _profiled_attention(implementation: str) -> str:
    """Register `bench_<implementation>`: the same attention and mask inside a `bench_attention` profiler region."""
    from transformers import AttentionInterface, AttentionMaskInterface

    attention = AttentionInterface._global_mapping[implementation]
    name = f"bench_{implementation}"

    def timed(*args, **kwargs):
        with torch.profiler.record_function("bench_attention"):
            return attention(*args, **kwargs)

    AttentionInterface.register(name, timed)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[implementation])
    return name


def worker(variant: str, length: int, repeats: int, model_path: str | None) -> dict:
    """Measure one variant at one length in this (fresh) process; returns the measurement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from align.attention.fused import KERNELS
    from align.attention.parameters import AttentionEntropyParameters
    from align.attention.recorder import AttentionEntropyRecorder
    from align.diagnostics.attention import HeadEntropyAccumulator
    from align.diagnostics.log_z import OutputLogZProbe
    from align.losses.attention_entropy import attention_entropy_penalty
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.trainers.entropy_config import EntropyRegularizationArguments

    path = model_path or resolve_model_path(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer computes
    config = model.config
    regularized = variant != "sdpa"
    model.set_attn_implementation(_profiled_attention(KERNELS.get(variant, variant)))
    thresholds = AttentionEntropyParameters(config.num_hidden_layers, config.num_attention_heads, 0.5, False)
    settings = EntropyRegularizationArguments(attention_entropy_coef=1e-3)
    optimizer = torch.optim.AdamW([*model.parameters(), *thresholds.parameters()], lr=1e-7)
    if regularized:
        OutputLogZProbe(model)
    recorder = AttentionEntropyRecorder(record_max_logit=False)
    batch = _batch(tokenizer, length)

    def forward() -> torch.Tensor:
        if not regularized:
            return -model(**batch, fused_lm_head=True).log_probs.mean()
        with recorder:
            loss = -model(**batch, fused_lm_head=True).log_probs.mean()
        records = recorder.layer_records()
        penalty = attention_entropy_penalty(
            records,
            thresholds.thresholds(),
            settings.attention_entropy_tolerance,
            settings.attention_entropy_convention,
            settings.attention_entropy_normalization,
        )
        HeadEntropyAccumulator(config.num_hidden_layers, config.num_attention_heads).add(records)  # metrics
        return loss + settings.attention_entropy_coef * penalty

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    with peak_rss() as memory:  # above the loaded model
        step()  # warm-up (also allocates AdamW's state)
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    result = {
        "step_s": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "peak_rss_mib": memory["peak_mib"],
        "saved_activation_mib": _saved_activation_mib(forward, model, thresholds),
        **_profile(step),
    }
    if variant == "fused":  # a logging step: the blockwise max-logit pass on top
        recorder.record_max_logit = True
        start = time.perf_counter()
        step()
        result["max_logit_step_s"] = round(time.perf_counter() - start, 4)
        result["max_logit_s"] = _profile(step)["max_logit_s"]
    return result


def _saved_activation_mib(forward, model, thresholds) -> float:
    """MiB of distinct tensors autograd keeps for the backward of `forward()`, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *thresholds.parameters()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    del loss
    return round(sum(storages.values()) / 2**20, 1)


def _profile(step) -> dict:
    """Attention-only CPU time of one step: forward regions (inclusive) and the fused kernels' backward ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)

    def inclusive_s(name: str) -> float:
        return round(sum(e.cpu_time_total for e in events if e.key == name) / 1e6, 4)

    backward = sum(e.self_cpu_time_total for e in events if "flash_attention_for_cpu_backward" in e.key)
    return {
        "profiled_step_cpu_s": round(total / 1e6, 3),
        "attention_forward_s": inclusive_s("bench_attention"),
        "entropy_forward_s": inclusive_s("attention_entropy"),
        "attention_backward_s": round(backward / 1e6, 4),
        "max_logit_s": inclusive_s("attention_max_logit"),
    }


def _measure(variant: str, length: int, repeats: int, budget_s: float, model_path: str | None) -> dict:
    command = [sys.executable, "-m", "benchmarks.attention_entropy", "--worker", variant]
    command += ["--lengths", str(length), "--repeats", str(repeats)] + (["--model", model_path] if model_path else [])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {budget_s:.0f} s"}
    if proc.returncode != 0:
        killed = proc.returncode < 0 or "out of memory" in proc.stderr.lower()
        return {"status": "out of memory" if killed else f"failed: {proc.stderr.strip()[-300:]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(
    lengths=SEQUENCE_LENGTHS,
    repeats: int = 3,
    time_budget_s: float = TIME_BUDGET_S,
    variants=VARIANTS,
    model_path: str | None = None,
) -> list[dict]:
    results, stopped = [], {}
    for length in lengths:
        runs = {}
        for variant in variants:
            if variant in stopped:
                runs[variant] = {"status": f"not run: {stopped[variant]} at a shorter length"}
                continue
            runs[variant] = _measure(variant, length, repeats, time_budget_s, model_path)
            if runs[variant]["status"] != "ok":
                stopped[variant] = runs[variant]["status"]
        done = {name: run for name, run in runs.items() if run["status"] == "ok"}
        sdpa = done.get("sdpa")

        def versus(field: str, _sdpa=sdpa, _done=done) -> dict:
            return {name: ratio(run[field], _sdpa[field]) for name, run in _done.items()} if _sdpa else {}

        results.append(
            emit(
                "attention_entropy",
                model=model_path or "smollm2-135m-instruct",
                batch_size=1,
                seq_len=length,
                threads=cpu_threads(),
                time_ratio_vs_sdpa=versus("step_s"),
                peak_memory_ratio_vs_sdpa=versus("peak_rss_mib"),
                activation_ratio_vs_sdpa=versus("saved_activation_mib"),
                targets={"peak_memory_ratio": 1.1, "time_ratio_from_T1024": 1.3},
                runs=runs,
                note="full fine-tuning step (fused-LM-head forward + backward + AdamW), fp32, CPU; one fresh "
                "process per variant and length",
            )
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(SEQUENCE_LENGTHS))
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per variant and length (median).")
    parser.add_argument("--time-budget", type=float, default=TIME_BUDGET_S, help="Seconds per variant and length.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--model", default=None, help="Model directory (default: the embedded SmolLM2-135M).")
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(worker(options.worker, options.lengths[0], options.repeats, options.model)))
    else:
        main(options.lengths, options.repeats, options.time_budget, options.variants, options.model)
