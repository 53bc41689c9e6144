"""Per-sequence seeded temperature / nucleus sampling, so a sample does not depend on what it was batched with.

`transformers.generate(do_sample=True)` draws every row of a batch from one global random stream, so the text of
sample j of problem i changes with the batch size, with the other problems in the batch, with how a run was resumed
and with how problems were sharded across processes. Here each sequence owns a `torch.Generator` seeded from
(run seed, prompt, sample index), and `SeededSampler` (a logits processor) draws that sequence's next token from its
own stream; generation then runs greedily over the processed logits, which keeps transformers' KV cache, stopping
and padding logic. Result: the same seed gives the same samples on 1 or 8 processes, at any batch size, resumed or
not (up to float noise in batched matmuls, which moves a sample only when a draw lands within ~1e-6 of a boundary).

Sampling: logits / temperature -> softmax -> keep the smallest set of most probable tokens whose mass reaches top_p
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") -> renormalize -> inverse-CDF draw with one
uniform number from the sequence's generator. temperature = 0 is greedy decoding.
"""

from __future__ import annotations

import hashlib

import torch


TOP_K = 1024


def sequence_seed(seed: int, prompt: str, sample_index: int) -> int:
    """A 63-bit seed for one sequence, a function of the run seed, the prompt text and the sample index only."""
    digest = hashlib.sha256(f"{seed}\x00{sample_index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SeededSampler:
    """Logits processor: replaces each row's scores by a one-hot choice drawn from the row's own generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededSampler built for {len(self.generators)} rows got {scores.shape[0]}")
        choice = self.choose(scores)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, choice.unsqueeze(1), 0.0)
        return chosen

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token id of every row (one uniform draw per row, even when greedy, to keep streams aligned)."""
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        if self.temperature == 0:
            return scores.argmax(dim=-1)
        logits = scores.float() / self.temperature
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
        # The nucleus is a prefix of the tokens sorted by probability. Sorting the whole vocabulary (~50k) every step
        # is the slow part, so look at the top TOP_K first and sort everything only if some row's nucleus is wider.
        top_logits, order = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1)
        sorted_probs = (top_logits - log_normalizer).double().exp()
        cumulative = sorted_probs.cumsum(dim=-1)
        if order.shape[-1] < logits.shape[-1] and bool((cumulative[:, -1] < self.top_p).any()):
            top_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = (top_logits - log_normalizer).double().exp()
            cumulative = sorted_probs.cumsum(dim=-1)
        # keep a token if the mass before it is below top_p (so the token crossing top_p is kept, and the top one)
        keep = (cumulative - sorted_probs) < self.top_p
        kept_cumulative = (sorted_probs * keep).cumsum(dim=-1)
        targets = uniforms.to(kept_cumulative.device).unsqueeze(1) * kept_cumulative[:, -1:]
        position = torch.searchsorted(kept_cumulative, targets, right=True)
        # never land on a dropped token (possible only through rounding at the last kept position)
        position = torch.minimum(position, keep.sum(dim=-1, keepdim=True) - 1)
        return order.gather(1, position).squeeze(1)
