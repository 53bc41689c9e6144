"""The `hf` backend: transformers `generate`, with align's per-sequence seeded sampler."""

from __future__ import annotations

import logging
import os
from typing import ClassVar

from align.evaluation.batching import AUTO, auto_batch_size, batch_cap, parse_batch_size
from align.evaluation.generation import Completion, GenerationBackend, SamplingConfig, encode_prompt
from align.evaluation.sampling import SeededSampler, sequence_seed
from align.precision import resolve_inference_dtype


logger = logging.getLogger("align.eval")


def _device(prefer: str | None = None) -> str:
    import torch

    if prefer:
        return prefer
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


class HFBackend(GenerationBackend):
    """transformers `generate`: prompts x samples batched `batch_size` sequences at a time, left padding, KV cache.

    Every sequence stops at the end-of-sequence token(s) of the model's generation config and tokenizer, or at
    `max_new_tokens`. Rows are sorted by prompt length before batching to waste less compute on padding.
    """

    name = "hf"
    options: ClassVar[dict[str, tuple[type, str]]] = {
        "device": (str, "where to generate, e.g. cuda:1 or cpu (default: this process's GPU, else cpu)"),
    }

    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int | str = AUTO, device: str | None = None):
        import torch

        from align.models import load_model_and_tokenizer

        self.requested_batch_size = parse_batch_size(batch_size)
        self.device = _device(device)
        self.dtype = resolve_inference_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            model, dtype=self.dtype, device=self.device, padding_side="left"
        )
        if hasattr(self.model, "merge_and_unload"):  # a PEFT adapter: fold it into the weights, generation is faster
            self.model = self.model.merge_and_unload()
        self.model.eval()
        # Keep requires_grad on (free under inference_mode): with it off, torch 2.13's matmul runs the LM head on the
        # last position (transformers slices hidden states for logits_to_keep=1) as a bmm that copies the head's
        # weight per sequence: 4.4 s instead of 9 ms per prefill at batch 64 on SmolLM2 in bf16, which made
        # merged LoRA adapters (frozen by PEFT) sample at a third of the base model's speed.
        self.model.requires_grad_(True)
        # `auto` is sized per generate call from its longest prompt (batching.py); until then, the cap.
        self.batch_size = batch_cap(self.device) if self.requested_batch_size == AUTO else self.requested_batch_size
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(f"model {model!r} defines no end-of-sequence token; generation could never stop early")
        self.eos_ids = sorted(eos_ids)
        self._torch = torch
        # extra `GenerationConfig` fields (e.g. a static KV cache for torch.compile; benchmarks/generation_compile.py)
        self.generation_overrides: dict = {}

    def prompts_per_call(self, n: int) -> int:
        return max(1, self.batch_size // n)

    def engine(self) -> dict:
        """How samples are being generated (recorded with every record, summarized in summary.json)."""
        return {"backend": self.name, "dtype": self.dtype, "batch_size": self.batch_size, "auto_batch": self.auto}

    @property
    def auto(self) -> bool:
        return self.requested_batch_size == AUTO

    def _size_batch(self, longest_prompt: int, max_new_tokens: int) -> None:
        chosen = auto_batch_size(self.model.config, self.dtype, longest_prompt + max_new_tokens, self.device)
        if chosen != self.batch_size or not getattr(self, "_sized", False):
            logger.info(
                "hf backend: batch_size auto -> %d sequences per generate call (%s, %d tokens per sequence)",
                chosen, self.dtype, longest_prompt + max_new_tokens,
            )  # fmt: skip
        self.batch_size, self._sized = chosen, True

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        rows = [(p, j) for p in range(len(prompts)) for j in range(sampling.n)]
        encoded = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]
        if self.auto and encoded:
            self._size_batch(max(map(len, encoded)), sampling.max_new_tokens)
        rows.sort(key=lambda row: -len(encoded[row[0]]))  # stable: samples of a prompt stay together
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            seeds = [sequence_seed(sampling.seed, prompts[p], j) for p, j in batch]
            for (p, j), completion in zip(
                batch, self._generate_batch([encoded[p] for p, _ in batch], seeds, sampling)
            ):
                results[p][j] = completion
        return results

    def _generate_batch(self, token_lists: list[list[int]], seeds: list[int], sampling: SamplingConfig):
        from transformers import GenerationConfig, LogitsProcessorList

        torch = self._torch
        width = max(map(len, token_lists))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in token_lists], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in token_lists], device=self.device
        )
        config = GenerationConfig(
            do_sample=False,  # SeededSampler has already drawn the token; greedy decoding just takes it
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            **self.generation_overrides,
        )
        sampler = SeededSampler(seeds, sampling.temperature, sampling.top_p)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        completions = []
        for row in output[:, width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            generated = row if stop is None else row[:stop]
            completions.append(
                Completion(
                    text=self.tokenizer.decode(generated, skip_special_tokens=True),
                    num_tokens=len(generated) + (stop is not None),
                    finish_reason="length" if stop is None else "stop",
                )
            )
        return completions

    def close(self) -> None:
        self.model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
