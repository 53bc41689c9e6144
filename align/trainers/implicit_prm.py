"""Train an implicit PRM: an outcome reward r = β·log π_θ(y)/π_ref(y) whose partial sums are process rewards.

Yuan et al. 2024, "Free Process Rewards without Process Labels" (arXiv 2412.01981). The model is a causal LM; its
reward is its log-likelihood ratio to a frozen reference, trained on outcome labels only (the losses and formulas are
in `align.losses.implicit_reward`; scoring steps with the trained model is `align.prm`).

Which TRL trainer each objective builds on, and why:

- `ce` (unpaired (prompt, completion, label) rows, the paper's default) subclasses `KTOTrainer`. KTO is TRL's trainer
  for exactly this data: it tokenizes prompt/completion rows with a boolean label, collates them with completion
  masks, keeps the reference (a frozen copy, or the adapter-disabled base under LoRA, prepared for DeepSpeed/FSDP),
  precomputes reference log-probs on request, and un-pairs preference data. Only the loss differs, so only
  `_compute_loss` is replaced; KTO's KL estimate (an extra policy and reference forward on mismatched pairs, which
  CE does not use) is switched off.
- `dpo` / `nca` (pairs of a correct and an incorrect completion of one prompt) subclass `DPOTrainer`, whose collator
  keeps each pair in one batch (chosen rows, then rejected rows) and which has the same reference machinery.

`ImplicitPRMTrainer(..., args=ImplicitPRMConfig(objective=...))` builds the right one, so `align train prm` and user
code have one entry point; both are `ImplicitPRMTrainer` instances. After saving, the output directory also holds
`implicit_prm.json` (β, objective, step settings, reference) that `align.prm.ImplicitPRM.from_pretrained` reads.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer, KTOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from align.log_probs import is_peft_model, token_log_probs
from align.losses.implicit_reward import (
    BALANCE_MODES,
    balanced_subset,
    implicit_ce_loss,
    implicit_dpo_loss,
    implicit_nca_loss,
)
from align.prm import SETTINGS_FILE
from align.steps import DEFAULT_STEP_SEPARATOR


logger = logging.getLogger("align.trainers.implicit_prm")

OBJECTIVES = ("ce", "dpo", "nca")
_COMPOSED: dict[tuple[type, type], type] = {}  # (subclass of the entry point, concrete trainer) -> their union
PAIRWISE_OBJECTIVES = ("dpo", "nca")

# DPOConfig fields that choose or reshape DPOTrainer's own loss. The implicit PRM's loss is set by `objective`, so
# these must stay at their defaults; a recipe that sets one would otherwise be silently ignored.
_DPO_LOSS_FIELDS = {
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0,
    "use_weighting": False,
}


@dataclass
class ImplicitPRMConfig(DPOConfig):
    """Configuration of `ImplicitPRMTrainer`: TRL's `DPOConfig` (model, data, reference and training options) plus
    the implicit-PRM objective. Defaults follow the paper: β = 0.05, lr 5e-7, objective `ce`."""

    objective: str = field(
        default="ce",
        metadata={
            "help": "Training objective on r = β·log π/π_ref. `ce`: binary cross-entropy of σ(r) against outcome "
            "labels (unpaired prompt/completion/label rows; the paper's default). `dpo`: −log σ(r_w − r_l) on "
            "correct/incorrect pairs. `nca`: NCA on pairs (prompt/chosen/rejected rows).",
            "choices": list(OBJECTIVES),
        },
    )
    beta: float = field(
        default=0.05,
        metadata={"help": "β of the implicit reward r = β·log π_θ(y)/π_ref(y) (the paper uses 0.05)."},
    )
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (the paper: 5e-7, full FT)."})
    class_balance: str = field(
        default="none",
        metadata={
            "help": "`ce` only: balance correct and incorrect training completions by subsampling. `dataset`: "
            "subsample the majority class over the whole dataset; `instruction`: per prompt, keep as many correct "
            "as incorrect completions (prompts with one class are dropped); `none`.",
            "choices": list(BALANCE_MODES),
        },
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={"help": "`ce` only: weight of the loss of correct (label True) completions (KTO's field name)."},
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={"help": "`ce` only: weight of the loss of incorrect (label False) completions."},
    )
    step_separator: str = field(
        default=DEFAULT_STEP_SEPARATOR,
        metadata={
            "help": "How scoring splits a completion into steps (saved with the model for `align.prm`): a literal "
            "separator that ends each step. Not used by the training loss, which is outcome-level."
        },
    )
    step_pattern: str | None = field(
        default=None,
        metadata={
            "help": "A regex whose matches end steps at scoring time, overriding step_separator (e.g. "
            "`(?=Step \\d+:)` starts a step at each 'Step k:' header). Saved with the model."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the paper uses 0.05), got {self.beta}")
        if self.class_balance not in BALANCE_MODES:
            raise ValueError(f"class_balance must be one of {BALANCE_MODES}, got {self.class_balance!r}")
        if self.objective != "ce" and (
            self.class_balance != "none" or self.desirable_weight != 1.0 or self.undesirable_weight != 1.0
        ):
            raise ValueError(
                f"class_balance, desirable_weight and undesirable_weight apply to objective 'ce' (unpaired labels); "
                f"objective {self.objective!r} trains on pairs, which are balanced by construction. Remove them."
            )
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {self.desirable_weight} and "
                f"{self.undesirable_weight}"
            )
        if self.step_pattern is not None:
            import re

            try:
                re.compile(self.step_pattern)
            except re.error as error:
                raise ValueError(f"step_pattern {self.step_pattern!r} is not a valid regex: {error}") from None
        for name, default in _DPO_LOSS_FIELDS.items():
            value = getattr(self, name)
            if (list(value) if isinstance(value, list | tuple) else value) != default:
                raise ValueError(
                    f"{name}={value!r} is a DPOTrainer loss option; the implicit PRM's loss is chosen by `objective` "
                    f"({'/'.join(OBJECTIVES)}). Remove {name} from the recipe."
                )

    def scoring_settings(self) -> dict:
        """What `align.prm.ImplicitPRM.from_pretrained` needs to score with the trained model."""
        return {
            "beta": self.beta,
            "objective": self.objective,
            "step_separator": self.step_separator,
            "step_pattern": self.step_pattern,
        }


class ImplicitPRMTrainer:
    """Train an implicit PRM: builds `OutcomeImplicitPRMTrainer` (objective `ce`, on TRL's KTOTrainer) or
    `PairwiseImplicitPRMTrainer` (`dpo`/`nca`, on TRL's DPOTrainer) from `args.objective`; see the module docstring.

    Takes the arguments of those TRL trainers: `model` (path, model or PeftModel), `ref_model` (None: the
    adapter-disabled base under LoRA, else a frozen copy of the initial model), `args` (`ImplicitPRMConfig`),
    `train_dataset`, `eval_dataset`, `processing_class`, `peft_config`, ...
    """

    _tag_names = ["trl", "align", "implicit-prm"]
    _name = "Implicit PRM"
    _paper = {
        "title": "Free Process Rewards without Process Labels",
        "id": "2412.01981",
        "citation": textwrap.dedent("""\
            @article{yuan2024implicitprm,
                title        = {{Free Process Rewards without Process Labels}},
                author       = {Lifan Yuan and others},
                year         = 2024,
                eprint       = {arXiv:2412.01981},
            }"""),
    }

    def __new__(cls, *args, **kwargs):
        if not issubclass(cls, KTOTrainer | DPOTrainer):  # this entry point, possibly composed with mixins
            config = kwargs.get("args", args[2] if len(args) > 2 else None)
            if config is None:
                raise ValueError("ImplicitPRMTrainer needs args=ImplicitPRMConfig(...) to know its objective.")
            if not isinstance(config, ImplicitPRMConfig):
                raise TypeError(f"args must be an ImplicitPRMConfig, got {type(config).__name__}")
            pairwise = config.objective in PAIRWISE_OBJECTIVES
            concrete = PairwiseImplicitPRMTrainer if pairwise else OutcomeImplicitPRMTrainer
            if cls is not ImplicitPRMTrainer:
                # A subclass adding mixins (e.g. align's entropy regularization): keep them, on the concrete trainer.
                key = (cls, concrete)
                if key not in _COMPOSED:
                    name = f"{cls.__name__}[{'pairwise' if pairwise else 'outcome'}]"
                    _COMPOSED[key] = type(name, (cls, concrete), {"__module__": cls.__module__})
                concrete = _COMPOSED[key]
            cls = concrete
        # Python then runs the returned class's (TRL's) __init__ with the same arguments: it is a subclass of `cls`.
        return object.__new__(cls)

    # -------------------------------------------------------------- shared by both objectives

    def _completion_logps(self, model, input_ids, attention_mask, completion_mask):
        """(Σ over completion tokens of log π(y_t | ·) per row, the model's outputs), from TRL's fused LM head."""
        log_probs, outputs = token_log_probs(model, input_ids, completion_mask, attention_mask)
        return log_probs.sum(-1), outputs

    def _reference_logps(self, input_ids, attention_mask, completion_mask):
        """The reference's completion log-probs: the frozen `ref_model`, or the policy with its adapter disabled."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
                unwrapped = self.accelerator.unwrap_model(self.model)
                # A fresh adapter's base is the reference; re-training a loaded adapter keeps a frozen copy as "ref".
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self._completion_logps(self.model, input_ids, attention_mask, completion_mask)[0]
            if self.ref_model is None:
                raise ValueError(
                    "No reference model: pass ref_model, train a LoRA adapter (peft_config), or let the trainer "
                    "load the reference from the model path."
                )
            return self._completion_logps(self.ref_model, input_ids, attention_mask, completion_mask)[0]

    def _add_aux_loss(self, loss, outputs, mode):
        if not self.aux_loss_enabled:
            return loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        return loss + self.router_aux_loss_coef * outputs.aux_loss

    def _log_rewards(self, mode: str, correct: torch.Tensor, incorrect: torch.Tensor, accurate: torch.Tensor):
        """Mean implicit reward of correct / incorrect completions and reward accuracy, summed across processes
        (as sums and counts, since ranks may hold different numbers of each class)."""
        device = correct.device
        totals = torch.tensor(
            [
                correct.float().sum(),
                correct.numel(),
                incorrect.float().sum(),
                incorrect.numel(),
                accurate.float().sum(),
                accurate.numel(),
            ],
            dtype=torch.float32,
            device=device,
        )
        totals = self.accelerator.gather_for_metrics(totals.unsqueeze(0)).sum(0).tolist()
        correct_sum, num_correct, incorrect_sum, num_incorrect, accurate_sum, num_judged = totals
        if num_correct:
            self._metrics[mode]["rewards/correct"].append(correct_sum / num_correct)
        if num_incorrect:
            self._metrics[mode]["rewards/incorrect"].append(incorrect_sum / num_incorrect)
        if num_correct and num_incorrect:
            self._metrics[mode]["rewards/margins"].append(correct_sum / num_correct - incorrect_sum / num_incorrect)
        if num_judged:
            self._metrics[mode]["rewards/accuracies"].append(accurate_sum / num_judged)

    def _reject_outputs_request(self, return_outputs: bool):
        if return_outputs:
            raise ValueError(
                "The implicit PRM trainers do not return logits (they use TRL's fused LM head), so compute_metrics "
                "is not supported; evaluation logs rewards/correct, rewards/incorrect and rewards/accuracies."
            )

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            settings = self.args.scoring_settings()
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft_model(unwrapped):
                settings["reference"] = "adapter-disabled base"
            else:
                reference = self.ref_model if self.ref_model is not None else unwrapped
                settings["reference"] = "model"
                settings["reference_model"] = get_config_model_id(self.accelerator.unwrap_model(reference).config)
            with open(os.path.join(output_dir, SETTINGS_FILE), "w") as handle:
                json.dump(settings, handle, indent=2)


class OutcomeImplicitPRMTrainer(ImplicitPRMTrainer, KTOTrainer):
    """Objective `ce` on unpaired outcome rows, on TRL's KTOTrainer (see the module docstring)."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean; Trainer divides it by the accumulation steps

    # KTOTrainer sets this from its loss type; CE has no KL term, so it stays off: no KL completions are built or run
    # through the policy and reference, and KTO's sequential-sampling requirement (for its KL pairing) is lifted.
    calculate_KL = property(lambda self: False, lambda self, value: None)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = set(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())
        usable = {"completion", "label"} <= columns or {"chosen", "rejected"} <= columns
        if not (usable or "completion_ids" in columns):  # (already tokenized by KTO: nothing to check)
            raise ValueError(
                f"objective 'ce' trains on outcome rows with columns prompt, completion, label (or on pairs "
                f"prompt, chosen, rejected, which are un-paired); the {dataset_name} dataset has {sorted(columns)}. "
                "Build them with `align data outcome` or pick the dataset kind 'outcome'."
            )
        if dataset_name == "train" and args.class_balance != "none" and "label" in columns:
            dataset = self._balance(dataset, args)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    @staticmethod
    def _balance(dataset, args):
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise ValueError("class_balance needs a map-style Dataset (its size must be known); got a streaming one.")
        labels = [bool(label) for label in dataset["label"]]
        groups = None
        if args.class_balance == "instruction":
            key = "id" if "id" in dataset.column_names else "prompt"
            groups = [json.dumps(value, sort_keys=True) for value in dataset[key]]
        keep = balanced_subset(labels, groups, args.class_balance, seed=args.seed)
        if not keep:
            raise ValueError(
                f"class_balance={args.class_balance!r} leaves no training rows: the data has {sum(labels)} correct "
                f"and {len(labels) - sum(labels)} incorrect completions"
                + (" and no prompt with both." if args.class_balance == "instruction" else ".")
            )
        logger.info("class_balance=%s kept %d of %d rows", args.class_balance, len(keep), len(labels))
        return dataset.select(keep)

    def _compute_loss(self, model, inputs, return_outputs):
        self._reject_outputs_request(return_outputs)
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        labels = inputs["label"].to(input_ids.device).bool()
        logps, outputs = self._completion_logps(model, input_ids, attention_mask, completion_mask)
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"].to(logps.device)
        else:
            ref_logps = self._reference_logps(input_ids, attention_mask, completion_mask)
        logratios = logps - ref_logps
        weights = torch.where(labels, self.desirable_weight, self.undesirable_weight).to(logps.dtype)
        loss = implicit_ce_loss(logratios, labels, self.beta, weights).mean()

        rewards = self.beta * logratios.detach()
        # σ(r) > ½ for a correct completion, < ½ for an incorrect one; r = 0 (e.g. at initialization) is neither.
        self._log_rewards(mode, rewards[labels], rewards[~labels], torch.where(labels, rewards > 0, rewards < 0))
        return self._add_aux_loss(loss, outputs, mode)


class PairwiseImplicitPRMTrainer(ImplicitPRMTrainer, DPOTrainer):
    """Objectives `dpo` / `nca` on (prompt, chosen = correct, rejected = incorrect) pairs, on TRL's DPOTrainer."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean; Trainer divides it by the accumulation steps

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = set(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())
        if not ({"chosen", "rejected"} <= columns or "chosen_ids" in columns):
            raise ValueError(
                f"objective {args.objective!r} trains on pairs with columns prompt, chosen (correct), rejected "
                f"(incorrect); the {dataset_name} dataset has {sorted(columns)}. Build pairs with "
                "`align data outcome --pairs` (or `align data pairs`), or use objective 'ce' for outcome rows."
            )
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        self._reject_outputs_request(return_outputs)
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        logps, outputs = self._completion_logps(model, input_ids, attention_mask, completion_mask)
        chosen_logps, rejected_logps = logps.chunk(2)  # the collator puts all chosen rows first
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._reference_logps(input_ids, attention_mask, completion_mask).chunk(2)
        chosen_logratios = chosen_logps - ref_chosen.to(logps.device)
        rejected_logratios = rejected_logps - ref_rejected.to(logps.device)
        loss_fn = implicit_dpo_loss if self.args.objective == "dpo" else implicit_nca_loss
        loss = loss_fn(chosen_logratios, rejected_logratios, self.beta).mean()

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        self._log_rewards(mode, chosen_rewards, rejected_rewards, chosen_rewards > rejected_rewards)
        return self._add_aux_loss(loss, outputs, mode)
