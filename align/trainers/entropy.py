"""Entropy-regularized attention for any TRL trainer: the trainer mixin and the composition function.

Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs" (Algorithm 1): add lambda * L_entropy to the task
loss, where L_entropy penalizes heads whose attention entropy leaves a band around a learnable fraction theta of the
maximum entropy. Optional extras: the paper's learnable per-head attention temperature, and from Wortsman et al. 2024
the max-attention-logit and output log Z monitors and the z-loss. This module only wires them into TRL:

- the math (both conventions, the z-loss): `align.losses.attention_entropy`;
- the recording attention kernels (`attention_entropy_kernel`: fused by default, eager as the reference), the
  learnable parameters and temperature folding: `align.attention`;
- statistics, reports, heatmaps and the log Z probe: `align.diagnostics.attention`, `align.diagnostics.log_z`;
- the config fields: `align.trainers.entropy_config.EntropyRegularizationArguments`.

    from trl import SFTConfig, SFTTrainer
    from align.trainers.entropy import with_entropy_regularization

    Trainer, Config = with_entropy_regularization(SFTTrainer, SFTConfig)   # also DPO, DCO, MarginPreference, ...
    args = Config(..., attention_entropy_coef=1e-3, attention_entropy_log_steps=50)

`EntropySFTTrainer`, `EntropySFTConfig`, `EntropyDPOTrainer` and `EntropyDPOConfig` are the same compositions of
TRL's classes, built when first imported.

Everything is off unless a field turns it on (`attention_entropy_coef > 0`, `attention_entropy_log_steps > 0`,
`attention_entropy_learnable_temperature`, `z_loss`); a composed trainer with every field at its default is the
parent trainer, unchanged (same attention implementation, no hooks, no extra parameters).

Learnable parameters (`align.attention.parameters`) are attached to the policy, so the optimizer, DDP, DeepSpeed and
FSDP treat them like any other parameter. They are excluded from weight decay here, kept out of the model's state
dict and saved as `attention_entropy.safetensors` next to every checkpoint, from which a resumed run restores them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from align.attention.folding import check_foldable, fold_attention_temperature
from align.attention.fused import KERNELS
from align.attention.modules import attention_modules
from align.attention.parameters import MODULE_NAME, AttentionEntropyParameters
from align.attention.recorder import AttentionEntropyRecorder
from align.diagnostics.attention import HeadEntropyAccumulator, summarize, write_heatmap, write_report
from align.diagnostics.log_z import OutputLogZProbe
from align.log_probs import is_peft_model
from align.losses.attention_entropy import attention_entropy_penalty, z_loss
from align.trainers.entropy_config import EntropyRegularizationArguments


logger = logging.getLogger(__name__)

HEATMAP_DIR = "attention_entropy"


def _settings(args) -> EntropyRegularizationArguments:
    """The entropy fields of `args`, or all defaults when `args` is a plain config (then everything is off)."""
    return args if isinstance(args, EntropyRegularizationArguments) else EntropyRegularizationArguments()


def _check_temperature_support(trainer, policy) -> None:
    """Refuse learnable temperatures where the final save could not fold them into the query weights."""
    if is_peft_model(trainer.model):
        raise ValueError(
            "attention_entropy_learnable_temperature needs full fine-tuning: a LoRA adapter cannot carry a per-head "
            "temperature, and folding it into the frozen base weights would be lost on save. Turn off use_peft or "
            "the temperature."
        )
    if trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        raise ValueError(
            "attention_entropy_learnable_temperature is not supported with FSDP or DeepSpeed ZeRO-3 (the final save "
            "folds it into unsharded query weights). Use DDP or ZeRO-1/2, or turn the temperature off."
        )
    check_foldable(policy)


class _HeatmapCallback(TrainerCallback):
    """Writes the heatmap every `attention_entropy_log_steps` optimizer steps (all ranks call, rank 0 writes)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.attention_entropy_log_steps == 0:
            self.trainer.write_attention_entropy_heatmap(state.global_step)


class EntropyRegularizationMixin:
    """Adds the attention-entropy regularizer, its metrics and heatmaps, and the z-loss to a TRL trainer.

    Hooks used: `compute_loss` (opens the recorder around the parent's loss, then adds lambda * L_entropy and the
    z-loss); `get_decay_parameter_names`; `save_model` and `train` (persist and restore the learnable parameters).
    The added terms are per-micro-batch means, so they are divided by the gradient-accumulation steps exactly when
    the parent's loss is not (the parent's `loss_is_scaled_for_ga` is left as it is).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = _settings(self.args)
        self._entropy_on = settings.records_attention or settings.z_loss
        self.attention_entropy_record_counts: list[int] = []
        self.attention_entropy_parameters: AttentionEntropyParameters | None = None
        if not self._entropy_on:
            return
        if not hasattr(self, "_metrics"):
            raise TypeError(f"{type(self).__name__}: entropy regularization composes with TRL trainers only.")
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._entropy_recorder = AttentionEntropyRecorder()
        self._entropy_probe = OutputLogZProbe(policy)
        self._entropy_modules = []
        self._entropy_duplicates_warned = False
        if not settings.records_attention:
            return
        current = policy.config._attn_implementation
        self._entropy_implementation = KERNELS[settings.attention_entropy_kernel]
        if current not in (None, "eager", "sdpa", *KERNELS.values()):
            logger.warning("attention entropy: replacing %s attention by %s", current, self._entropy_implementation)
        policy.set_attn_implementation(self._entropy_implementation)
        self._entropy_modules = attention_modules(policy)
        text = policy.config.get_text_config()
        self._entropy_shape = (text.num_hidden_layers, text.num_attention_heads)
        if settings.attention_entropy_learnable_temperature:
            _check_temperature_support(self, policy)
        if settings.attention_entropy_coef > 0 or settings.attention_entropy_learnable_temperature:
            parameters = AttentionEntropyParameters(
                *self._entropy_shape,
                threshold_init=settings.attention_entropy_threshold_init if settings.attention_entropy_coef else None,
                learn_temperature=settings.attention_entropy_learnable_temperature,
            ).to(next(policy.parameters()).device)
            parameters.attach(policy, self._entropy_modules)
            self.attention_entropy_parameters = parameters
        self._entropy_running = HeadEntropyAccumulator(*self._entropy_shape)
        if settings.attention_entropy_log_steps > 0:
            self.add_callback(_HeatmapCallback(self))

    # --- loss -------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._entropy_on or not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self._entropy_recorder.record_max_logit = self._logs_this_step()
        with self._entropy_recorder:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        extra = self._entropy_terms(num_items_in_batch)
        if extra is not None:
            loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _logs_this_step(self) -> bool:
        """Whether this optimizer step logs or writes a heatmap: only then is the max attention logit measured (a
        no-grad pass over QK^T for the fused kernel)."""
        step = self.state.global_step + 1
        every = (self.args.logging_steps, _settings(self.args).attention_entropy_log_steps)
        return any(0 < n < 1 or (n >= 1 and step % int(n) == 0) for n in every)

    def _loss_divisor(self, num_items_in_batch) -> int:
        """How many micro-batches the added per-micro-batch means are averaged over (mirrors Trainer.training_step)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return self.current_gradient_accumulation_steps if scaled else 1

    def _entropy_terms(self, num_items_in_batch) -> torch.Tensor | None:
        settings = _settings(self.args)
        recorder = self._entropy_recorder
        records = recorder.layer_records()
        self.attention_entropy_record_counts.append(len(records))
        if len(records) != len(self._entropy_modules):
            raise RuntimeError(
                f"attention entropy: recorded {len(records)} of {len(self._entropy_modules)} attention layers in this "
                "training forward. Usual causes: reentrant gradient checkpointing (its forward runs without "
                "gradients; set gradient_checkpointing_kwargs={'use_reentrant': False}), or the policy's attention "
                f"implementation was changed after the trainer set it to {self._entropy_implementation!r}."
            )
        if recorder.duplicates and not self._entropy_duplicates_warned:
            self._entropy_duplicates_warned = True
            logger.warning(
                "attention entropy: %d extra grad-enabled forwards in one training step were not recorded; the "
                "penalty uses the first forward only.",
                recorder.duplicates,
            )
        divisor = self._loss_divisor(num_items_in_batch)
        extra, scalars = None, {}
        if settings.attention_entropy_coef > 0:
            thresholds = self.attention_entropy_parameters()
            penalty = attention_entropy_penalty(
                records,
                thresholds,
                settings.attention_entropy_tolerance,
                settings.attention_entropy_convention,
                settings.attention_entropy_normalization,
            )
            extra = settings.attention_entropy_coef * penalty / divisor
            scalars["attention_entropy/penalty"] = penalty.detach()
            scalars["attention_entropy/regularizer"] = settings.attention_entropy_coef * penalty.detach()
            scalars["attention_entropy/threshold_mean"] = thresholds.detach().mean()
        if self.attention_entropy_parameters is not None and settings.attention_entropy_learnable_temperature:
            scalars["attention_entropy/temperature_mean"] = (
                self.attention_entropy_parameters.log_temperature.exp().mean()
            )
        log_z = recorder.log_z
        if settings.z_loss:
            if log_z is None:
                raise RuntimeError(
                    "z_loss: the training forward returned no labels-aligned log-probabilities or logits to compute "
                    "log Z from. This trainer's forward is not supported by the z-loss; set z_loss: false."
                )
            value = z_loss(log_z)
            term = settings.z_loss_coef * value / divisor
            extra = term if extra is None else extra + term
            scalars["z_loss"] = value.detach()
        if log_z is not None and log_z.numel():
            scalars["lm_head/log_z_mean"] = log_z.detach().float().mean()
        self._log_entropy_metrics(records, scalars)
        return extra

    @torch.no_grad()
    def _log_entropy_metrics(self, records, scalars: dict[str, torch.Tensor]) -> None:
        """Reduce this micro-batch's statistics across processes and append them to `self._metrics['train']`."""
        step = HeadEntropyAccumulator(*self._entropy_shape) if records else None
        if step is not None:
            step.add(records)
        names = list(scalars)
        pieces = [torch.stack([v.float() for v in scalars.values()]).cpu()] if names else []
        if step is not None:
            pieces += [step.state().float(), step.max_logit.float()]
        if not pieces:
            return
        flat = torch.cat(pieces).to(self.accelerator.device)
        gathered = self.accelerator.gather(flat).view(self.accelerator.num_processes, -1).cpu()
        metrics = self._metrics["train"]
        for index, name in enumerate(names):
            metrics[name].append(float(gathered[:, index].mean()))
        if step is None:
            return
        layers = self._entropy_shape[0]
        state = gathered[:, len(names) : -layers].sum(0)
        step.load_state(state)
        step.max_logit = gathered[:, -layers:].amax(0).double()
        self._entropy_running.merge(step)
        table = step.table()
        summary = summarize(table, _settings(self.args).attention_entropy_normalization)
        metrics["attention_entropy/mean"].append(summary["mean_entropy"])
        metrics["attention_entropy/normalized_mean"].append(summary["mean_normalized_entropy"])
        metrics["attention_entropy/collapsed_frac"].append(summary["collapsed_frac"])
        metrics["attention_entropy/overloaded_frac"].append(summary["overloaded_frac"])
        measured = math.isfinite(max(summary["layer_max_logit"]))  # the fused kernel measures it on log steps only
        if measured:
            metrics["attention_logits/max"].append(max(summary["layer_max_logit"]))
        for layer in sorted(record.layer for record in records):
            metrics[f"attention_entropy/layer_{layer}"].append(summary["layer_mean_entropy"][layer])
            if measured:
                metrics[f"attention_logits/layer_{layer}_max"].append(summary["layer_max_logit"][layer])

    # --- heatmaps ---------------------------------------------------------------------------------------------------

    def write_attention_entropy_heatmap(self, global_step: int) -> Path | None:
        """Write `<output_dir>/attention_entropy/step_<N>.{png,json}` from the steps since the last one."""
        running = self._entropy_running
        self._entropy_running = HeadEntropyAccumulator(*self._entropy_shape)
        if not running.has_data() or not self.accelerator.is_main_process:
            return None
        settings = _settings(self.args)
        table = running.table()
        stem = Path(self.args.output_dir) / HEATMAP_DIR / f"step_{global_step:07d}"
        summary = write_report(
            table, stem.with_suffix(".json"), settings.attention_entropy_normalization, global_step=global_step
        )
        title = (
            f"training step {global_step}\n{settings.attention_entropy_normalization}-normalized: collapsed "
            f"{summary['collapsed_frac']:.0%}, overloaded {summary['overloaded_frac']:.0%}"
        )
        write_heatmap(table[settings.attention_entropy_normalization], stem.with_suffix(".png"), title)
        return stem.with_suffix(".png")

    # --- parameters: weight decay, saving, resuming -------------------------------------------------------------

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return [name for name in names if f"{MODULE_NAME}." not in name]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        parameters = self.attention_entropy_parameters
        if parameters is not None and parameters.log_temperature is not None and not _internal_call:
            # The final model is saved as a plain checkpoint: fold the temperatures into the query projections.
            fold_attention_temperature(self.accelerator.unwrap_model(self.model), parameters)
        super().save_model(output_dir, _internal_call=_internal_call)
        if parameters is not None:
            directory = output_dir if output_dir is not None else self.args.output_dir
            tensors = parameters.named_tensors()  # every rank joins a ZeRO-3 / FSDP gather; one writes
            if self.args.should_save:
                parameters.save(directory, self._entropy_settings_record(), tensors)

    def _entropy_settings_record(self) -> dict:
        settings = _settings(self.args)
        names = [f.name for f in EntropyRegularizationArguments.__dataclass_fields__.values()]
        return {name: getattr(settings, name) for name in names}

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        parameters = self.attention_entropy_parameters
        if parameters is not None and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint:
                parameters.load(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


_COMPOSED: dict[tuple[type, type], tuple[type, type]] = {}
# Ready-made compositions of TRL's SFT and DPO, built on first use (module `__getattr__`) so that importing this
# module does not import TRL, and so that a pickled config (Trainer saves `training_args.bin`) loads in a new process.
_READY_MADE = {
    f"Entropy{name}": (trainer, config)
    for trainer, config in (("SFTTrainer", "SFTConfig"), ("DPOTrainer", "DPOConfig"))
    for name in (trainer, config)
}


def __getattr__(name: str) -> type:
    if name not in _READY_MADE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import trl

    trainer_name, config_name = _READY_MADE[name]
    trainer, config = with_entropy_regularization(getattr(trl, trainer_name), getattr(trl, config_name))
    return trainer if trainer.__name__ == name else config


def _register(cls: type, parent: type) -> type:
    """Make a class created at run time importable by name, so pickling (Trainer saves `training_args.bin`) works.

    The ready-made names stay reserved for the compositions of TRL's own classes (a user's `SFTTrainer` subclass
    becomes `EntropySFTTrainer2`), so that they resolve to the same class in every process.
    """
    name = cls.__name__
    suffix = 1
    while (name in globals() and globals()[name] is not cls) or (
        name in _READY_MADE and not parent.__module__.startswith("trl.")
    ):
        suffix += 1
        name = f"{cls.__name__}{suffix}"
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def with_entropy_regularization(trainer_cls: type, config_cls: type) -> tuple[type, type]:
    """(trainer, config) classes that add entropy-regularized attention to a TRL trainer and its config.

    Classes that already include it are returned as they are; the same inputs always give the same classes.
    """
    key = (trainer_cls, config_cls)
    if key not in _COMPOSED:
        config = config_cls
        if not issubclass(config_cls, EntropyRegularizationArguments):
            config = dataclass(
                type(
                    f"Entropy{config_cls.__name__}",
                    (EntropyRegularizationArguments, config_cls),
                    {"__doc__": f"`{config_cls.__name__}` plus the fields of `EntropyRegularizationArguments`."},
                )
            )
            config = _register(config, config_cls)
        trainer = trainer_cls
        if not issubclass(trainer_cls, EntropyRegularizationMixin):
            trainer = _register(
                type(
                    f"Entropy{trainer_cls.__name__}",
                    (EntropyRegularizationMixin, trainer_cls),
                    {"__doc__": f"`{trainer_cls.__name__}` with `EntropyRegularizationMixin`."},
                ),
                trainer_cls,
            )
        _COMPOSED[key] = (trainer, config)
    return _COMPOSED[key]
