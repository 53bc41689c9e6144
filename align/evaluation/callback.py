"""Training-time evaluation on held-out problems: exact coverage and/or sampled pass@k / maj@k, every N steps,
logged through the trainer, so `report_to` (TensorBoard, W&B, ...) and `trainer.state.log_history` show pass@1 and
pass@16 curves during any transformers or TRL run (SFT, DPO, GRPO, align's trainers):

    trainer.add_callback(CoverageEvalCallback(trainer, problems, every=50, exact=True, samples=16))

Logged keys, at every `every`-th optimizer step and at the last one: `eval_exact_pass@N` (the exact lower bound
1 - (1 - p)^N of `align.evaluation.exact_coverage`, for N in `ks`) and `eval_exact_mean_log_p`; with `samples` = n,
`eval_pass@k` and `eval_maj@k` for k in `ks` up to n (unbiased estimators of n samples, graded by math-verify,
seeded per sequence, so every evaluation draws with the same random numbers and differences between steps are not
sampling noise); `eval_coverage_s`, the evaluation's seconds. TensorBoard files them under `eval/`.

The values are logged with `transformers.Trainer.log` itself, not the trainer's override: TRL's trainers average
and clear their own step metrics in `log`, which a callback's extra call would flush early. Every process evaluates
the same problems (a ZeRO-3 forward needs every rank); the trackers log the main process's numbers.

`align train` turns it on from a recipe or the command line with `align.evaluation.callback_arguments.
CoverageEvalArguments` (fields of its `DataArguments`): `--coverage_eval_steps 10 --coverage_eval_problems 64
[--coverage_eval_samples 16]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
from transformers import Trainer, TrainerCallback

from align.evaluation.exact_coverage import (
    DEFAULT_FORMAT,
    canonical_completion,
    check_canonical,
    completion_log_probs,
    eos_token_ids,
    pass_at_n_lower_bound,
)
from align.evaluation.hf_backend import HFBackend


logger = logging.getLogger("align.eval")


class _LoadedModelBackend(HFBackend):
    """The `hf` backend's seeded sampling (`HFBackend.generate`) on a model already in memory (the one training)."""

    def __init__(self, model, tokenizer, batch_size: int):
        import torch

        self.model, self.tokenizer, self._torch = model, tokenizer, torch
        self.requested_batch_size = self.batch_size = batch_size
        self.device = str(next(model.parameters()).device)
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.generation_overrides = {"use_cache": True}  # training may have turned the model's cache off


class CoverageEvalCallback(TrainerCallback):
    """Evaluate `problems` (align `Problem`s) with the training model every `every` steps; see the module docstring.

    `exact`: exact coverage; `samples`: n samples per problem for pass@k / maj@k (0: none); `ks`: the N and k
    logged; `temperature`, `top_p`: the distribution scored and sampled; `prompt_style`, `instruction`: as in
    training; `completion_format`: the canonical completion (ANSWER = the gold answer); `batch_size`: sequences per
    forward / generate call; `grader_workers`: math-verify processes for the samples.
    """

    def __init__(
        self,
        trainer,
        problems,
        *,
        every: int,
        exact: bool = True,
        samples: int = 0,
        ks: Sequence[int] = (1, 16),
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        prompt_style: str = "chat",
        instruction: str | None = None,
        completion_format: str = DEFAULT_FORMAT,
        batch_size: int = 64,
        seed: int = 0,
        grader_workers: int = 1,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        if not problems:
            raise ValueError("CoverageEvalCallback needs at least one held-out problem")
        self.trainer, self.problems, self.every = trainer, list(problems), every
        self.exact, self.samples, self.ks = exact, samples, sorted(set(ks))
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.prompt_style, self.instruction, self.completion_format = prompt_style, instruction, completion_format
        self.batch_size, self.seed, self.grader_workers = batch_size, seed, grader_workers
        self._grader = None
        self._exact_problems = None  # those with a canonical answer, decided at the first evaluation

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            should_log = control.should_log  # logging clears it: the trainer's own log of this step must still run
            Trainer.log(self.trainer, self.evaluate(kwargs.get("model") or self.trainer.model))
            control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._grader is not None:
            self._grader.close()
            self._grader = None

    def grader(self):
        from align.grading import Grader

        if self._grader is None:
            self._grader = Grader(num_workers=self.grader_workers)
        return self._grader

    def evaluate(self, model) -> dict[str, float]:
        """The metrics of the module docstring for `model` now (left in the mode it was in)."""
        from align.data.prompts import render_prompt

        tokenizer = self.trainer.processing_class
        began, was_training = time.perf_counter(), model.training
        model.eval()
        try:
            prompts = {
                p.id: render_prompt(p.problem, tokenizer, self.instruction, self.prompt_style) for p in self.problems
            }
            metrics = self._exact(model, tokenizer, prompts) if self.exact else {}
            if self.samples:
                metrics.update(self._sampled(model, tokenizer))
        finally:
            model.train(was_training)
        metrics["eval_coverage_s"] = round(time.perf_counter() - began, 3)
        return metrics

    def _exact(self, model, tokenizer, prompts: dict[str, str]) -> dict[str, float]:
        completions = {
            p.id: canonical_completion(p.answer, self.completion_format, self.prompt_style) for p in self.problems
        }
        if self._exact_problems is None:
            kept, skipped = check_canonical(
                self.problems, [completions[p.id] for p in self.problems], self.grader(), skip_invalid=True
            )
            if skipped:
                logger.warning("exact coverage skips %d held-out problems: %s", len(skipped), skipped[0]["skipped"])
            self._exact_problems = [self.problems[i] for i in kept]
        chosen = self._exact_problems
        if not chosen:
            return {}
        log_p = [0.0] * len(chosen)
        for index, value, _ in completion_log_probs(
            model,
            tokenizer,
            [prompts[p.id] for p in chosen],
            [completions[p.id] for p in chosen],
            eos_ids=eos_token_ids(model, tokenizer),
            temperature=self.temperature,
            top_p=self.top_p,
            batch_size=self.batch_size,
        ):
            log_p[index] = value
        bound = pass_at_n_lower_bound(log_p, self.ks).mean(axis=0)
        finite = [value for value in log_p if np.isfinite(value)]
        metrics = {f"eval_exact_pass@{n}": float(value) for n, value in zip(self.ks, bound)}
        metrics["eval_exact_mean_log_p"] = float(np.mean(finite)) if finite else float("-inf")
        return metrics

    def _sampled(self, model, tokenizer) -> dict[str, float]:
        from align.evaluation.generation import SamplingConfig
        from align.evaluation.report import problem_metrics
        from align.evaluation.sample_and_grade import sample_and_grade

        sampling = SamplingConfig(
            n=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        backend = _LoadedModelBackend(model, tokenizer, self.batch_size)
        records = sample_and_grade(
            self.problems,
            backend,
            self.grader(),
            sampling,
            prompt_style=self.prompt_style,
            instruction=self.instruction,
            progress=False,
        )
        ks = [k for k in self.ks if k <= self.samples]
        rows = [problem_metrics(record, self.samples, ks, self.seed, 1, scored=False) for record in records]
        return {
            f"eval_{family}@{k}": float(np.mean([row[f"{family}@{k}"] for row in rows]))
            for family in ("pass", "maj")
            for k in ks
        }


def callback_from_arguments(trainer, data_args, seed: int = 0) -> CoverageEvalCallback:
    """The callback `align train` adds when `coverage_eval_steps` > 0: `data_args` is its `DataArguments` (which
    holds the `CoverageEvalArguments` fields); the problems are its dataset's `coverage_eval_split`."""
    from align.data.loaders import load_problems_as_configured

    if data_args.coverage_eval_split == data_args.dataset_train_split and data_args.dataset_name != "synthetic":
        logger.warning(
            "coverage_eval_split %r is the training split: the evaluated problems are not held out",
            data_args.coverage_eval_split,
        )
    if data_args.coverage_eval_exact and data_args.completion_target != "answer":
        logger.warning(
            "exact coverage scores the direct answer `%s`; with completion_target %r the model is trained to write a "
            "solution first, so the bound will be near 0 (use coverage_eval_samples for sampled pass@k)",
            DEFAULT_FORMAT, data_args.completion_target,
        )  # fmt: skip
    loaded = load_problems_as_configured(
        data_args,
        name=data_args.dataset_name,
        split=data_args.coverage_eval_split,
        limit=data_args.coverage_eval_problems,
    )
    return CoverageEvalCallback(
        trainer,
        loaded.problems,
        every=data_args.coverage_eval_steps,
        exact=data_args.coverage_eval_exact,
        samples=data_args.coverage_eval_samples,
        ks=data_args.coverage_eval_ks,
        temperature=data_args.coverage_eval_temperature,
        max_new_tokens=data_args.coverage_eval_max_new_tokens,
        prompt_style=data_args.prompt_style,
        instruction=data_args.prompt_instruction,
        seed=seed,
    )
