"""Checks of the GPU kit that generate or score: GRPO vs pass@N, align's `hf` backend, the implicit PRM's scorer.

- `grpo_vs_pass_n`: TRL's GRPOTrainer vs PassAtNGRPOTrainer (pass_n 16), transformers generation, LoRA, one
  shared `VerifierReward`, learning rate 0 and the same seed per round so both sample the same completions (as in
  benchmarks/pass_n.py); the figure is samples per second.
- `hf_generation`: `HFBackend.generate` at 1, 16 and 64 sequences per call (bf16 weights on CUDA), tokens/s; a
  random model rarely samples its end token, so every sequence runs `new_tokens` long.
- `prm_scoring`: `ImplicitPRM.score` with a LoRA policy (random non-zero B) and its adapter-disabled base as the
  reference, batches of 16 completions, tokens/s.
"""

from __future__ import annotations

import random
import statistics
import time

from benchmarks.common import lora_config, peak_rss
from benchmarks.gpu.kit import Kit, first_batches
from benchmarks.gpu.measure import timed_rounds, training_step_fn


def grpo_vs_pass_n(kit: Kit) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import prompt_rows
    from align.rewards import VerifierReward
    from align.trainers.pass_n import PassAtNConfig, PassAtNGRPOTrainer

    sizes = kit.sizes
    path = kit.model()
    common = dict(
        per_device_train_batch_size=sizes.grpo_prompts * sizes.grpo_generations,
        num_generations=sizes.grpo_generations,
        max_completion_length=sizes.completion_len,
        temperature=1.0,
        loss_type="dr_grpo",  # the same aggregation in both: only the advantages differ
        learning_rate=0.0,
    )
    data = Dataset.from_list(prompt_rows(generate_problems(4 * sizes.grpo_prompts, "train", levels=(1,), seed=0)))
    with VerifierReward(num_workers=2) as reward:
        grpo = GRPOTrainer(
            model=path,
            reward_funcs=reward,
            args=GRPOConfig(**kit.trainer_args("grpo", **common)),
            train_dataset=data,
            peft_config=lora_config(),
        )
        pass_n = PassAtNGRPOTrainer(
            model=path,
            reward_funcs=reward,
            args=PassAtNConfig(pass_n=16, **kit.trainer_args("pass_n", **common)),
            train_dataset=data,
            peft_config=lora_config(),
        )
        batches = first_batches(pass_n, 2)
        variants = {
            "trl_grpo": training_step_fn(kit, grpo, batches, reseed=True, count=len),
            "pass_n": training_step_fn(kit, pass_n, batches, reseed=True, count=len),
        }
        result = timed_rounds(kit, variants, "trl_grpo", sizes.rounds)
    result["samples_per_s"] = result.pop("tokens_per_s")
    return {
        "model": kit.describe_model(),
        "setting": (
            f"LoRA r=16, {sizes.grpo_prompts} prompts x {sizes.grpo_generations} samples x "
            f"{sizes.completion_len} tokens, transformers generation"
        ),
        **result,
    }


def hf_generation(kit: Kit) -> dict:
    from align.data.prompts import render_prompt
    from align.data.synthetic import generate_problems
    from align.evaluation.generation import SamplingConfig
    from align.evaluation.hf_backend import HFBackend

    sizes = kit.sizes
    largest = max(sizes.generation_batches)
    backend = HFBackend(kit.model(), dtype=kit.inference_dtype, batch_size=largest, device=kit.device)
    prompts = [render_prompt(p.problem, backend.tokenizer) for p in generate_problems(largest, "test", seed=0)]
    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, max_new_tokens=sizes.new_tokens, seed=0)
    backend.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=2))  # one-time initialisation, untimed
    rates, peaks = {}, {}
    for batch in sizes.generation_batches:
        backend.batch_size = batch
        runs = []
        for _ in range(1 if kit.tiny else 2):
            kit.reset_peak()
            with peak_rss() as rss:
                kit.synchronize()
                began = time.perf_counter()
                tokens = sum(c.num_tokens for row in backend.generate(prompts[:batch], sampling) for c in row)
                kit.synchronize()
                runs.append(tokens / (time.perf_counter() - began))
            peaks[f"batch_{batch}"] = kit.peak_mib() if kit.cuda else rss["peak_mib"]
            if kit.out_of_time():
                break
        rates[f"batch_{batch}"] = round(statistics.median(runs), 1)
    backend.close()
    return {
        "model": kit.describe_model(),
        "setting": f"{kit.inference_dtype} weights, {sizes.new_tokens} new tokens per sequence",
        "tokens_per_s": rates,
        "ratios": {name: round(rate / rates["batch_1"], 2) for name, rate in rates.items() if name != "batch_1"},
        "baseline": "batch_1, in tokens/s",
        "peak_mib": peaks,
        "memory": "cuda max_memory_allocated" if kit.cuda else "peak RSS above the call's start",
    }


def prm_scoring(kit: Kit) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align.data.prompts import render_prompt
    from align.data.synthetic import corrupt_solution, generate_problems
    from align.prm import ImplicitPRM

    count = kit.sizes.scoring_completions
    path = kit.model()
    tokenizer = kit.tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, kit.inference_dtype)).to(kit.device)
    policy = get_peft_model(policy, lora_config())
    with torch.no_grad():  # a trained adapter has B != 0; with B = 0 every reward would be exactly 0
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator(parameter.device).manual_seed(0))
    rng = random.Random(0)
    problems = generate_problems(count, "test", levels=(1, 2, 3, 4, 5))
    prompts = [render_prompt(p.problem, tokenizer) for p in problems]
    completions = [p.solution if i % 2 else corrupt_solution(p, rng)[0] for i, p in enumerate(problems)]
    tokens = sum(len(tokenizer(p + c)["input_ids"]) for p, c in zip(prompts, completions))
    scorer = ImplicitPRM(policy, tokenizer, batch_size=16)
    scorer.score(prompts[:2], completions[:2])  # warm-up
    runs = []
    for _ in range(2):
        kit.reset_peak()
        with peak_rss() as rss:
            kit.synchronize()
            began = time.perf_counter()
            scores = scorer.score(prompts, completions)
            kit.synchronize()
            runs.append(time.perf_counter() - began)
    if not all(torch.isfinite(torch.tensor([s.score for s in scores]))):
        raise RuntimeError("ImplicitPRM.score returned a non-finite score")
    return {
        "model": kit.describe_model(),
        "setting": f"LoRA policy, adapter-disabled reference, {count} completions, batch 16, {kit.inference_dtype}",
        "tokens_per_s": {"scoring": round(tokens / statistics.median(runs), 1)},
        "completions_per_s": round(count / statistics.median(runs), 2),
        "peak_mib": {"scoring": kit.peak_mib() if kit.cuda else rss["peak_mib"]},
        "memory": "cuda max_memory_allocated" if kit.cuda else "peak RSS above the call's start",
    }
