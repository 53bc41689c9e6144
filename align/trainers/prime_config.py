"""`PrimeConfig`: the configuration of `PrimeGRPOTrainer` (`align.trainers.prime`), checked in one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from align.losses.prime import MODES
from align.trainers.pass_n_config import GraderGRPOConfig


PRM_UPDATES = ("after", "before", "none")
PROCESS_NORMS = ("batch_norm", "none")


@dataclass
class PrimeConfig(GraderGRPOConfig):
    r"""
    Configuration class for [`PrimeGRPOTrainer`]: [`GraderGRPOConfig`] plus the implicit PRM that learns alongside the
    policy and PRIME's advantages (Cui et al. 2025, arXiv 2502.01456; defaults from the paper and its code).

    > Parameters of the implicit PRM

        prm_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Where the PRM starts: `None` is the policy's own start (the SFT model, so every reward is 0 at step 0, as
            in the paper), a model directory, or a LoRA adapter trained by `align train prm` (its base is then the
            reference). Under `peft_config` a fresh PRM gets its own LoRA adapter of the same shape, and the
            reference is its base with the adapter disabled; without it the PRM is a full copy and the reference a
            frozen one.
        prm_beta (`float`, *optional*, defaults to `0.05`):
            β of the token reward r_t = β·log π_φ(y_t|·)/π_ref(y_t|·) and of the PRM's CE loss on σ(β·Σ_t log-ratio).
        prm_learning_rate (`float`, *optional*, defaults to `1e-6`):
            AdamW learning rate of the PRM (its own optimizer: constant, no warmup, as the paper).
        prm_weight_decay (`float`, *optional*, defaults to `0.0`):
            AdamW weight decay of the PRM.
        prm_max_grad_norm (`float`, *optional*, defaults to `10.0`):
            Gradient clipping of the PRM update (the paper's scripts: 10).
        prm_update (`str`, *optional*, defaults to `"after"`):
            `after`: the advantages use the rewards of the forward that computes the PRM's loss, before its step
            (single forward, the paper's default); `before`: update first, then score again with the updated PRM
            (double forward, App. B.2, verl's default); `none`: a frozen PRM.
        prm_micro_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Sequences per PRM forward/backward (gradients accumulate into one step); `None` = the per-device batch.

    > Parameters of the advantages

        use_process_rewards (`bool`, *optional*, defaults to `True`):
            `False` drops the PRM altogether (none is loaded): the advantages are then the outcome's alone, PRIME's
            RLOO baseline with the same filter and whitening (its Fig. 3 "RLOO"), the ablation of the process reward.

        prime_mode (`str`, *optional*, defaults to `"verl"`):
            `verl`: what PRIME's code computes; `paper`: Eq. 5 as written (`align.losses.prime`).
        process_reward_norm (`str`, *optional*, defaults to `"batch_norm"`):
            `batch_norm`: divide the token rewards by the batch's largest |process return| first (the code's
            `prime_norm`); `none`: raw β·log-ratios.
        prime_gamma (`float`, *optional*, defaults to `1.0`):
            Discount of the process returns (1 in every PRIME run).
        accuracy_filter (`bool`, *optional*, defaults to `True`):
            Drop prompts whose K samples have a mean outcome outside [`accuracy_low`, `accuracy_high`]: their rows
            get advantage 0 and stay out of the PRM update and the whitening.
        accuracy_low / accuracy_high (`float`, *optional*, defaults to `0.2` / `0.8`):
            The band, inclusive (PRIME's code; its Alg. 1 writes it strict).
    """

    prm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start of the PRM (None: the policy's)."}
    )
    prm_beta: float = field(default=0.05, metadata={"help": "β of the implicit token reward and of the CE loss."})
    prm_learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate of the PRM."})
    prm_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the PRM."})
    prm_max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping of the PRM update."})
    prm_update: str = field(default="after", metadata={"help": f"When the PRM learns: {', '.join(PRM_UPDATES)}."})
    prm_micro_batch_size: int | None = field(default=None, metadata={"help": "Sequences per PRM forward/backward."})
    use_process_rewards: bool = field(default=True, metadata={"help": "False: outcome-only RLOO (no PRM)."})
    prime_mode: str = field(default="verl", metadata={"help": f"Advantage formula: {', '.join(MODES)}."})
    process_reward_norm: str = field(
        default="batch_norm", metadata={"help": f"Token reward scaling: {', '.join(PROCESS_NORMS)}."}
    )
    prime_gamma: float = field(default=1.0, metadata={"help": "Discount of the process returns."})
    accuracy_filter: bool = field(default=True, metadata={"help": "Drop all-right / all-wrong prompts."})
    accuracy_low: float = field(default=0.2, metadata={"help": "Lowest mean outcome of a kept prompt."})
    accuracy_high: float = field(default=0.8, metadata={"help": "Highest mean outcome of a kept prompt."})

    def __post_init__(self):
        super().__post_init__()
        for name, value, allowed in (
            ("prm_update", self.prm_update, PRM_UPDATES),
            ("prime_mode", self.prime_mode, MODES),
            ("process_reward_norm", self.process_reward_norm, PROCESS_NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.prm_beta <= 0:
            raise ValueError(f"prm_beta must be > 0, got {self.prm_beta}")
        if self.prm_learning_rate < 0 or self.prm_max_grad_norm <= 0:
            raise ValueError(
                f"need prm_learning_rate >= 0 and prm_max_grad_norm > 0, got {self.prm_learning_rate} and "
                f"{self.prm_max_grad_norm}"
            )
        if not 0.0 < self.prime_gamma <= 1.0:
            raise ValueError(f"prime_gamma must be in (0, 1], got {self.prime_gamma}")
        if not 0.0 <= self.accuracy_low <= self.accuracy_high <= 1.0:
            raise ValueError(
                f"need 0 <= accuracy_low <= accuracy_high <= 1, got {self.accuracy_low} and {self.accuracy_high}"
            )
        if self.prm_micro_batch_size is not None and self.prm_micro_batch_size < 1:
            raise ValueError(f"prm_micro_batch_size must be >= 1, got {self.prm_micro_batch_size}")
