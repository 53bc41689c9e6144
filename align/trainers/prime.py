"""PRIME on TRL's GRPO machinery: dense token advantages from an implicit PRM that learns alongside the policy.

Cui et al. 2025, "Process Reinforcement through Implicit Rewards" (arXiv 2502.01456), Alg. 1. Every generation batch:

1. sample K = `num_generations` completions per prompt and grade them (align's verifier: outcome r_o ∈ {0, 1});
2. filter: prompts whose K outcomes average outside [0.2, 0.8] carry no relative signal and are dropped;
3. score the kept completions with the implicit PRM π_φ: token rewards r_t = β·log π_φ(y_t|·)/π_ref(y_t|·);
4. update the PRM with one CE step on the outcomes of those same samples, σ(β·Σ_t log-ratio) against r_o
   (`align.losses.implicit_reward.implicit_ce_loss`), with its own AdamW, so it keeps tracking the policy;
5. advantages per token: leave-one-out baselines over the K samples for both sources, process returns summed from
   token t to the end, whitened over the batch (`align.losses.prime.prime_advantages`);
6. the policy update is GRPO's loss on those (B, T) advantages.

The hook: `_generate_and_score_completions` is the narrowest place that holds the sampled completions, their
gathered outcome rewards and the advantages handed to the loss; TRL's `_compute_loss` already accepts advantages of
shape (B, T) (it unsqueezes only 1-D ones), so replacing `output["advantages"]` there is the whole integration.
Rewards of all processes are gathered (TRL gathers the outcomes; the token rewards are padded and gathered here), so
every group is whole and every process computes the same advantages, then keeps its own slice, as GRPO does.

The PRM is a second model, not a second adapter on the policy: DDP and DeepSpeed wrap the policy module, and a
backward through the wrapped module for another adapter would fire their gradient reduction on the policy's
buckets. The PRM's gradients are averaged across processes by hand (one all-reduce per step), so it is identical on
every rank under DDP and ZeRO-1/2 (tests/test_prime_distributed.py). ZeRO-3 is refused with one line: transformers
partitions every model loaded under it, so the PRM would be sharded with no DeepSpeed engine to gather it (and TRL's
fused LM head expects DeepSpeed's parameter state). Checkpoints hold the PRM (`prm/`) and its optimizer next to the
policy's; resume restores both.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import textwrap
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import disable_dropout_in_model

from align.log_probs import enable_fused_log_probs, is_peft_model, token_log_probs
from align.losses.implicit_reward import implicit_ce_loss
from align.losses.prime import accuracy_band, batch_norm_process_rewards, prime_advantages
from align.trainers.dco import default_output_dir
from align.trainers.pass_n import GraderGRPOTrainer
from align.trainers.prime_config import PrimeConfig


__all__ = ["PRIME_PAPER", "PrimeConfig", "PrimeGRPOTrainer"]

logger = logging.getLogger("align.prime")

PRIME_PAPER = {
    "title": "Process Reinforcement through Implicit Rewards",
    "id": "2502.01456",
    "citation": textwrap.dedent("""\
        @article{cui2025process,
            title   = {{Process Reinforcement through Implicit Rewards}},
            author  = {Ganqu Cui and Lifan Yuan and Zefan Wang and Hanbin Wang and Wendi Li and Bingxiang He and
                       Yuchen Fan and Tianyu Yu and Qixin Xu and Weize Chen and others},
            journal = {arXiv preprint arXiv:2502.01456},
            year    = {2025}
        }"""),
}
PRM_DIR = "prm"  # inside a checkpoint and the final output_dir
PRM_OPTIMIZER_FILE = "prm_optimizer.pt"


class PrimeGRPOTrainer(GraderGRPOTrainer):
    """GRPO whose advantages are PRIME's: token-level, from verifier outcomes and an online implicit PRM.

    Built like [`GraderGRPOTrainer`] (model, optional `reward_funcs` for the outcome, datasets with `prompt` and
    `answer`, `peft_config`), plus `prm_model` (a loaded PRM, else `args.prm_model_name_or_path` or the policy's
    start). See [`PrimeConfig`] for the knobs.

    Logged (`prime/*`, over every process's samples): `outcome_accuracy` (mean verifier reward, all samples),
    `filtered_frac` (share of prompts the accuracy band dropped), `process_reward_mean` (mean token reward β·log-ratio
    over kept tokens, before normalization), `prm_accuracy` (share of kept samples where sign(β·Σ log-ratio) agrees
    with the outcome, measured before the PRM learns them), `prm_loss` (the CE of that step), `prm_grad_norm`, and
    `advantage_abs_mean`.

    Example:
    ```python
    >>> from align.trainers.prime import PrimeConfig, PrimeGRPOTrainer
    >>> args = PrimeConfig(output_dir="runs/prime", num_generations=4, prm_learning_rate=1e-6)
    >>> trainer = PrimeGRPOTrainer(model="Qwen/Qwen2.5-Math-1.5B", args=args, train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "prime", "align"]
    _name = "PRIME"
    _paper = PRIME_PAPER

    def __init__(self, model, reward_funcs=None, args: PrimeConfig | None = None, prm_model=None, **kwargs):
        if args is None:
            args = PrimeConfig(default_output_dir(model, "prime"))
        elif not isinstance(args, PrimeConfig):
            raise TypeError(
                f"PrimeGRPOTrainer needs a PrimeConfig (it adds the PRM's options), got {type(args).__name__}; "
                "build one with PrimeConfig(**your_args.to_dict())."
            )
        self._gathered_rewards: torch.Tensor | None = None
        peft_config = kwargs.get("peft_config")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.prm = self.prm_reference = self.prm_optimizer = None
        if not args.use_process_rewards:  # outcome-only RLOO: no PRM at all
            return
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
            raise ValueError(
                "PRIME's PRM does not run under DeepSpeed ZeRO-3 (it would be partitioned with no engine to gather "
                "it); launch with --accelerate-config zero2 (or ddp), or set use_process_rewards: false"
            )
        start = model if isinstance(model, str) else getattr(self.model.config, "_name_or_path", None)
        self.prm, self.prm_reference = self._build_prm(prm_model, args.prm_model_name_or_path or start, peft_config)
        trainable = [p for p in self.prm.parameters() if p.requires_grad]
        if not trainable and args.prm_update != "none":
            raise ValueError("the PRM has no trainable parameters; set prm_update: none to keep it frozen")
        self.prm_optimizer = torch.optim.AdamW(
            trainable or [torch.zeros(1, requires_grad=True)],
            lr=args.prm_learning_rate,
            weight_decay=args.prm_weight_decay,
        )

    # --- the PRM ------------------------------------------------------------------------------------------------

    def _build_prm(self, prm_model, location, peft_config):
        """(PRM, reference): the reference is None when it is the PRM's base with its adapter disabled."""
        device = self.accelerator.device
        if prm_model is None:
            if location is None:
                raise ValueError("set prm_model_name_or_path: the policy was passed as a model without a name")
            prm_model = self._load_prm(location, peft_config)
        reference = None
        if not is_peft_model(prm_model):
            reference = self._full_reference(prm_model, location)
            reference.eval().requires_grad_(False).to(device)
            enable_fused_log_probs(reference)
        # Dropout off, as TRL does for the policy, so that every forward sees the same network; train mode so that
        # gradient checkpointing (on when the policy's is) applies to the PRM's backward too.
        disable_dropout_in_model(prm_model)
        prm_model.to(device).train()
        if self.args.gradient_checkpointing:
            prm_model.gradient_checkpointing_enable(self.args.gradient_checkpointing_kwargs)
            if is_peft_model(prm_model):
                prm_model.enable_input_require_grads()  # LoRA on frozen embeddings: checkpointed inputs need grads
        enable_fused_log_probs(prm_model)
        return prm_model, reference

    def _full_reference(self, prm_model, location):
        """The frozen reference of a full-model PRM: the model `align train prm` trained it from (named in its
        settings file), else a copy of the PRM's start (so that every reward is 0 at step 0)."""
        from align.prm import read_settings

        named = read_settings(location).get("reference_model") if location is not None else None
        if named is None or Path(str(named)).resolve() == Path(str(location)).resolve():
            return copy.deepcopy(prm_model)
        return self._load_prm(named, None)

    def _load_prm(self, location: str, peft_config):
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        from align.models import resolve_model_path

        path = resolve_model_path(str(location))
        init = dict(self.args.model_init_kwargs or {})
        init.pop("device_map", None)
        if (Path(path) / "adapter_config.json").is_file():  # a PRM from `align train prm`: keep training its adapter
            from peft import PeftConfig

            base = AutoModelForCausalLM.from_pretrained(
                PeftConfig.from_pretrained(path).base_model_name_or_path, **init
            )
            return PeftModel.from_pretrained(base, path, is_trainable=True)
        base = AutoModelForCausalLM.from_pretrained(path, **init)
        if peft_config is not None:
            return get_peft_model(base, copy.deepcopy(peft_config))
        return base

    def _prm_log_ratios(self, input_ids, attention_mask, scored, start: int, width: int, grad: bool):
        """(rows, width) log π_φ − log π_ref of the completion tokens (0 elsewhere)."""
        with self.compute_loss_context_manager():
            with torch.no_grad():
                if self.prm_reference is not None:
                    reference, _ = token_log_probs(self.prm_reference, input_ids, scored, attention_mask)
                else:
                    with self.prm.disable_adapter():
                        reference, _ = token_log_probs(self.prm, input_ids, scored, attention_mask)
            with torch.set_grad_enabled(grad):
                policy, _ = token_log_probs(self.prm, input_ids, scored, attention_mask)
        ratio = (policy.float() - reference.float())[:, start - 1 : start - 1 + width]
        return ratio * scored[:, start:].to(ratio.dtype)

    def _score_and_update_prm(self, output, keep: torch.Tensor, outcome: torch.Tensor):
        """Token rewards β·log-ratio (B_local, T) of the local completions, and the PRM step on the kept ones."""
        args = self.args
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        scored = torch.cat([torch.zeros_like(output["prompt_mask"]), output["completion_mask"]], dim=1)
        start, width = prompt_ids.shape[1], completion_ids.shape[1]
        rows = keep.nonzero().flatten().tolist()
        micro = args.prm_micro_batch_size or args.per_device_train_batch_size
        kept_total = self._sum_across_processes(float(len(rows)))
        learn = args.prm_update != "none" and kept_total > 0
        ratios = torch.zeros(len(keep), width, device=completion_ids.device)
        loss_sum = correct = 0.0
        self.prm_optimizer.zero_grad(set_to_none=True)
        for first in range(0, len(rows), micro):
            index = torch.tensor(rows[first : first + micro], device=input_ids.device)
            ratio = self._prm_log_ratios(
                input_ids[index], attention_mask[index], scored[index], start, width, grad=learn
            )
            labels = outcome[index].clamp(0, 1)
            losses = implicit_ce_loss(ratio.sum(-1), labels, args.prm_beta)
            if learn:
                (losses.sum() / kept_total).backward()
            ratios[index] = ratio.detach()
            loss_sum += losses.sum().item()
            correct += ((ratio.detach().sum(-1) > 0) == (labels > 0.5)).sum().item()
        stats = {"prm_loss": (loss_sum, float(len(rows))), "prm_accuracy": (correct, float(len(rows)))}
        if learn:
            # The norm of the all-reduced gradient, the same on every rank: (norm, 1) per rank averages to it.
            stats["prm_grad_norm"] = (self._step_prm(), 1.0)
            if args.prm_update == "before":  # double forward: score again with the updated PRM
                for first in range(0, len(rows), micro):
                    index = torch.tensor(rows[first : first + micro], device=input_ids.device)
                    ratios[index] = self._prm_log_ratios(
                        input_ids[index], attention_mask[index], scored[index], start, width, grad=False
                    )
        return args.prm_beta * ratios, stats

    def _step_prm(self) -> float:
        params = [p for p in self.prm.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.accelerator.num_processes > 1:  # sum of the per-process shares of the global mean
            flat = torch.cat([p.grad.flatten() for p in params])
            torch.distributed.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.prm_max_grad_norm)
        self.prm_optimizer.step()
        self.prm_optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _sum_across_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    # --- the advantages -----------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards_per_func  # every process's completions: whole groups
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._gathered_rewards = self._gathered_rewards, None
        if not self.model.training:  # evaluation: GRPO's outputs (no PRM update on eval prompts)
            return output
        if rewards_per_func is None:
            raise RuntimeError("PrimeGRPOTrainer: GRPOTrainer scored completions without `_calculate_rewards`.")
        args, k = self.args, self.num_generations
        # Outcome: the reward_weights-weighted sum; a completion no reward function scored counts as wrong.
        outcome = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        if args.accuracy_filter:
            keep_groups = accuracy_band(outcome, k, args.accuracy_low, args.accuracy_high)
        else:
            keep_groups = torch.ones(len(outcome) // k, dtype=torch.bool, device=outcome.device)
        keep = keep_groups.repeat_interleave(k)
        local = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * local  # the slice GRPOTrainer keeps on this process
        local_slice = slice(start, start + local)
        if self.prm is None:
            token_rewards, stats = torch.zeros_like(output["completion_mask"], dtype=torch.float32), {}
        else:
            token_rewards, stats = self._score_and_update_prm(output, keep[local_slice], outcome[local_slice])
        mask = output["completion_mask"].bool() & keep[local_slice, None]
        all_rewards = self.accelerator.gather(self.accelerator.pad_across_processes(token_rewards, dim=1))
        all_mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask.int(), dim=1)).bool()
        advantages = self._advantages(all_rewards, all_mask, outcome)
        self._log_prime_metrics(outcome, keep_groups, all_rewards, all_mask, advantages, stats)
        output["advantages"] = advantages[local_slice, : mask.shape[1]].to(output["completion_mask"].device).float()
        self._replace_logged_advantages(advantages, all_mask)
        return output

    def _advantages(self, token_rewards: torch.Tensor, mask: torch.Tensor, outcome: torch.Tensor) -> torch.Tensor:
        if int(mask.sum()) < 2:  # every prompt filtered out (or one token left): nothing to learn from this batch
            return torch.zeros_like(token_rewards)
        if self.args.process_reward_norm == "batch_norm":
            token_rewards = batch_norm_process_rewards(token_rewards, mask)
        return prime_advantages(
            token_rewards, mask, outcome, self.num_generations, mode=self.args.prime_mode, gamma=self.args.prime_gamma
        )

    def _replace_logged_advantages(self, advantages: torch.Tensor, mask: torch.Tensor) -> None:
        """Show each completion's first-token advantage (its whole return) in the completions table."""
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        first = torch.where(mask.any(-1), advantages[:, 0], torch.zeros_like(advantages[:, 0]))
        logged.extend(first.tolist())

    def _log_prime_metrics(self, outcome, keep_groups, token_rewards, mask, advantages, stats) -> None:
        metrics = self._metrics["train"]
        metrics["prime/outcome_accuracy"].append(outcome.mean().item())
        metrics["prime/filtered_frac"].append(1.0 - keep_groups.double().mean().item())
        valid = int(mask.sum())
        if valid:
            metrics["prime/process_reward_mean"].append((token_rewards[mask].sum() / valid).item())
            metrics["prime/advantage_abs_mean"].append((advantages[mask].abs().sum() / valid).item())
        for name, (total, count) in stats.items():
            total, count = self._sum_across_processes(total), self._sum_across_processes(count)
            if count > 0 and math.isfinite(total):
                metrics[f"prime/{name}"].append(total / count)

    # --- checkpoints --------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_prm(folder, with_optimizer=True)

    def _save_prm(self, folder: str, with_optimizer: bool = False) -> None:
        if self.prm is None or not self.args.should_save:
            return
        self.prm.save_pretrained(os.path.join(folder, PRM_DIR))
        if with_optimizer:
            torch.save(self.prm_optimizer.state_dict(), os.path.join(folder, PRM_DIR, PRM_OPTIMIZER_FILE))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # the final save; checkpoints write the PRM in `_save_checkpoint`
            self._save_prm(output_dir or self.args.output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.prm is None:
            return
        folder = os.path.join(checkpoint, PRM_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{checkpoint} holds no {PRM_DIR}/: it was not written by PrimeGRPOTrainer")
        self._load_prm_weights(folder)
        optimizer = os.path.join(folder, PRM_OPTIMIZER_FILE)
        if os.path.isfile(optimizer):
            self.prm_optimizer.load_state_dict(torch.load(optimizer, map_location=self.accelerator.device))
        logger.info("restored the PRM and its optimizer from %s", folder)

    def _load_prm_weights(self, folder: str) -> None:
        from safetensors.torch import load_file

        if is_peft_model(self.prm):
            from peft import set_peft_model_state_dict

            weights = load_file(os.path.join(folder, "adapter_model.safetensors"), device=str(self.accelerator.device))
            set_peft_model_state_dict(self.prm, weights)
            return
        from transformers.modeling_utils import load_sharded_checkpoint

        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            missing, unexpected = self.prm.load_state_dict(load_file(single, device="cpu"), strict=False)
            # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is a broken checkpoint.
            if unexpected or any("lm_head" not in key for key in missing):
                raise RuntimeError(f"{single} does not match the PRM: missing {missing}, unexpected {unexpected}")
        else:
            load_sharded_checkpoint(self.prm, folder)
