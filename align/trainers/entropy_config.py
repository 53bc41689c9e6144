"""Config fields of entropy-regularized attention (Jha & Reagen 2025; Wortsman et al. 2024's z-loss).

`EntropyRegularizationArguments` is a dataclass mixed into any TRL config by
`align.trainers.entropy.with_entropy_regularization`; every field defaults to off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.losses.attention_entropy import CONVENTIONS, NORMALIZATIONS


# The `attention_entropy_kernel` values (align.attention.fused.KERNELS maps them to attention implementations).
ATTENTION_ENTROPY_KERNELS = ("fused", "eager")


@dataclass
class EntropyRegularizationArguments:
    """Config fields of entropy-regularized attention; mixed into any TRL config by `with_entropy_regularization`.

    > Regularizer (Jha & Reagen 2025, Algorithm 1): L = L_task + lambda * mean_layers mean_heads penalty, with
    > penalty = (E - theta * E_max)^2 when |E - theta * E_max| > gamma * E_max.
    """

    attention_entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "lambda, weight of the attention-entropy penalty (0 = off). The penalty's scale depends on the "
            "convention: `paper` averages head entropies first (values up to E_max^2), `code` sums over all query "
            "rows of the batch (the paper's 1e-5 was used with that sum)."
        },
    )
    attention_entropy_tolerance: float = field(
        default=0.2, metadata={"help": "gamma: no penalty while |E - theta * E_max| <= gamma * E_max (paper: 0.2)."}
    )
    attention_entropy_threshold_init: float = field(
        default=0.5,
        metadata={"help": "Initial theta, the learnable target entropy as a fraction of E_max, in (0, 1)."},
    )
    attention_entropy_convention: str = field(
        default="paper",
        metadata={
            "help": "`paper`: penalize each head's mean entropy (Algorithm 1); `code`: penalize every query row and "
            "sum (the reference implementation)."
        },
    )
    attention_entropy_normalization: str = field(
        default="context",
        metadata={
            "help": "E_max of a row: `context` = log of the sequence's length (the paper's log T); `visible` = log "
            "of the number of keys the row can see (entropies become fractions of each row's maximum)."
        },
    )
    attention_entropy_learnable_temperature: bool = field(
        default=False,
        metadata={
            "help": "Learn a per-(layer, head) attention temperature (the paper's SM(t)), initialized at 1. Full "
            "fine-tuning only; the final save folds it into the query projection."
        },
    )
    attention_entropy_log_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps, write the per-(layer, head) entropy heatmap (PNG + JSON) to "
            "`<output_dir>/attention_entropy/`. Any N > 0 also turns on the entropy metrics (0 = off)."
        },
    )
    attention_entropy_kernel: str = field(
        default="fused",
        metadata={
            "help": "`fused`: flash-style attention with the entropy from the row log-sum-exp (no T x T tensor; the "
            "max attention logit only on logging steps); `eager`: eager attention from the full softmax (the "
            "reference). Same values and gradients."
        },
    )
    z_loss: bool = field(
        default=False,
        metadata={"help": "Add the z-loss z_loss_coef * mean (log Z)^2 of the output softmax (Wortsman et al. 2024)."},
    )
    z_loss_coef: float = field(default=1e-4, metadata={"help": "Coefficient of the z-loss (Wortsman et al.: 1e-4)."})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        checks = [
            ("attention_entropy_coef", self.attention_entropy_coef >= 0, "a number >= 0 (0 turns it off)"),
            ("attention_entropy_tolerance", self.attention_entropy_tolerance >= 0, "a number >= 0, e.g. 0.2"),
            (
                "attention_entropy_threshold_init",
                0 < self.attention_entropy_threshold_init < 1,
                "strictly between 0 and 1, e.g. 0.5",
            ),
            (
                "attention_entropy_convention",
                self.attention_entropy_convention in CONVENTIONS,
                f"one of {CONVENTIONS}",
            ),
            (
                "attention_entropy_normalization",
                self.attention_entropy_normalization in NORMALIZATIONS,
                f"one of {NORMALIZATIONS}",
            ),
            ("attention_entropy_log_steps", self.attention_entropy_log_steps >= 0, "an integer >= 0 (0 turns it off)"),
            (
                "attention_entropy_kernel",
                self.attention_entropy_kernel in ATTENTION_ENTROPY_KERNELS,
                f"one of {ATTENTION_ENTROPY_KERNELS}",
            ),
            ("z_loss_coef", self.z_loss_coef >= 0, "a number >= 0, e.g. 1e-4"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be {expected}.")
        kwargs = getattr(self, "gradient_checkpointing_kwargs", None) or {}
        if (
            self.attention_entropy_coef > 0
            and getattr(self, "gradient_checkpointing", False)
            and kwargs.get("use_reentrant")
        ):
            raise ValueError(
                "attention_entropy_coef > 0 cannot be trained with reentrant gradient checkpointing "
                "(gradient_checkpointing_kwargs={'use_reentrant': True}): its forward runs without gradients, so the "
                "entropy penalty computed inside the layers would get none. Set `use_reentrant: false` or turn "
                "gradient checkpointing off."
            )

    @property
    def records_attention(self) -> bool:
        """Whether the policy needs entropy-recording attention (penalty, heatmaps/metrics, or temperatures)."""
        return (
            self.attention_entropy_coef > 0
            or self.attention_entropy_log_steps > 0
            or self.attention_entropy_learnable_temperature
        )
