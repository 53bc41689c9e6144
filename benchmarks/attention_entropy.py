"""Training-step cost of entropy-regularized attention on SmolLM2-135M-Instruct: regularized vs sdpa vs eager.

One full fine-tuning step (TRL's fused-LM-head forward, backward, AdamW) on the same model, batch and seed, for:

- `sdpa`: the baseline every TRL trainer uses by default;
- `eager`: eager attention (what any attention-weight method needs without a custom kernel);
- `regularized`: `entropy_eager` with the trainer's per-step work: the recorder, the band penalty with learnable
  thresholds (`align.losses.attention_entropy.attention_entropy_penalty`), the per-(layer, head) statistics and the
  output log Z probe.

Variants are interleaved (benchmarks.common.interleaved, order rotated each round). One JSON line per sequence
length gives the step-time ratios against sdpa, the activation memory autograd keeps for each variant, and the peak
RSS. A last JSON line profiles one regularized step at the longest length: where the time goes, and the share a
fused entropy-aware attention kernel could remove.
"""

from __future__ import annotations

import torch

from benchmarks.common import cpu_threads, emit, interleaved, ratio


SEQUENCE_LENGTHS = (256, 512)
BATCH_SIZE = 2


def _batch(tokenizer, length: int) -> dict:
    """`BATCH_SIZE` rows of `length` real tokens of synthetic MATH-style text (no padding)."""
    from align.data.synthetic import generate_problems

    text = "\n\n".join(p.problem + "\n" + p.solution for p in generate_problems(400, "train", levels=[1, 2, 3]))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < BATCH_SIZE * length:
        raise SystemExit(f"not enough synthetic text for {BATCH_SIZE} x {length} tokens")
    input_ids = ids[: BATCH_SIZE * length].view(BATCH_SIZE, length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from align.attention.parameters import AttentionEntropyParameters
    from align.diagnostics.log_z import OutputLogZProbe
    from align.models import DEFAULT_MODEL, resolve_model_path
    from align.trainers.entropy_config import EntropyRegularizationArguments

    path = resolve_model_path(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer computes
    config = model.config
    thresholds = AttentionEntropyParameters(config.num_hidden_layers, config.num_attention_heads, 0.5, False)
    settings = EntropyRegularizationArguments(attention_entropy_coef=1e-3)
    optimizer = torch.optim.AdamW([*model.parameters(), *thresholds.parameters()], lr=1e-7)
    probe = OutputLogZProbe(model)
    return tokenizer, model, thresholds, settings, optimizer, probe


def _rotated_interleaved(variants: dict, repeats: int) -> dict[str, dict]:
    """`interleaved`, with the order rotated every round so each variant runs once in each position.

    In a fixed order a variant that follows a smaller one keeps paying page faults for memory the allocator gave
    back, which biased eager attention by ~15 % at length 256 in a first run.
    """
    import statistics

    for fn in variants.values():  # warm-up
        fn()
    names = list(variants)
    times = {name: [] for name in names}
    peaks = {name: 0.0 for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        result = interleaved({name: variants[name] for name in order}, repeats=1, warmup=0)
        for name in names:
            times[name] += result[name]["times_s"]
            peaks[name] = max(peaks[name], result[name]["peak_rss_mib"])
    return {
        name: {
            "times_s": times[name],
            "median_s": round(statistics.median(times[name]), 4),
            "peak_rss_mib": peaks[name],
        }
        for name in names
    }


def _saved_activation_mib(forward, parameters: set[int]) -> float:
    """MiB of distinct tensors autograd keeps for the backward of `forward()`, parameters excluded.

    Unlike peak RSS inside one process (the allocator keeps what an earlier variant freed), this is the activation
    memory a variant adds, independent of the order the variants ran in.
    """
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


def main(repeats: int = 5) -> list[dict]:
    from align.attention.kernel import ATTENTION_IMPLEMENTATION
    from align.attention.recorder import AttentionEntropyRecorder
    from align.diagnostics.attention import HeadEntropyAccumulator
    from align.losses.attention_entropy import attention_entropy_penalty

    tokenizer, model, thresholds, settings, optimizer, _probe = _setup()
    config = model.config
    recorder = AttentionEntropyRecorder()
    parameters = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *thresholds.parameters()]}

    def plain_forward(implementation: str, batch: dict) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        return -model(**batch, fused_lm_head=True).log_probs.mean()

    def regularized_forward(batch: dict) -> torch.Tensor:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
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

    forwards = {
        "sdpa": lambda batch: plain_forward("sdpa", batch),
        "eager": lambda batch: plain_forward("eager", batch),
        "regularized": regularized_forward,
    }

    def step(forward, batch: dict) -> None:
        forward(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = []
    for length in SEQUENCE_LENGTHS:
        batch = _batch(tokenizer, length)
        timings = _rotated_interleaved(
            {name: (lambda f=forward, b=batch: step(f, b)) for name, forward in forwards.items()}, repeats=repeats
        )
        activations = {
            name: _saved_activation_mib(lambda f=forward, b=batch: f(b), parameters)
            for name, forward in forwards.items()
        }
        sdpa = timings["sdpa"]["median_s"]
        results.append(
            emit(
                "attention_entropy",
                model="smollm2-135m-instruct",
                batch_size=BATCH_SIZE,
                seq_len=length,
                threads=cpu_threads(),
                step_s={name: t["median_s"] for name, t in timings.items()},
                ratio_vs_sdpa={name: ratio(t["median_s"], sdpa) for name, t in timings.items()},
                # The fastest of the rounds: least disturbed by other load on a shared machine
                ratio_vs_sdpa_best={
                    name: ratio(min(t["times_s"]), min(timings["sdpa"]["times_s"])) for name, t in timings.items()
                },
                target_ratio_vs_sdpa=1.3,
                meets_target=timings["regularized"]["median_s"] <= 1.3 * sdpa,
                saved_activation_mib=activations,
                activation_ratio_vs_sdpa={name: ratio(mib, activations["sdpa"]) for name, mib in activations.items()},
                peak_rss_mib=(
                    {name: t["peak_rss_mib"] for name, t in timings.items()}
                    | {"note": "above each run's start, in one process: the allocator keeps earlier variants' memory"}
                ),
                times_s={name: t["times_s"] for name, t in timings.items()},
                note="full fine-tuning step: fused-LM-head forward + backward + AdamW, fp32, CPU",
            )
        )
    length = SEQUENCE_LENGTHS[-1]
    results.append(_profile(lambda batch: step(regularized_forward, batch), _batch(tokenizer, length), length))
    return results


def _profile(step, batch: dict, length: int) -> dict:
    """Where one regularized step's CPU time goes: top operators, and the entropy's own share (inclusive)."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]

    def inclusive_share(fragment: str) -> float:
        matching = [e.cpu_time_total for e in events if fragment in e.key]
        return round(max(matching, default=0) / total, 4)

    def self_share(*names: str) -> float:
        return round(sum(e.self_cpu_time_total for e in events if e.key in names) / total, 4)

    return emit(
        "attention_entropy_profile",
        seq_len=length,
        batch_size=BATCH_SIZE,
        step_cpu_s=round(total / 1e6, 3),
        # entropy_eager's extra forward work (row entropies + recorded statistics), and its backward
        entropy_forward_share=inclusive_share("attention_entropy"),
        entropy_backward_share=inclusive_share("_RowEntropyBackward"),
        attention_bmm_share=self_share("aten::bmm"),
        softmax_share=self_share("aten::_softmax", "aten::_softmax_backward_data"),
        top_ops=[{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 4)} for e in top],
    )


if __name__ == "__main__":
    main()
