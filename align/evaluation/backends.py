"""Generation backends: n sampled completions per prompt, from transformers (`hf`) or vLLM (`vllm`).

`get_backend("auto", model)` picks vLLM when it is importable and a GPU is present, else transformers. Both take
the same `SamplingConfig` and return, per prompt, n `Completion`s (text, number of generated tokens, and whether the
model stopped by itself or hit `max_new_tokens`). Models are anything `align.models.load_model_and_tokenizer`
accepts: an alias (`smollm2-135m-instruct`), a local directory, a Hub id, or a PEFT adapter directory.

Sampling is seeded per sequence from (seed, prompt, sample index) in both backends, so results do not depend on the
batch size, on resuming, or on how problems are sharded across processes (see `align.evaluation.sampling`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from align.evaluation.sampling import SeededSampler, sequence_seed


logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")


@dataclass
class SamplingConfig:
    """How completions are sampled: n per prompt, temperature (0 = greedy), nucleus top_p, length cap, seed."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n (samples per problem) must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token included when there is one
    finish_reason: str  # "stop" (end of sequence) | "length" (max_new_tokens reached)


class GenerationBackend:
    """n completions for each prompt; `tokenizer` renders prompts (chat template) for this model."""

    name = "base"
    tokenizer = None

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        raise NotImplementedError

    def prompts_per_call(self, n: int) -> int:
        """How many prompts a caller should pass per `generate` call (the harness writes results between calls)."""
        return 1

    def close(self) -> None:
        """Free the model (evaluation may load a scorer next)."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. A chat template already writes the BOS token into the text, so special
    tokens are added only when the text does not start with it (plain prompts of base models that expect a BOS)."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]


def _device(prefer: str | None = None) -> str:
    import torch

    if prefer:
        return prefer
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


class HFBackend(GenerationBackend):
    """transformers `generate`: prompts x samples batched `batch_size` sequences at a time, left padding, KV cache.

    Every sequence stops at the end-of-sequence token(s) of the model's generation config and tokenizer, or at
    `max_new_tokens`. Rows are sorted by prompt length before batching to waste less compute on padding.
    """

    name = "hf"

    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int = 16, device: str | None = None):
        import torch

        from align.models import load_model_and_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            model, dtype=self.dtype, device=self.device, padding_side="left"
        )
        if hasattr(self.model, "merge_and_unload"):  # a PEFT adapter: fold it into the weights, generation is faster
            self.model = self.model.merge_and_unload()
        self.model.eval()
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(f"model {model!r} defines no end-of-sequence token; generation could never stop early")
        self.eos_ids = sorted(eos_ids)
        self._torch = torch

    def prompts_per_call(self, n: int) -> int:
        return max(1, self.batch_size // n)

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        rows = [(p, j) for p in range(len(prompts)) for j in range(sampling.n)]
        encoded = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]
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


class VLLMBackend(GenerationBackend):
    """Offline `vllm.LLM`; one `SamplingParams(n=...)` per prompt with a per-prompt seed.

    A PEFT adapter directory is served as a LoRA on top of its base model (`enable_lora=True`). Extra keyword
    arguments (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`) go to `vllm.LLM`.
    """

    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int = 16, **llm_kwargs):
        from vllm import LLM

        from align.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(model)
        adapter_config = Path(path) / "adapter_config.json"
        self.lora_request = None
        if adapter_config.is_file():
            from vllm.lora.request import LoRARequest

            adapter = json.loads(adapter_config.read_text())
            base = resolve_model_path(adapter["base_model_name_or_path"])
            llm_kwargs = {"enable_lora": True, "max_lora_rank": max(8, int(adapter.get("r", 8))), **llm_kwargs}
            self.lora_request = LoRARequest("align-adapter", 1, path)
            tokenizer_path = path if (Path(path) / "tokenizer_config.json").is_file() else base
            path = base
        else:
            tokenizer_path = path
        self.tokenizer = load_tokenizer(tokenizer_path)
        # vLLM batches internally (continuous batching); batch_size is how many prompts it is handed per call
        self.batch_size = batch_size
        self.llm = LLM(model=path, tokenizer=tokenizer_path, dtype=dtype, **llm_kwargs)

    def prompts_per_call(self, n: int) -> int:
        return self.batch_size

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=sampling.max_new_tokens,
                seed=sequence_seed(sampling.seed, prompt, 0) % (2**31),
            )
            for prompt in prompts
        ]
        # token ids, not text: vLLM would add a second BOS to a chat-templated prompt; this way both backends see
        # exactly the same tokens
        token_prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, prompt)} for prompt in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False, lora_request=self.lora_request)
        results = []
        for output in outputs:
            results.append(
                [
                    Completion(
                        text=choice.text,
                        num_tokens=len(choice.token_ids),
                        finish_reason="stop" if choice.finish_reason == "stop" else "length",
                    )
                    for choice in output.outputs
                ]
            )
        return results

    def close(self) -> None:
        self.llm = None


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend_name(name: str) -> str:
    """`auto` -> `vllm` if vLLM is importable and a GPU is present, else `hf`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    import torch

    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def get_backend(name: str, model: str, *, dtype="auto", batch_size: int = 16, **kw) -> GenerationBackend:
    """Build the backend `name` (`auto`, `hf` or `vllm`) for `model`."""
    resolved = resolve_backend_name(name)
    if resolved == "vllm":
        if not vllm_available():
            raise ImportError(
                "backend 'vllm' needs vLLM (GPU machines: pip install 'align[vllm]'); use --backend hf without it."
            )
        return VLLMBackend(model, dtype=dtype, batch_size=batch_size, **kw)
    return HFBackend(model, dtype=dtype, batch_size=batch_size, **kw)
