"""`MarginPreferenceTrainer(DPOTrainer)`: margin losses, live gradient-entanglement diagnostics, normalized updates.

Paper: Yuan, Zeng, Wu, Wang, Wang, Leqi, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement" (ICLR 2025, arXiv 2410.13828). The losses and the first-order algebra live in `align.losses.margin`,
the gradient measurements in `align.diagnostics.entanglement`; this module only wires them into TRL.

How the loss is swapped in. TRL 1.16 keeps the policy forward, the reference, the DPO loss and every metric in one
private method, `DPOTrainer._compute_loss`. We keep all of it, so the logged `rewards/*`, `logps/*`, `logits/*`,
`entropy` are TRL's own, and change only the returned loss:

1. the reference log-probs are computed first with TRL's public `compute_ref_log_probs` (the same forward TRL runs
   inline: the reference model, or the adapter-disabled policy under LoRA) unless they were precomputed
   (`precompute_ref_log_probs`), and handed to `_compute_loss` as precomputed batch columns, so the reference
   forward runs once;
2. the policy model is passed through a recorder that keeps the output of TRL's fused-LM-head forward, so our loss
   is a function of exactly the per-token log-probs TRL computed (one policy forward, no extra logits);
3. TRL's scalar DPO loss is discarded and `margin_loss(...)` of those log-probs is returned.

Reference-free losses (SimPO, CPO) skip the reference forward: the batch carries zero reference log-probs, so TRL's
`rewards/*` are β·log π, as TRL's CPO trainer reports them.
"""

from __future__ import annotations

import logging
import re
import textwrap
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer

from align.diagnostics.entanglement import (
    EntanglementCallback,
    EntanglementMonitor,
    check_supported,
    isolated_rng,
    pair_geometry,
    select_parameters,
)
from align.losses.margin import (
    MARGIN_LOSSES,
    PURE_MARGIN_LOSSES,
    REFERENCE_FREE_LOSSES,
    MarginHyperparameters,
    margin_loss,
    normalized_pair_surrogate,
)
from align.per_sample_grads import LinearGradTape
from align.trainers.margin_normalized import one_backward_blocker, one_backward_normalized_loss


MARGIN_LOSS_CHOICES = (*MARGIN_LOSSES, "trl")

logger = logging.getLogger(__name__)


@dataclass
class MarginPreferenceConfig(DPOConfig):
    r"""
    Configuration for [`MarginPreferenceTrainer`]: TRL's `DPOConfig` plus a margin loss, its constants, gradient-
    entanglement diagnostics and the pairwise normalized update.

    > Parameters that select the loss

    margin_loss (`str`, defaults to `"dpo"`):
        A name of `align.losses.margin.MARGIN_LOSS_TABLE` (`dpo`, `simpo`, …; formulas in that module), or `trl` to
        use TRL's own `loss_type` list unchanged. `beta` is TRL's β for every loss.
    simpo_gamma, rdpo_alpha, dpop_lambda, cpo_alpha (`float`):
        SimPO's target margin γ, R-DPO's length weight α, DPOP's penalty λ, CPO's NLL weight.

    > Parameters that control the diagnostics

    entanglement_steps (`int`, defaults to `0`):
        Diagnose every k optimizer steps (0: off); step 1 is always included.
    entanglement_pairs (`int`, defaults to `4`):
        Pairs sampled from the step's first micro-batch, per process.
    entanglement_params (`str`, defaults to `"trainable"`):
        Parameters of ∇θ log π: all trainable ones (the LoRA weights under PEFT) or a regular expression on names.
    normalize_pair_gradients (`bool`, defaults to `False`):
        Replace each pair's update by c·(g_w/‖g_w‖ − g_l/‖g_l‖) (norms over `entanglement_params`), exactly. Under
        LoRA the per-sequence norms come from the step's own forward and one backward (1.04x TRL's DPO step,
        `python -m benchmarks margin`, SmolLM2 + LoRA); otherwise from one extra forward and backward per sequence
        (2.0x).
    """

    margin_loss: str = field(
        default="dpo",
        metadata={
            "help": f"Margin loss: {', '.join(MARGIN_LOSSES)}, or `trl` to use TRL's own `loss_type`.",
            "choices": list(MARGIN_LOSS_CHOICES),
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin γ (margin_loss=simpo)."})
    rdpo_alpha: float = field(
        default=0.2, metadata={"help": "R-DPO weight α of the length difference |y_w| − |y_l| (margin_loss=r_dpo)."}
    )
    dpop_lambda: float = field(
        default=50.0, metadata={"help": "DPOP penalty λ on the chosen log-prob falling below the reference."}
    )
    cpo_alpha: float = field(
        default=1.0, metadata={"help": "CPO weight of the per-token NLL of the chosen response (margin_loss=cpo)."}
    )
    entanglement_steps: int = field(
        default=0,
        metadata={
            "help": "Measure gradient entanglement every k optimizer steps (0 = off). Writes entanglement.jsonl."
        },
    )
    entanglement_pairs: int = field(
        default=4,
        metadata={"help": "Pairs per diagnosed step, sampled from the step's first micro-batch per process."},
    )
    entanglement_params: str = field(
        default="trainable",
        metadata={
            "help": "Parameters whose gradients are measured (and normalized): `trainable` (all trainable, i.e. LoRA "
            "under PEFT) or a regular expression matched against parameter names."
        },
    )
    normalize_pair_gradients: bool = field(
        default=False,
        metadata={
            "help": "Mitigation: update each pair by c·(g_w/‖g_w‖ − g_l/‖g_l‖) so that, to first order, the chosen "
            "log-prob never falls and the rejected never rises. Under LoRA about 1.05x the DPO step (one backward), "
            "else about 2x (a backward per sequence)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.margin_loss not in MARGIN_LOSS_CHOICES:
            raise ValueError(f"margin_loss={self.margin_loss!r} is not one of {list(MARGIN_LOSS_CHOICES)}.")
        if self.margin_loss != "trl":
            trl_only = {
                "loss_type": (self.loss_type, ["sigmoid"]),
                "loss_weights": (self.loss_weights, None),
                "ld_alpha": (self.ld_alpha, None),
                "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
                "use_weighting": (self.use_weighting, False),
            }
            for name, (value, default) in trl_only.items():
                if value != default:
                    raise ValueError(
                        f"{name}={value!r} configures TRL's own DPO loss, which margin_loss={self.margin_loss!r} "
                        f"replaces. Set `margin_loss: trl` to train with TRL's loss, or remove `{name}`."
                    )
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0 (it scales every margin).")
        if self.dpop_lambda < 0 or self.cpo_alpha < 0:
            raise ValueError(
                f"dpop_lambda={self.dpop_lambda} and cpo_alpha={self.cpo_alpha} must be >= 0 (they weight penalties)."
            )
        if self.margin_loss in REFERENCE_FREE_LOSSES and self.precompute_ref_log_probs:
            raise ValueError(
                f"margin_loss={self.margin_loss!r} is reference-free, so precompute_ref_log_probs=True would run the "
                "reference over the whole dataset for nothing. Set `precompute_ref_log_probs: false`."
            )
        if self.entanglement_steps < 0:
            raise ValueError(f"entanglement_steps={self.entanglement_steps} must be >= 0 (0 turns diagnostics off).")
        if self.entanglement_pairs < 1:
            raise ValueError(f"entanglement_pairs={self.entanglement_pairs} must be >= 1.")
        if self.entanglement_params != "trainable":
            try:
                re.compile(self.entanglement_params)
            except re.error as error:
                raise ValueError(
                    f"entanglement_params={self.entanglement_params!r} is not a valid regular expression ({error}). "
                    "Use `trainable` or a pattern such as `layers\\.(2[0-9])\\.`."
                ) from None
        if self.normalize_pair_gradients and self.margin_loss not in PURE_MARGIN_LOSSES:
            raise ValueError(
                f"normalize_pair_gradients needs a loss of one margin, one of {sorted(PURE_MARGIN_LOSSES)}; got "
                f"margin_loss={self.margin_loss!r}. DPOP and CPO add a chosen-only term and TRL's losses have no "
                "known pair weight, so the pairwise normalized update is not defined for them."
            )

    @property
    def margin_hyperparameters(self) -> MarginHyperparameters:
        return MarginHyperparameters(
            beta=self.beta,
            simpo_gamma=self.simpo_gamma,
            rdpo_alpha=self.rdpo_alpha,
            dpop_lambda=self.dpop_lambda,
            cpo_alpha=self.cpo_alpha,
        )


class _PolicyForwardRecorder:
    """Calls the policy model and keeps the output of its first fused-LM-head forward (see the module docstring);
    with a `tape` (`align.per_sample_grads.LinearGradTape`) that forward's linear layers are recorded too."""

    def __init__(self, model: torch.nn.Module, tape: LinearGradTape | None = None):
        self.model = model
        self.tape = tape
        self.outputs = None

    def __call__(self, *args, **kwargs):
        first = kwargs.get("fused_lm_head") and self.outputs is None
        with self.tape if first and self.tape is not None else nullcontext():
            outputs = self.model(*args, **kwargs)
        if first:
            self.outputs = outputs
        return outputs


class MarginPreferenceTrainer(DPOTrainer):
    """DPOTrainer whose loss is a margin loss of `align.losses.margin`, with optional entanglement diagnostics
    (`entanglement_steps`) and the pairwise normalized update (`normalize_pair_gradients`).

    Reference handling is TRL's: a separate reference model, the adapter-disabled base under LoRA, or precomputed
    reference log-probs. Works with LoRA, gradient accumulation and DDP; the diagnostics and the normalized update
    refuse DeepSpeed ZeRO-3 and FSDP, whose sharded parameters have no per-parameter gradient to take.
    """

    _tag_names = ["trl", "dpo", "align", "margin"]
    _name = "MarginPreference"
    _paper = {
        "title": "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
        "id": "2410.13828",
        "citation": textwrap.dedent("""\
            @article{yuan2024common,
                title   = {{A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement}},
                author  = {Hui Yuan and Yifan Zeng and Yue Wu and Huazheng Wang and Mengdi Wang and Liu Leqi},
                year    = 2024,
                journal = {arXiv preprint arXiv:2410.13828},
            }"""),
    }
    # The loss is a mean over the micro-batch's pairs, like TRL's DPO loss: Trainer divides it by the number of
    # gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config: MarginPreferenceConfig = self.args
        if not isinstance(config, MarginPreferenceConfig):
            raise TypeError(f"MarginPreferenceTrainer needs a MarginPreferenceConfig, got {type(config).__name__}.")
        self._margin_hparams = config.margin_hyperparameters
        self._selected_params: list[torch.nn.Parameter] = []
        self._monitor: EntanglementMonitor | None = None
        if config.entanglement_steps > 0 or config.normalize_pair_gradients:
            check_supported(self)
            self._selected_params = [p for _, p in select_parameters(self.model, config.entanglement_params)]
        if config.entanglement_steps > 0:
            # The callback drives the monitor from the Trainer's events; this trainer observes, with exact (d_w, d_l).
            callback = EntanglementCallback(
                self,
                every=config.entanglement_steps,
                pairs=config.entanglement_pairs,
                params=config.entanglement_params,
                observe=False,
                margin_loss=config.margin_loss,
            )
            self._monitor = callback.monitor
            self._entanglement_callback = callback
            self.add_callback(callback)

    @contextmanager
    def _reference_logps_from_batch(self):
        """Make TRL read the reference log-probs from the batch columns for one call (we computed them already)."""
        saved = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = saved

    def _reference_logps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.args.margin_loss in REFERENCE_FREE_LOSSES:
            return None
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        reference = self.ref_model if self.ref_model is not None else self.model
        return self.compute_ref_log_probs(reference, inputs)

    # False: always take the exact per-sequence path of normalize_pair_gradients (the tests compare the two paths).
    fast_normalized_update = True
    # The path the last normalized update took: "one_backward" or "per_sequence" (None before the first).
    normalized_update_path: str | None = None

    def _normalized_update_tape(self, unwrapped: torch.nn.Module) -> LinearGradTape | None:
        """A tape for the one-backward normalized update, or None where only the per-sequence path applies."""
        reason = one_backward_blocker(self, unwrapped) if self.fast_normalized_update else "switched off"
        path = "per_sequence" if reason else "one_backward"
        if path != self.normalized_update_path:
            logger.info("normalize_pair_gradients: %s path%s", path, f" ({reason})" if reason else "")
        self.normalized_update_path = path
        return None if reason else LinearGradTape(unwrapped, self._selected_params)

    def _compute_loss(self, model, inputs, return_outputs):
        training = self.model.training
        step = self.state.global_step
        diagnose = training and self._monitor is not None and self._monitor.due(step)
        unwrapped = self.accelerator.unwrap_model(model)

        if self.args.margin_loss == "trl":
            result = super()._compute_loss(model, inputs, return_outputs)
            if diagnose:
                self._monitor.observe(unwrapped, inputs, step, loss_scale=None)
            return result

        reference = self._reference_logps(inputs)
        if reference is None:
            zeros = torch.zeros(inputs["input_ids"].size(0) // 2, device=inputs["input_ids"].device)
            trl_inputs = {**inputs, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        else:
            trl_inputs = {**inputs, "ref_chosen_logps": reference[0], "ref_rejected_logps": reference[1]}
        tape = self._normalized_update_tape(unwrapped) if self.args.normalize_pair_gradients and training else None
        policy = _PolicyForwardRecorder(model, tape)
        with self._reference_logps_from_batch():
            result = super()._compute_loss(policy, trl_inputs, return_outputs)
        if policy.outputs is None:
            raise RuntimeError(
                "TRL's DPOTrainer._compute_loss did not run the policy with fused_lm_head=True; this TRL version is "
                "not supported by MarginPreferenceTrainer (tested with TRL 1.16)."
            )

        completion_mask = inputs["completion_mask"]
        per_token_logps = policy.outputs.log_probs[:, -(completion_mask.size(1) - 1) :]
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)
        terms = margin_loss(
            self.args.margin_loss,
            chosen_logps,
            rejected_logps,
            None if reference is None else reference[0],
            None if reference is None else reference[1],
            chosen_lengths,
            rejected_lengths,
            self._margin_hparams,
        )
        loss = terms.loss.mean()

        geometry = None
        if tape is not None:
            # One backward: the monitor, if due, takes its own per-pair geometry.
            loss = one_backward_normalized_loss(loss, tape, chosen_logps, rejected_logps, terms.pair_weight)
        elif self.args.normalize_pair_gradients and training:
            # Exact per-pair gradient norms over the selected parameters (one forward/backward per sequence), then a
            # surrogate with the same value as the loss whose gradient is Σ c(g_w/‖g_w‖ − g_l/‖g_l‖)/B.
            num_pairs = chosen_logps.size(0)
            with isolated_rng(), self.accelerator.autocast():
                geometry = pair_geometry(unwrapped, inputs, range(num_pairs), self._selected_params)
            device = chosen_logps.device
            surrogate = normalized_pair_surrogate(
                chosen_logps,
                rejected_logps,
                terms.pair_weight,
                geometry.chosen_norm_sq.sqrt().to(device, chosen_logps.dtype),
                geometry.rejected_norm_sq.sqrt().to(device, chosen_logps.dtype),
            ).mean()
            loss = loss.detach() + (surrogate - surrogate.detach())

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.outputs.aux_loss

        if diagnose:
            self._monitor.observe(
                unwrapped,
                inputs,
                step,
                losses=terms.loss,
                d_chosen=terms.d_chosen,
                d_rejected=terms.d_rejected,
                pair_weight=terms.pair_weight if self.args.normalize_pair_gradients else None,
                loss_scale=self._entanglement_callback.loss_scale(chosen_logps.size(0)),
            )
        return (loss, result[1]) if return_outputs else loss
