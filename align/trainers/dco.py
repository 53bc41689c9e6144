"""`DCOTrainer`: supervised fine-tuning with the Direct Coverage Optimization (pass@N) loss.

Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting
Confidence Improves Mathematical Reasoning" (arXiv 2502.07154). The math lives in `align.losses.coverage`; this
module only wires it into TRL's `SFTTrainer`:

- the per-token log-probabilities come from TRL's fused LM head (no (B, L, V) logits);
- they are summed per sequence (`sequence` mode), per step (`step` mode, DCO_step), or the trace's cross-entropy is
  weighted by an estimated p̂ read from the dataset (`estimated` mode, DCO_a);
- the loss is a per-sequence mean (not TRL's per-token mean), so gradient accumulation is left to `Trainer`
  (`loss_is_scaled_for_ga = False`), as in DPO.

The extra inputs (the `p_hat` column, the step index of every token) survive TRL's dataset preparation because
they are declared as signature columns, and reach `compute_loss` through a collator that wraps TRL's.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from align.losses.coverage import (
    CoverageLossOutput,
    dco_estimated_loss,
    dco_loss,
    segment_log_probs,
    sequence_log_probs,
)
from align.steps import DEFAULT_STEP_PATTERN
from align.trainers.dco_data import (
    P_HAT_COLUMN,
    STEP_IDS_COLUMN,
    DataCollatorForCoverage,
    add_step_ids,
    check_p_hat_column,
)


DCO_MODES = ("sequence", "step", "estimated")


# The paper both the offline DCOTrainer and the on-policy PassAtNGRPOTrainer implement (model cards cite it).
DCO_PAPER = {
    "title": "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves Mathematical "
    "Reasoning",
    "id": "2502.07154",
    "citation": textwrap.dedent("""\
        @article{chen2025rethinking,
            title   = {{Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves
                       Mathematical Reasoning}},
            author  = {Feng Chen and Allan Ravent{\\'o}s and Nan Cheng and Surya Ganguli and Shaul Druckmann},
            year    = 2025,
            journal = {arXiv preprint arXiv:2502.07154},
        }"""),
}


def check_pass_n(value, one_means: str) -> float:
    """N of the DCO paper's pass@N objective, as a float, for `DCOConfig` and `PassAtNConfig`: a finite number >= 1
    (fractional N is allowed: the objective 1 - (1 - p)^N is smooth in N). `one_means` says what N = 1 trains."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1):
        raise ValueError(
            f"pass_n must be a number >= 1 (the test-time sample budget N; 1 = {one_means}), got {value!r}."
        )
    return float(value)


def default_output_dir(model, method: str) -> str:
    """`<model name>-<method>`: the output directory TRL's trainers use when built without args (`SmolLM2-DCO`)."""
    name = model if isinstance(model, str) else model.config._name_or_path
    return f"{str(name).rstrip('/').split('/')[-1]}-{method}"


@dataclass
class DCOConfig(SFTConfig):
    r"""
    Configuration class for [`DCOTrainer`]: TRL's [`~trl.SFTConfig`] plus the DCO loss options.

    > Parameters that control the DCO loss

        pass_n (`float`, *optional*, defaults to `16`):
            N', the test-time sample budget the model is trained for: the loss is -log(1 - (1 - p̂)^N'). `1` is
            cross-entropy with a per-sequence mean. In `step` mode it is N_eff, the budget per step.
        dco_mode (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: p̂ is the probability of the whole completion (the paper's direct-answer DCO).
            `"step"`: the completion is split into steps by `dco_step_separator` and each step's cross-entropy is
            weighted by F(N_eff, p̂_step) (DCO_step). `"estimated"`: p̂ is an estimate of P(correct answer) read
            from the dataset column `p_hat` (e.g. written by `align data coverage`), and the trace's cross-entropy
            is weighted by F(N, p̂) (DCO_a, for chains of thought).
        dco_weight_threshold (`float`, *optional*, defaults to `0.0`):
            ε: units (sequences, or steps) whose weight F < ε are dropped from the batch, and the mean divides by
            the number of sequences kept. `0` keeps everything.
        dco_step_separator (`str`, *optional*, defaults to `r"(?:\n\n)+"`):
            Regular expression that ends a step in `step` mode. The default is `align.steps.DEFAULT_STEP_PATTERN`, a
            run of "\n\n", so DCO_step trains on the steps the implicit PRM (`align.prm`) scores; steps and their
            tokens are assigned as `align.steps` defines.

    The SFT options `packing`, `padding_free`, `loss_type="dft"` and `label_smoothing_factor` are rejected: packing
    mixes sequences in one row, and the others replace the loss that DCO defines.
    """

    pass_n: float = field(
        default=16.0,
        metadata={
            "help": "N', the test-time sample budget trained for: loss = -log(1 - (1 - p̂)^N'). 1 = cross-entropy "
            "(per-sequence mean). In `step` mode this is N_eff, the budget per step."
        },
    )
    dco_mode: str = field(
        default="sequence",
        metadata={
            "help": "`sequence`: p̂ = probability of the whole completion (direct-answer DCO). `step`: DCO_step, "
            "each step (split by dco_step_separator) weighted by F(N_eff, p̂_step). `estimated`: DCO_a, the trace's "
            "cross-entropy weighted by F(N, p̂) with p̂ from the dataset column `p_hat` (align data coverage).",
            "choices": list(DCO_MODES),
        },
    )
    dco_weight_threshold: float = field(
        default=0.0,
        metadata={
            "help": "ε in [0, 1]: drop units (sequences, or steps in step mode) whose weight F < ε from the batch "
            "and divide by the number of sequences kept. 0 keeps everything."
        },
    )
    dco_step_separator: str = field(
        default=DEFAULT_STEP_PATTERN,
        metadata={
            "help": "Regular expression that ends a step in `step` mode (default: each run of \\n\\n, the implicit "
            "PRM's step separator)."
        },
    )

    def __post_init__(self):
        self.pass_n = check_pass_n(self.pass_n, one_means="cross-entropy")
        if self.dco_mode not in DCO_MODES:
            raise ValueError(f"dco_mode must be one of {DCO_MODES}, got {self.dco_mode!r}.")
        if not 0.0 <= self.dco_weight_threshold <= 1.0:
            raise ValueError(
                f"dco_weight_threshold (ε) must be in [0, 1] since the weight F is, got {self.dco_weight_threshold!r}."
            )
        try:
            separator = re.compile(self.dco_step_separator)
        except re.error as error:
            raise ValueError(
                f"dco_step_separator {self.dco_step_separator!r} is not a valid regular expression: {error}."
            ) from error
        if separator.fullmatch(""):
            raise ValueError(
                f"dco_step_separator {self.dco_step_separator!r} matches the empty string, so it would split "
                r"between every character; use one that cannot match empty text, e.g. '(?:\n\n)+' or a lookahead "
                r"such as '(?=Step \d+:)'."
            )
        if self.packing or self.padding_free:
            raise ValueError(
                "DCO needs each sequence in its own row to compute its probability: set `packing: false` and "
                "`padding_free: false`."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"DCO defines its own loss; loss_type must be 'nll' (the default), got {self.loss_type!r}."
            )
        if self.label_smoothing_factor:
            raise ValueError("DCO defines its own loss; set label_smoothing_factor to 0.")
        super().__post_init__()


class DCOTrainer(SFTTrainer):
    """[`~trl.SFTTrainer`] whose loss is DCO's -log(1 - (1 - p̂)^N), see [`DCOConfig`] and `align.losses.coverage`.

    Takes every dataset [`~trl.SFTTrainer`] takes (prompt/completion or conversational, completion-only or
    assistant-only masks), LoRA through `peft_config`, gradient accumulation and multi-process launches. p̂ is the
    probability of the tokens the loss is computed on (the completion, or the assistant turns).

    Example:
    ```python
    >>> from align.trainers.dco import DCOConfig, DCOTrainer
    >>> args = DCOConfig(output_dir="runs/dco", pass_n=16)
    >>> trainer = DCOTrainer(model="path/to/model", args=args, train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "dco", "align"]
    _name = "DCO"
    _paper = DCO_PAPER
    # The loss is a mean over this micro-batch's sequences, so `Trainer` divides it by the accumulation steps: with
    # equal micro-batches, accumulating k of them equals one k-times larger batch (what DPO and KTO do as well).
    loss_is_scaled_for_ga = False

    def __init__(self, model, args: DCOConfig | None = None, *, compute_loss_func=None, **kwargs):
        if args is None:
            args = DCOConfig(default_output_dir(model, "DCO"))
        elif not isinstance(args, DCOConfig):
            raise TypeError(
                f"DCOTrainer needs a DCOConfig (it adds pass_n, dco_mode, ...), got {type(args).__name__}; build "
                "one with DCOConfig(**your_args.to_dict())."
            )
        if compute_loss_func is not None:
            raise ValueError("DCOTrainer computes the DCO loss itself; do not pass compute_loss_func.")
        super().__init__(model, args=args, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("DCOTrainer supports text datasets only; this dataset has images.")
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (parallelism.cp_enabled or getattr(parallelism, "sp_enabled", False)):
            raise ValueError(
                "DCO needs whole sequences on one process to compute p̂; context/sequence parallelism splits them. "
                "Disable cp_size/sp_size."
            )
        if self._skip_prepare_dataset and args.dco_mode == "step":
            for name, dataset in {"train": self.train_dataset, "eval": self.eval_dataset}.items():
                if dataset is not None and STEP_IDS_COLUMN not in (dataset.column_names or []):
                    raise ValueError(
                        f"dco_mode='step' with skip_prepare_dataset needs a `{STEP_IDS_COLUMN}` column in the {name} "
                        "dataset (step index of each token, -1 outside the loss); let DCOTrainer prepare the dataset "
                        "or add it with `align.steps.step_segment_ids`."
                    )
        self.data_collator = DataCollatorForCoverage(
            self.data_collator, with_p_hat=args.dco_mode == "estimated", with_step_ids=args.dco_mode == "step"
        )

    def _dco_columns(self) -> list[str]:
        return {"estimated": [P_HAT_COLUMN], "step": [STEP_IDS_COLUMN]}.get(self.args.dco_mode, [])

    def _set_signature_columns_if_needed(self):
        # `Trainer` drops every column the model's forward does not take (`remove_unused_columns`); keep DCO's.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self._dco_columns()]))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if args.dco_mode == "estimated":
            check_p_hat_column(dataset, dataset_name)
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if args.dco_mode == "step" and STEP_IDS_COLUMN not in (dataset.column_names or []):
            dataset = add_step_ids(
                dataset, self._tokenizer, args.dco_step_separator, args.dataset_num_proc, dataset_name
            )
        return dataset

    def _coverage_loss(self, outputs, p_hat, step_ids) -> CoverageLossOutput:
        args = self.args
        label_mask = outputs.label_mask
        token_logp = outputs.log_probs  # (B, L-1): position t scores label t+1; 0 where the label is -100
        if args.dco_mode == "step":
            # Step ids are per input token, like the labels, so shift them the same way.
            segment_ids = torch.where(label_mask, step_ids[:, -token_logp.shape[1] :], -1)
            step_logp, step_mask = segment_log_probs(token_logp, segment_ids)
            return dco_loss(step_logp, args.pass_n, args.dco_weight_threshold, unit_mask=step_mask)
        seq_logp, has_tokens = sequence_log_probs(token_logp, label_mask)
        if args.dco_mode == "estimated":
            return dco_estimated_loss(seq_logp, p_hat, args.pass_n, args.dco_weight_threshold, mask=has_tokens)
        return dco_loss(seq_logp, args.pass_n, args.dco_weight_threshold, unit_mask=has_tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `num_items_in_batch` (a token count) is not used: DCO's loss is a mean over sequences.
        mode = "train" if self.model.training else "eval"
        p_hat = inputs.pop(P_HAT_COLUMN, None)
        step_ids = inputs.pop(STEP_IDS_COLUMN, None)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)
        result = self._coverage_loss(outputs, p_hat, step_ids)
        loss = result.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_metrics(result, outputs, inputs, mode)
        if return_outputs:
            # `prediction_step` wants logits, which the fused head does not build: one extra forward, as in TRL.
            with torch.no_grad():
                outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            return loss, outputs
        return loss

    def _log_metrics(self, result: CoverageLossOutput, outputs, inputs, mode: str) -> None:
        """dco/* metrics over the units of every process (a unit is a sequence, or a step in step mode), and the
        metrics `SFTTrainer` logs (entropy, mean_token_accuracy, num_tokens, aux_loss) so DCO and SFT runs compare.

        Everything is reduced in one gather of per-process sums (a gather per metric costs more than the loss).
        """
        mask, weight = result.unit_mask, result.weight.float()
        sequences = mask.any(-1)
        label_mask = outputs.label_mask
        aux_loss = outputs.aux_loss.detach().float() if self.aux_loss_enabled else weight.new_zeros(())
        local = torch.stack(
            [
                torch.where(mask, weight, 0.0).sum(),
                mask.sum().float(),
                (mask & ~result.kept).sum().float(),
                torch.where(mask, result.coverage.float(), 0.0).sum(),
                torch.where(sequences, result.seq_logp.float(), 0.0).sum(),
                sequences.sum().float(),
                label_mask.sum().float(),
                torch.where(label_mask, outputs.entropy.detach().float(), 0.0).sum(),
                (outputs.is_top1 & label_mask).sum().float(),
                inputs["attention_mask"].sum().float(),
                aux_loss,
                -torch.where(mask, weight, math.inf).min(),  # max over processes of -min = -(global min)
            ]
        )
        gathered = self.accelerator.gather(local[None]).view(-1, local.numel())
        processes = gathered.shape[0]
        (weight_sum, units, dropped, coverage_sum, logp_sum, num_sequences, tokens, entropy_sum, top1, seen, aux) = (
            gathered[:, :-1].sum(0).tolist()
        )
        weight_min = -gathered[:, -1].max().item()
        metrics = self._metrics[mode]
        if units:  # else nothing in this batch was trained on, on any process
            metrics["dco/weight_mean"].append(weight_sum / units)
            metrics["dco/weight_min"].append(weight_min)
            metrics["dco/dropped_frac"].append(dropped / units)
            metrics["dco/coverage"].append(coverage_sum / units)
            metrics["dco/seq_logp_mean"].append(logp_sum / num_sequences)
        metrics["entropy"].append(entropy_sum / tokens if tokens else 0.0)
        metrics["mean_token_accuracy"].append(top1 / tokens if tokens else 0.0)
        if mode == "train":
            self._total_train_tokens += int(seen) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(aux / processes)
