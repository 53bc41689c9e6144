"""`EntanglementCallback`: gradient-entanglement diagnostics for a TRL preference trainer, without subclassing.

    from trl import DPOConfig, DPOTrainer
    from align.diagnostics.entanglement import EntanglementCallback

    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="runs/dpo"), train_dataset=pairs,
                         processing_class=tokenizer, peft_config=lora)
    trainer.add_callback(EntanglementCallback(trainer, every=10, pairs=4))
    trainer.train()   # writes runs/dpo/entanglement.jsonl and logs entanglement/* metrics

Like TRL's own `WinRateCallback` and `LogCompletionsCallback` it takes the trainer, because a callback sees neither
the batch nor the loss: at train begin it wraps this trainer's `compute_loss` (to observe the first micro-batch of a
diagnosed step before its backward) and `_clip_grad_norm` (to read the clipping factor), and it drives the
`EntanglementMonitor` from `on_pre_optimizer_step`, `on_optimizer_step` and `on_step_end`. The wrappers only read:
the loss, the gradients and the update are the trainer's own.

The paper's prediction and the own-pair share of the update need the loss's (d_w, d_l) = (−∂ℓ/∂log π_w,
∂ℓ/∂log π_l). For `DPOTrainer` they are known in closed form for `loss_type` `sigmoid`, `hinge` and `ipo` (the margin
table's `dpo`, `slic`, `ipo`, tested equal to TRL's); other DPO losses are refused unless
`assume_equal_coefficients=True` (d_w = d_l = 1; the update-based prediction needs no coefficients and stays exact).
KTO scores unpaired responses, so no pair margin exists; TRL's CPO trainer collates `chosen_input_ids` /
`rejected_input_ids` rather than DPO's layout: both are refused with what to use instead.
`MarginPreferenceTrainer` creates this callback itself (`entanglement_steps`) and observes with its exact
coefficients.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from align.diagnostics.entanglement.gradients import select_parameters
from align.diagnostics.entanglement.monitor import EntanglementMonitor
from align.losses.margin import MarginHyperparameters, margin_loss


# TRL DPOTrainer loss types with a closed-form (d_w, d_l): the margin table's name for each.
TRL_MARGIN_LOSSES = {"sigmoid": "dpo", "hinge": "slic", "ipo": "ipo"}


def check_supported(trainer) -> None:
    """Refuse setups where per-parameter gradients cannot be taken (one line, with the fix)."""
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if trainer.is_fsdp_enabled or zero3:
        raise ValueError(
            "Gradient-entanglement diagnostics and normalize_pair_gradients need per-parameter gradients, which "
            "DeepSpeed ZeRO-3 and FSDP shard away. Use DDP or ZeRO-1/2 (with LoRA for large models), or turn them off."
        )
    args = trainer.args
    if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        raise ValueError(
            "Gradient-entanglement diagnostics and normalize_pair_gradients take per-pair gradients with "
            "torch.autograd.grad, which reentrant activation checkpointing does not support. Set "
            "`gradient_checkpointing_kwargs: {use_reentrant: false}` or turn checkpointing off."
        )


def trl_margin_loss(trainer, assume_equal: bool) -> str | None:
    """The margin-table name of a plain TRL trainer's loss, None for `assume_equal`, or a one-line ValueError."""
    name = type(trainer).__name__
    if "KTO" in name:
        raise ValueError(
            f"{name}: KTO scores chosen and rejected responses separately, so its loss has no pair margin and "
            "gradient entanglement (d_w g_w − d_l g_l) is not defined for it. Use DPOTrainer or "
            "MarginPreferenceTrainer."
        )
    from trl import DPOTrainer

    if not isinstance(trainer, DPOTrainer):
        raise ValueError(
            f"{name}: EntanglementCallback reads TRL DPOTrainer batches (input_ids/completion_mask, chosen rows then "
            "rejected rows); for CPO or SimPO use align's MarginPreferenceTrainer with margin_loss: cpo or simpo."
        )
    args = trainer.args
    if getattr(args, "margin_loss", None) is not None:
        raise ValueError(
            "MarginPreferenceTrainer diagnoses itself with its exact loss coefficients: set `entanglement_steps` in "
            "its config instead of adding EntanglementCallback."
        )
    loss_types = list(args.loss_type)
    unsupported = []
    if len(loss_types) != 1 or loss_types[0] not in TRL_MARGIN_LOSSES:
        unsupported.append(f"loss_type={loss_types}")
    if args.loss_weights not in (None, [1.0], [1]):
        unsupported.append(f"loss_weights={args.loss_weights}")
    for field, default in (("label_smoothing", 0.0), ("ld_alpha", None), ("use_weighting", False)):
        if getattr(args, field, default) != default:
            unsupported.append(f"{field}={getattr(args, field)!r}")
    if getattr(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        unsupported.append(f"f_divergence_type={args.f_divergence_type!r}")
    if not unsupported:
        return TRL_MARGIN_LOSSES[loss_types[0]]
    if assume_equal:
        return None
    raise ValueError(
        f"EntanglementCallback knows (d_w, d_l) in closed form for DPOTrainer with one loss_type of "
        f"{sorted(TRL_MARGIN_LOSSES)} and no {', '.join(unsupported)}; pass assume_equal_coefficients=True to assume "
        "d_w = d_l (the update-based prediction stays exact), or use MarginPreferenceTrainer."
    )


class EntanglementCallback(TrainerCallback):
    """Gradient-entanglement diagnostics on a TRL preference trainer (see the module docstring for an example).

    Args:
        trainer: the `trl.DPOTrainer` (or subclass) to diagnose; records go to `<output_dir>/entanglement.jsonl`.
        every: diagnose every k optimizer steps (step 1 included).
        pairs: pairs sampled from the diagnosed step's first micro-batch, per process.
        params: `trainable` (all trainable parameters: the LoRA weights under PEFT) or a regex on parameter names.
        assume_equal_coefficients: for TRL losses without closed-form (d_w, d_l), assume d_w = d_l = 1.
        observe: False when the trainer calls `self.monitor.observe` itself (MarginPreferenceTrainer).
        margin_loss: the loss name written to the records (default: the one read from the trainer).
    """

    def __init__(
        self,
        trainer,
        every: int = 10,
        pairs: int = 4,
        params: str = "trainable",
        assume_equal_coefficients: bool = False,
        observe: bool = True,
        margin_loss: str | None = None,
    ):
        if every < 1 or pairs < 1:
            raise ValueError(f"EntanglementCallback: every={every} and pairs={pairs} must be >= 1.")
        check_supported(trainer)
        self.trainer = trainer
        self.observe = observe
        # The loss whose (d_w, d_l) the callback computes itself; None: the trainer passes them, or they are unknown.
        self._loss_name = trl_margin_loss(trainer, assume_equal_coefficients) if observe else None
        self.monitor = EntanglementMonitor(
            params=[p for _, p in select_parameters(trainer.model, params)],
            num_pairs=pairs,
            every=every,
            output_dir=trainer.args.output_dir,
            accelerator=trainer.accelerator,
            seed=trainer.args.seed,
            margin_loss=margin_loss or self._loss_name or "trl",
        )
        self._grad_norm: float | None = None

    # ---- what the trainer's step does, read through two thin wrappers ----

    def _wrap_trainer(self) -> None:
        trainer = self.trainer
        if getattr(trainer, "_align_entanglement_wrapped", None) is self:
            return
        trainer._align_entanglement_wrapped = self
        clip = getattr(trainer, "_clip_grad_norm", None)
        if clip is not None:

            def clip_and_record(model):
                norm = clip(model)
                self._grad_norm = None if norm is None else float(norm)
                return norm

            trainer._clip_grad_norm = clip_and_record
        if self.observe:
            compute_loss = trainer.compute_loss

            def observe_then_compute_loss(model, inputs, *args, **kwargs):
                step = trainer.state.global_step
                if trainer.model.training and self.monitor.due(step):
                    self._observe(model, inputs, step)
                return compute_loss(model, inputs, *args, **kwargs)

            trainer.compute_loss = observe_then_compute_loss

    def loss_scale(self, num_pairs: int) -> float:
        """1/(B·GA·W): how a pair's loss gradient enters `.grad` for a mean loss over the micro-batch's B pairs."""
        accumulation = getattr(self.trainer, "current_gradient_accumulation_steps", None)
        accumulation = accumulation or self.trainer.args.gradient_accumulation_steps
        return 1.0 / (num_pairs * accumulation * self.trainer.accelerator.num_processes)

    def _observe(self, model, inputs: dict, step: int) -> None:
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        num_pairs = inputs["input_ids"].size(0) // 2
        coefficient_fn = None if self._loss_name is None else self._trl_coefficients
        self.monitor.observe(
            unwrapped, inputs, step, loss_scale=self.loss_scale(num_pairs), coefficient_fn=coefficient_fn
        )

    def _trl_coefficients(self, pairs: list[int], geometry, inputs: dict):
        """(losses, d_w, d_l) of the sampled pairs for DPOTrainer's loss, at the log-probs of the gradient."""
        trainer = self.trainer
        num_pairs = inputs["input_ids"].size(0) // 2
        rows = torch.as_tensor([*pairs, *(p + num_pairs for p in pairs)], device=inputs["input_ids"].device)
        if "ref_chosen_logps" in inputs:
            ref_w, ref_l = inputs["ref_chosen_logps"][pairs], inputs["ref_rejected_logps"][pairs]
        else:
            batch = {k: inputs[k].index_select(0, rows) for k in ("input_ids", "attention_mask", "completion_mask")}
            reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
            ref_w, ref_l = trainer.compute_ref_log_probs(reference, batch)
        lengths = inputs["completion_mask"].index_select(0, rows).sum(dim=1).double().cpu()
        terms = margin_loss(
            self._loss_name,
            geometry.logp_chosen,
            geometry.logp_rejected,
            ref_w.detach().double().cpu(),
            ref_l.detach().double().cpu(),
            lengths[: len(pairs)],
            lengths[len(pairs) :],
            MarginHyperparameters(beta=trainer.args.beta),
        )
        return terms.loss, terms.d_chosen, terms.d_rejected

    # ---- Trainer events ----

    def on_train_begin(self, args, state, control, **kwargs):
        self._wrap_trainer()
        self.monitor.start_run(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor._pending is None:
            return
        if args.max_grad_norm is None or args.max_grad_norm <= 0:
            scale = 1.0
        elif self._grad_norm is None:
            scale = None
        else:  # torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), at most 1
            scale = min(1.0, args.max_grad_norm / (self._grad_norm + 1e-6))
        self.monitor.before_optimizer_step(self.trainer.optimizer, scale)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.after_optimizer_step(self.trainer.optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)
        metrics = getattr(self.trainer, "_metrics", {}).get("train")
        for key, value in self.monitor.complete(model).items():
            if metrics is not None:
                metrics[key].append(value)
