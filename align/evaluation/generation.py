"""What a generation backend is given and returns: `SamplingConfig` in, n `Completion`s per prompt out.

A backend (`GenerationBackend`) samples n completions for each of a list of rendered prompts; the implementations
are `align.evaluation.hf_backend` (transformers) and `align.evaluation.vllm_backend` (vLLM), and
`align.evaluation.backends` builds one by name. Sampling is seeded per sequence from (seed, prompt, sample index),
so results do not depend on the batch size, on resuming, or on how problems are sharded across processes (see
`align.evaluation.sampling`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar


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
    """n completions for each prompt; `tokenizer` renders prompts (chat template) for this model.

    Subclasses take `(model, *, dtype, batch_size, **options)`, with `options` the keys of `options` below.
    """

    name = "base"
    tokenizer = None
    # engine options this backend accepts (`--backend_kwargs`): name -> (type, help)
    options: ClassVar[dict[str, tuple[type, str]]] = {}

    unavailable = ""  # why it cannot run when `available()` is false, and what to do

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run here (its engine is importable)."""
        return True

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        raise NotImplementedError

    def prompts_per_call(self, n: int) -> int:
        """How many prompts a caller should pass per `generate` call (the harness writes results between calls)."""
        return 1

    def engine(self) -> dict:
        """How samples are being generated (backend, dtype, batch size), recorded with every record."""
        return {"backend": self.name}

    def close(self) -> None:
        """Free the model (evaluation may load a scorer next)."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. A chat template already writes the BOS token into the text, so special
    tokens are added only when the text does not start with it (plain prompts of base models that expect a BOS)."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
