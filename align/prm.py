"""Implicit process rewards: per-token log-ratios -> steps -> one score per completion.

A model trained as an outcome reward r = β·log π_θ(y)/π_ref(y) (`align train prm`) is a process reward model for
free (Yuan et al. 2024, "Free Process Rewards without Process Labels", §3): the reward of step k is the sum of
β·log π_θ/π_ref over the step's tokens, r^k = q^k − q^(k−1), with q^k the cumulative log-ratio where step k ends.

    scorer = ImplicitPRM.from_pretrained("runs/prm")          # a LoRA adapter dir: the reference is its base
    [result] = scorer.score([rendered_prompt], [completion], aggregate="min")
    result.score, result.step_rewards, result.q_values, result.steps

How a completion is scored:
1. `prompt + completion + end-of-turn` is tokenized in one piece, as the trainer did (TRL tokenizes the whole
   conversation; the end-of-turn text of the chat template, or EOS for plain prompts, closes the completion during
   training, so its log-ratio is part of the outcome reward and of the last step, as in the reference code).
2. The completion is split into steps and its tokens assigned to them as `align.steps` defines (after each run of
   "\\n\\n" by default, or a regex `step_pattern`, or explicit character offsets; a token belongs to the step holding
   its last character, so q^k never includes text of a later step).
3. The policy and the reference each run once per padded batch (right padding, so causal attention keeps every real
   token's log-prob independent of its batch mates), through TRL's fused LM head (`align.log_probs`, no
   (batch, length, vocab) logits).
4. Completions that share their prompt (the N samples of one problem) are scored against the prompt's key/value
   cache, computed once per model (`share_prompt`): each batch then runs only the completion tokens (and the
   prompt's last token, whose output predicts the first completion token), instead of re-encoding the prompt N
   times. Batches are length-sorted, within a prompt's completions and across the rest, to cut padding.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from align.errors import InputError
from align.log_probs import (
    cache_argument,
    enable_fused_log_probs,
    is_peft_model,
    prefix_cache,
    repeated_cache,
    token_log_probs,
)
from align.losses.implicit_reward import AGGREGATES, aggregate_step_rewards, process_rewards, token_rewards
from align.precision import resolve_inference_dtype
from align.steps import DEFAULT_STEP_SEPARATOR, Segmentation, plan_batches, segment_completion


logger = logging.getLogger("align.prm")

DEFAULT_BETA = 0.05
# Written next to a trained PRM by `align train prm`, read back by `ImplicitPRM.from_pretrained`.
SETTINGS_FILE = "implicit_prm.json"
_TEMPLATE_MARKER = "ALIGN_END_OF_COMPLETION_MARKER"


@dataclass
class StepScore:
    """The implicit PRM's view of one completion. Spans are [start, end) offsets into `text`."""

    score: float  # the requested aggregate of `step_rewards`
    step_rewards: list[float]  # r^k = q^k − q^(k−1)
    q_values: list[float]  # q^k, cumulative up to the end of step k
    outcome_reward: float  # Σ_k r^k = q^n = β·log π_θ(y)/π_ref(y)
    steps: list[str]  # the text of each step (the last one includes the end-of-turn text)
    step_spans: list[tuple[int, int]]  # character span of each step in `text`
    step_token_spans: list[tuple[int, int]]  # [first, last) index into `token_rewards` of each step
    token_rewards: list[float]  # β·log π_θ/π_ref of each scored token
    token_spans: list[tuple[int, int]]  # character span of each scored token in `text`
    text: str  # completion + end-of-turn text: what was scored after the prompt
    aggregate: str = "min"
    truncated: bool = False  # the sequence exceeded `max_length`; steps past it were dropped

    def to_dict(self) -> dict:
        return asdict(self)


def end_of_turn_text(tokenizer) -> str:
    """What closes an assistant turn in training data: the chat template's text after the message content (e.g.
    "<|im_end|>\\n"), or the EOS token for tokenizers without a chat template (TRL appends it to plain completions)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _TEMPLATE_MARKER}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # a template that refuses this conversation: fall back to EOS
            logger.warning("could not render the chat template (%s); closing completions with EOS", error)
        else:
            if _TEMPLATE_MARKER in rendered:
                return rendered[rendered.rindex(_TEMPLATE_MARKER) + len(_TEMPLATE_MARKER) :]
    return tokenizer.eos_token or ""


def read_settings(path: str | Path) -> dict:
    """The settings a trained PRM was saved with (beta, step separator, ...), or {} when there are none."""
    file = Path(path) / SETTINGS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


class ImplicitPRM:
    """Score completions with an implicit PRM: `policy` trained as β·log π/π_ref, and its reference.

    Args:
        model: the trained causal LM, or a `peft.PeftModel` (then the reference defaults to its adapter-disabled
            base).
        tokenizer: the tokenizer both models share (a fast tokenizer: offsets map steps to tokens).
        ref_model: the reference model. Required for a full model unless `reference_free=True`.
        beta: the β of r = β·log π/π_ref. Rankings by any aggregate do not depend on it; σ(score) does.
        reference_free: score β·log π_θ alone (the paper's §5.5.2 variant; rank only equal-length completions).
        step_separator / step_pattern: how steps are delimited (see `align.steps.step_char_spans`).
        end_of_completion: "auto" (the chat template's end of turn, or EOS), None (nothing), or a literal string
            appended after each completion before scoring.
        batch_size: completions per forward pass.
        share_prompt: score completions of the same prompt against its key/value cache, computed once per model
            (the same numbers as re-encoding it, to rounding; fewer tokens through both models).
        max_length: longest tokenized prompt + completion; longer ones are cut and flagged `truncated`. Default:
            the model's `max_position_embeddings`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        ref_model=None,
        beta: float = DEFAULT_BETA,
        reference_free: bool = False,
        step_separator: str | None = DEFAULT_STEP_SEPARATOR,
        step_pattern: str | None = None,
        end_of_completion: str | None = "auto",
        batch_size: int = 8,
        max_length: int | None = None,
        share_prompt: bool = True,
    ):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if reference_free and ref_model is not None:
            raise ValueError("reference_free=True scores without a reference; do not pass ref_model as well.")
        if ref_model is None and not reference_free and not is_peft_model(model):
            raise ValueError(
                "An implicit PRM needs its reference model: pass ref_model (the model the PRM was trained from), "
                "load a LoRA adapter (its base is the reference), or set reference_free=True."
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; step boundaries need its offset mapping. "
                "Load the tokenizer with use_fast=True."
            )
        if step_pattern is not None:
            re.compile(step_pattern)  # fail now, naming the pattern, rather than on the first completion
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self.beta, self.reference_free = float(beta), reference_free
        self.step_separator, self.step_pattern = step_separator, step_pattern
        self.suffix = end_of_turn_text(tokenizer) if end_of_completion == "auto" else (end_of_completion or "")
        self.batch_size, self.share_prompt = batch_size, share_prompt
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = max_length or limit
        enable_fused_log_probs(self.model)
        if self.ref_model is not None:
            enable_fused_log_probs(self.ref_model)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        ref_model=None,
        beta: float | None = None,
        *,
        reference_free: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        **kwargs,
    ) -> ImplicitPRM:
        """Load a PRM from a directory written by `align train prm` (or any causal LM / LoRA adapter).

        `path`: a LoRA adapter directory (the reference defaults to its adapter-disabled base) or a full model
        directory (then pass `ref_model`, a path/alias or a loaded model, unless `reference_free`; a model saved by
        `align train prm` names its reference in `implicit_prm.json`, used when `ref_model` is None). `beta` and the
        step settings default to what the PRM was trained with, else β = 0.05 and "\\n\\n". `device` None means the
        GPU when there is one, else the CPU; `dtype` "auto" means bf16 weights where that device computes bf16
        natively, else float32 (`align.precision`); pass "float32" for scores
        comparable with float32 runs to 1e-6.
        """
        from align.models import check_model_name, load_model_and_tokenizer, resolve_model_path

        # A path that is no model (missing, a data directory, a .jsonl file) is named as such, not as "a full model"
        check_model_name(path, offline_copy=True)
        if isinstance(ref_model, str):
            check_model_name(ref_model, offline_copy=True)  # before the PRM loads, not after
        location = resolve_model_path(path)
        is_adapter = (Path(location) / "adapter_config.json").is_file()
        settings = read_settings(location)
        if ref_model is None and not is_adapter and not reference_free:
            ref_model = settings.get("reference_model")
            if ref_model is None:
                raise InputError(
                    f"{path} is a full model, so the PRM's reference model cannot be derived from it: pass ref_model "
                    "(e.g. --prm-ref with the model the PRM was trained from) or use reference-free scoring."
                )
            logger.info("reference model of %s: %s (from %s)", path, ref_model, SETTINGS_FILE)
        if device is None and torch.cuda.is_available():
            device = "cuda"
        dtype = resolve_inference_dtype(dtype, str(device) if device is not None else "cpu")
        model, tokenizer = load_model_and_tokenizer(location, dtype=dtype, device=device)
        if isinstance(ref_model, str):
            ref_model, ref_tokenizer = load_model_and_tokenizer(ref_model, dtype=dtype, device=device)
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise InputError(
                    f"The PRM {path} and its reference do not share a tokenizer (their vocabularies differ); "
                    "per-token log-ratios need identical tokenization. Use the model the PRM was trained from."
                )
        kwargs.setdefault("step_separator", settings.get("step_separator", DEFAULT_STEP_SEPARATOR))
        kwargs.setdefault("step_pattern", settings.get("step_pattern"))
        beta = beta if beta is not None else settings.get("beta", DEFAULT_BETA)
        return cls(model, tokenizer, ref_model=ref_model, beta=beta, reference_free=reference_free, **kwargs)

    def _segment(self, prompt: str, completion: str, step_ends: Sequence[int] | None, index: int) -> Segmentation:
        return segment_completion(
            self.tokenizer,
            prompt,
            completion,
            step_ends=step_ends,
            separator=self.step_separator,
            pattern=self.step_pattern,
            suffix=self.suffix,
            max_length=self.max_length,
            index=index,
        )

    # ------------------------------------------------------------------ scoring

    @contextmanager
    def _eval_mode(self):
        """No dropout while scoring; the caller's mode (e.g. a trainer's model) is restored afterwards."""
        models = [m for m in (self.model, self.ref_model) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    @torch.inference_mode()
    def _score_batch(self, batch: list[Segmentation], aggregate: str, caches=None) -> list[StepScore]:
        with self._eval_mode():
            return self._score_eval_batch(batch, aggregate, caches)

    def _models(self):
        """(name, model, context) of the policy and of the reference (none when reference-free): a LoRA PRM's
        reference is its own model with the adapter disabled (one model in memory)."""
        yield "policy", self.model, nullcontext()
        if self.ref_model is not None:
            yield "reference", self.ref_model, nullcontext()
        elif not self.reference_free:
            yield "reference", self.model, self.model.disable_adapter()

    def _prefix_caches(self, prefix: list[int]) -> dict:
        """`{model name: key/value cache of the prefix tokens}` (`align.log_probs.prefix_cache`), in eval mode."""
        ids = torch.tensor([prefix], dtype=torch.long, device=next(self.model.parameters()).device)
        with self._eval_mode():
            return {name: prefix_cache(model, ids, context) for name, model, context in self._models()}

    def _score_eval_batch(self, batch: list[Segmentation], aggregate: str, caches=None) -> list[StepScore]:
        """Score `batch`; with `caches` (`_prefix_caches` of the prefix every item shares: its tokens before the
        prompt's last one), only the tokens from the prompt's last one on are run."""
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # first input position of each row: 0, or the shared prefix's length when it comes from the cache
        offsets = [0 if caches is None else item.completion_start - 1 for item in batch]
        length = max(len(item.input_ids) - offset for item, offset in zip(batch, offsets))
        prefix = 0 if caches is None else offsets[0]
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), prefix + length), dtype=torch.long)
        scored = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, (item, offset) in enumerate(zip(batch, offsets)):
            tokens = item.input_ids[offset:]
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : prefix + len(tokens)] = 1
            scored[row, item.completion_start - offset : len(tokens)] = True
        input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)

        log_probs = {}
        for name, model, context in self._models():
            extra = {} if caches is None else {cache_argument(model): repeated_cache(caches[name], len(batch))}
            with context:
                log_probs[name], _ = token_log_probs(model, input_ids, scored, attention_mask, **extra)
        reference = log_probs.get("reference")
        # Index j of the fused output is the log-prob of input token j + 1; input token 0 is never scored.
        rewards = token_rewards(
            log_probs["policy"].double(), None if reference is None else reference.double(), scored[:, 1:], self.beta
        )

        # Completion-aligned token rewards and step boundaries, padded across the batch.
        num_tokens = [len(item.token_spans) for item in batch]
        num_steps = [len(item.step_spans) for item in batch]
        completion_rewards = torch.zeros((len(batch), max(num_tokens)), dtype=torch.float64)
        step_ends = torch.zeros((len(batch), max(num_steps)), dtype=torch.long)
        step_mask = torch.zeros((len(batch), max(num_steps)), dtype=torch.bool)
        for row, (item, offset) in enumerate(zip(batch, offsets)):
            start = item.completion_start - offset - 1
            completion_rewards[row, : num_tokens[row]] = rewards[row, start : start + num_tokens[row]].cpu()
            step_ends[row, : num_steps[row]] = torch.tensor(item.step_ends)
            step_mask[row, : num_steps[row]] = True
        q, r = process_rewards(completion_rewards, step_ends, step_mask)
        scores = aggregate_step_rewards(r, step_mask, aggregate)

        results = []
        for row, item in enumerate(batch):
            k, n = num_steps[row], num_tokens[row]
            bounds = [0, *item.step_ends]
            results.append(
                StepScore(
                    score=float(scores[row]),
                    step_rewards=r[row, :k].tolist(),
                    q_values=q[row, :k].tolist(),
                    outcome_reward=float(completion_rewards[row, :n].sum()),
                    steps=[item.text[s:e] for s, e in item.step_spans],
                    step_spans=list(item.step_spans),
                    step_token_spans=[(bounds[i], bounds[i + 1]) for i in range(k)],
                    token_rewards=completion_rewards[row, :n].tolist(),
                    token_spans=list(item.token_spans),
                    text=item.text,
                    aggregate=aggregate,
                    truncated=item.truncated,
                )
            )
        return results

    def _plan(self, encoded: list[Segmentation]) -> list[tuple[list[int] | None, list[list[int]]]]:
        return plan_batches(encoded, self.batch_size, share_prompt=self.share_prompt)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        aggregate: str = "min",
        step_ends: Sequence[Sequence[int] | None] | None = None,
        progress: bool = False,
    ) -> list[StepScore]:
        """Score each (rendered prompt, completion) pair; returns one `StepScore` per pair, in input order.

        `aggregate`: min (the paper's), mean, last or sum (= the outcome reward). `step_ends`: optional, per
        completion, the character offsets where its steps end (None entries use the separator/pattern).
        """
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one prompt each")
        if step_ends is not None and len(step_ends) != len(completions):
            raise ValueError(f"step_ends has {len(step_ends)} entries for {len(completions)} completions")
        encoded = [
            self._segment(p, c, None if step_ends is None else step_ends[i], i)
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        if any(item.truncated for item in encoded):
            logger.warning(
                "%d of %d completions exceed max_length=%s tokens and were cut; their later steps are not scored",
                sum(item.truncated for item in encoded),
                len(encoded),
                self.max_length,
            )
        from tqdm.auto import tqdm

        results: list[StepScore | None] = [None] * len(encoded)
        plan = self._plan(encoded)
        bar = tqdm(
            total=sum(len(batches) for _, batches in plan), desc="PRM scoring", unit="batch", disable=not progress
        )
        for prefix, batches in plan:
            caches = None if prefix is None else self._prefix_caches(prefix)
            for indices in batches:
                scored = self._score_batch([encoded[i] for i in indices], aggregate, caches)
                for index, result in zip(indices, scored):
                    results[index] = result
                bar.update()
        bar.close()
        return results
