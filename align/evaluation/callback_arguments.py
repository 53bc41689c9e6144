"""`align train` options of the training-time evaluation (`align.evaluation.callback.CoverageEvalCallback`).

A dataclass of its own, importing nothing heavy: `align.configs.DataArguments` extends it, and `align train --help`
must not import transformers' Trainer stack (seconds) to list these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CoverageEvalArguments:
    """`align train` options of the training-time evaluation (`CoverageEvalCallback`); off unless
    `coverage_eval_steps` > 0. The problems are the training dataset's `coverage_eval_split`, rendered with the
    training prompt (`prompt_style`, `prompt_instruction`)."""

    coverage_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps (and at the last), log exact coverage and/or sampled pass@k/maj@k on "
            "held-out problems (eval_exact_pass@N, eval_pass@k, eval_maj@k); 0 = off."
        },
    )
    coverage_eval_problems: int = field(default=64, metadata={"help": "Held-out problems evaluated."})
    coverage_eval_split: str = field(
        default="test", metadata={"help": "Split of the training dataset they come from (held out from training)."}
    )
    coverage_eval_exact: bool = field(
        default=True,
        metadata={
            "help": "Exact coverage: p = π(canonical completion + EOS | prompt), pass@N >= 1 - (1 - p)^N (for "
            "direct-answer tasks; the completion is `$\\boxed{ANSWER}$`)."
        },
    )
    coverage_eval_samples: int = field(
        default=0, metadata={"help": "Samples per problem for sampled pass@k / maj@k (0 = none)."}
    )
    coverage_eval_ks: list[int] = field(
        default_factory=lambda: [1, 16], metadata={"help": "The N (exact) and k (sampled, k <= samples) logged."}
    )
    coverage_eval_temperature: float = field(default=1.0, metadata={"help": "Temperature scored and sampled."})
    coverage_eval_max_new_tokens: int = field(default=32, metadata={"help": "Token cap of a sampled completion."})

    def __post_init__(self):
        if self.coverage_eval_steps < 0:
            raise ValueError(f"coverage_eval_steps must be >= 0 (0 = off), got {self.coverage_eval_steps}")
        if self.coverage_eval_steps and not (self.coverage_eval_exact or self.coverage_eval_samples > 0):
            raise ValueError(
                "coverage_eval_steps is set but nothing is evaluated: keep coverage_eval_exact true or set "
                "coverage_eval_samples to N > 0"
            )
        for name in ("coverage_eval_problems", "coverage_eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.coverage_eval_samples < 0:
            raise ValueError(f"coverage_eval_samples must be >= 0, got {self.coverage_eval_samples}")
        if not self.coverage_eval_ks or min(self.coverage_eval_ks) < 1:
            raise ValueError(f"coverage_eval_ks must be integers >= 1, got {self.coverage_eval_ks}")
        if self.coverage_eval_temperature < 0:
            raise ValueError(f"coverage_eval_temperature must be >= 0, got {self.coverage_eval_temperature}")
