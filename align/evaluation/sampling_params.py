"""Align's `SamplingConfig` as the request fields that vLLM and OpenAI-compatible servers share.

`vllm.SamplingParams` and the OpenAI completions API name these fields alike (`n`, `temperature`, `top_p`,
`max_tokens`, `seed`, `stop`), so one function builds them for the in-process `vllm` backend and for the `openai`
backend (`vllm serve`, SGLang, llama.cpp, TGI), and the two cannot drift apart: the same run seed gives the same
per-prompt seed, so both ask vLLM (in process or served) for the same samples.

Seeds: such an engine takes one seed per request and draws the request's n samples from it, so the seed is a
function of the run seed and the prompt text only (`request_seed`), never of the batch, the shard or the order of
requests: a resumed or sharded run asks for every prompt exactly what the first, single-process run asked. It is
reduced to 31 bits because servers differ in the integer they accept (llama.cpp: uint32, -1 = random; others int64).
"""

from __future__ import annotations

from align.evaluation.generation import SamplingConfig
from align.evaluation.sampling import sequence_seed


SEED_RANGE = 2**31


def request_seed(seed: int, prompt: str, sample_index: int = 0) -> int:
    """The engine seed of a request: a function of (run seed, prompt, first sample index) only, in [0, 2**31)."""
    return sequence_seed(seed, prompt, sample_index) % SEED_RANGE


def sampling_fields(
    sampling: SamplingConfig, prompt: str, *, sample_index: int | None = None, stop: list[str] | None = None
) -> dict:
    """The request fields of `prompt` under `sampling`: `n`, `temperature`, `top_p`, `max_tokens`, `seed` (and
    `stop` when given; align stops at end of sequence only, which both engines do by default).

    `sample_index=j` asks for sample j alone (`n = 1`, seeded by j), for servers that ignore `n`; sample 0 alone is
    the same request as a run with n = 1.
    """
    greedy = sampling.temperature == 0
    fields = {
        "n": sampling.n if sample_index is None else 1,
        "temperature": sampling.temperature,
        # greedy decoding ignores the nucleus; 1.0 keeps engines that validate top_p against temperature quiet
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": request_seed(sampling.seed, prompt, sample_index or 0),
    }
    if stop:
        fields["stop"] = list(stop)
    return fields
