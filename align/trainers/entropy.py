"""Entropy-regularized attention for any TRL trainer: one config mixin, one trainer mixin, one composition function.

Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs" (Algorithm 1): add lambda * L_entropy to the task
loss, where L_entropy penalizes heads whose attention entropy leaves a band around a learnable fraction theta of the
maximum entropy (the math and both conventions: `align.losses.attention_entropy`; the collection:
`align.diagnostics.attention`). Optional extras: the paper's learnable per-head attention temperature, and from
Wortsman et al. 2024 the max-attention-logit and output log Z monitors and the z-loss.

    from trl import SFTConfig, SFTTrainer
    from align.trainers.entropy import with_entropy_regularization

    Trainer, Config = with_entropy_regularization(SFTTrainer, SFTConfig)   # also DPO, DCO, MarginPreference, ...
    args = Config(..., attention_entropy_coef=1e-3, attention_entropy_log_steps=50)

Everything is off unless a field turns it on (`attention_entropy_coef > 0`, `attention_entropy_log_steps > 0`,
`attention_entropy_learnable_temperature`, `z_loss`); a composed trainer with every field at its default is the
parent trainer, unchanged (same attention implementation, no hooks, no extra parameters).

Learnable parameters (theta per layer and head, in (0, 1) through a sigmoid; log-temperatures) live in one small
module attached to the policy, so the optimizer, DDP, DeepSpeed and FSDP treat them like any other parameter. They are
excluded from weight decay, kept out of the model's state dict (saved models stay plain transformers checkpoints) and
saved instead as `attention_entropy.safetensors` next to every checkpoint, from which a resumed run restores them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from align.diagnostics.attention import (
    ATTENTION_IMPLEMENTATION,
    PARAMETERS_ATTRIBUTE,
    AttentionEntropyRecorder,
    HeadEntropyAccumulator,
    OutputLogZProbe,
    attention_modules,
    summarize,
    write_heatmap,
    write_report,
)
from align.losses.attention_entropy import (
    CONVENTIONS,
    NORMALIZATIONS,
    entropy_band_penalty,
    entropy_units,
    z_loss,
)


logger = logging.getLogger(__name__)

PARAMETERS_FILE = "attention_entropy.safetensors"
MODULE_NAME = "attention_entropy"
HEATMAP_DIR = "attention_entropy"


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
        """Whether the policy needs `entropy_eager` attention (penalty, heatmaps/metrics, or temperatures)."""
        return (
            self.attention_entropy_coef > 0
            or self.attention_entropy_log_steps > 0
            or self.attention_entropy_learnable_temperature
        )


def _settings(args) -> EntropyRegularizationArguments:
    """The entropy fields of `args`, or all defaults when `args` is a plain config (then everything is off)."""
    return args if isinstance(args, EntropyRegularizationArguments) else EntropyRegularizationArguments()


class AttentionEntropyParameters(nn.Module):
    """Learnable per-(layer, head) thresholds theta = sigmoid(threshold_logits) and log-temperatures.

    Left out of state dicts on purpose (see the module docstring); `save`/`load` persist them.
    """

    def __init__(self, num_layers: int, num_heads: int, threshold_init: float | None, learn_temperature: bool):
        super().__init__()
        self.threshold_logits = None
        self.log_temperature = None
        if threshold_init is not None:
            logit = math.log(threshold_init / (1 - threshold_init))
            self.threshold_logits = nn.Parameter(torch.full((num_layers, num_heads), logit))
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.zeros(num_layers, num_heads))

    def thresholds(self) -> torch.Tensor:
        return torch.sigmoid(self.threshold_logits)

    def forward(self) -> torch.Tensor:
        """theta, read through a module call.

        DeepSpeed ZeRO-3 gathers a partitioned parameter only inside the forward of the module that owns it.
        """
        return self.thresholds()

    def temperature(self, layer: int) -> torch.Tensor | None:
        return None if self.log_temperature is None else torch.exp(self.log_temperature[layer])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # persisted in PARAMETERS_FILE instead, so saved models stay loadable by plain transformers

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        pass

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {name: _full_tensor(param) for name, param in self.named_parameters()}

    def save(
        self, directory: str | os.PathLike, settings: dict, tensors: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write `directory/attention_entropy.safetensors` (`tensors`: `named_tensors()`, gathered by every rank)."""
        from safetensors.torch import save_file

        path = Path(directory) / PARAMETERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.named_tensors() if tensors is None else tensors
        tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in tensors.items()}
        save_file(tensors, str(path), metadata={"settings": json.dumps(settings)})
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        """Restore from `directory/attention_entropy.safetensors`; False (with a warning) if there is none."""
        from safetensors.torch import load_file

        path = Path(directory) / PARAMETERS_FILE
        if not path.is_file():
            warnings.warn(
                f"{path} not found: attention-entropy parameters restart from their initial values.", stacklevel=2
            )
            return False
        saved = load_file(str(path))
        for name, param in self.named_parameters():
            if name not in saved or saved[name].shape != param.shape:
                raise ValueError(
                    f"{path}: parameter {name!r} has shape {tuple(saved[name].shape) if name in saved else None}, "
                    f"this run expects {tuple(param.shape)}. Resume with the same model and attention-entropy "
                    "settings."
                )
            with torch.no_grad():
                param.copy_(saved[name].to(param.dtype))
        return True


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter, under FSDP2 (DTensor) or DeepSpeed ZeRO-3 (partitioned) too."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param


@torch.no_grad()
def fold_attention_temperature(model: nn.Module, parameters: AttentionEntropyParameters) -> None:
    """Divide each head's query projection by its learned temperature, then reset the temperatures to 1.

    softmax(q.k / (t sqrt(d))) with q = W_q x + b equals softmax(q'.k / sqrt(d)) with q' = (W_q x + b) / t, and
    rotary embeddings are linear in q, so the folded model is an ordinary checkpoint computing the same function.
    """
    if parameters.log_temperature is None:
        return
    for module in attention_modules(model):
        projection = module.q_proj
        temperature = torch.exp(parameters.log_temperature[module.layer_idx]).to(projection.weight.dtype)
        heads = temperature.numel()
        scale = (1 / temperature).repeat_interleave(projection.out_features // heads)
        projection.weight.mul_(scale[:, None])
        if projection.bias is not None:
            projection.bias.mul_(scale)
    parameters.log_temperature.zero_()


def _check_temperature_support(trainer, policy: nn.Module) -> None:
    from peft import PeftModel

    if isinstance(trainer.model, PeftModel):
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
    for module in attention_modules(policy):
        projection = getattr(module, "q_proj", None)
        heads = policy.config.get_text_config().num_attention_heads
        if not isinstance(projection, nn.Linear) or hasattr(module, "q_norm") or projection.out_features % heads:
            raise ValueError(
                f"attention_entropy_learnable_temperature cannot be folded into {type(module).__name__}: it needs a "
                "plain `q_proj` Linear with one block of rows per head and no query normalization (`q_norm`)."
            )


def attention_entropy_penalty(
    records: list, thresholds: torch.Tensor, settings: EntropyRegularizationArguments
) -> torch.Tensor:
    """L_entropy: the mean over recorded layers of each layer's band penalty (itself a mean over heads).

    `thresholds` is the (layers, heads) theta table; `settings` supplies the normalization, tolerance and convention.
    """
    penalties = []
    for record in records:
        units, max_units, weights = entropy_units(
            record.entropy, record.valid_rows, record.visible_keys, settings.attention_entropy_normalization
        )
        penalties.append(
            entropy_band_penalty(
                units,
                max_units,
                weights,
                thresholds[record.layer],
                settings.attention_entropy_tolerance,
                settings.attention_entropy_convention,
            )
        )
    return torch.stack(penalties).mean()


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
        from peft import PeftModel

        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        self._entropy_recorder = AttentionEntropyRecorder()
        self._entropy_probe = OutputLogZProbe(policy)
        self._entropy_modules = []
        self._entropy_duplicates_warned = False
        if not settings.records_attention:
            return
        current = policy.config._attn_implementation
        if current not in (None, "eager", "sdpa", ATTENTION_IMPLEMENTATION):
            logger.warning("attention entropy: replacing %s attention by %s", current, ATTENTION_IMPLEMENTATION)
        policy.set_attn_implementation(ATTENTION_IMPLEMENTATION)
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
            policy.add_module(MODULE_NAME, parameters)
            for module in self._entropy_modules:
                object.__setattr__(module, PARAMETERS_ATTRIBUTE, parameters)  # a reference, not a submodule
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
        with self._entropy_recorder:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        extra = self._entropy_terms(num_items_in_batch)
        if extra is not None:
            loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

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
                f"implementation was changed after the trainer set it to {ATTENTION_IMPLEMENTATION!r}."
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
            penalty = attention_entropy_penalty(records, thresholds, settings)
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
        metrics["attention_logits/max"].append(max(summary["layer_max_logit"]))
        for layer in sorted(record.layer for record in records):
            metrics[f"attention_entropy/layer_{layer}"].append(summary["layer_mean_entropy"][layer])
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


def _register(cls: type) -> type:
    """Make a class created at run time importable by name, so pickling (Trainer saves `training_args.bin`) works."""
    name = cls.__name__
    suffix = 1
    while name in globals() and globals()[name] is not cls:
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
            config = _register(config)
        trainer = trainer_cls
        if not issubclass(trainer_cls, EntropyRegularizationMixin):
            trainer = _register(
                type(
                    f"Entropy{trainer_cls.__name__}",
                    (EntropyRegularizationMixin, trainer_cls),
                    {"__doc__": f"`{trainer_cls.__name__}` with `EntropyRegularizationMixin`."},
                )
            )
        _COMPOSED[key] = (trainer, config)
    return _COMPOSED[key]


def _ready_made():
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    return with_entropy_regularization(SFTTrainer, SFTConfig), with_entropy_regularization(DPOTrainer, DPOConfig)


(EntropySFTTrainer, EntropySFTConfig), (EntropyDPOTrainer, EntropyDPOConfig) = _ready_made()
