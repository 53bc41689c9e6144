"""Training-step checks of the GPU kit: each of align's trainers against the TRL trainer it extends, on the same
model, rows, batch size and seed (benchmarks.gpu.measure.timed_rounds gives the paired ratios).

- `sft_vs_dco`: TRL's SFTTrainer vs DCOTrainer (pass_n 16), T-token rows, full fine-tuning or LoRA r=16;
- `dpo_vs_margin`: TRL's DPOTrainer (sigmoid) vs MarginPreferenceTrainer (`margin_loss: dpo`) without
  diagnostics, and with the entanglement diagnostics on every step (4 pairs over the LoRA weights); the figure
  for the recipes' one diagnosed step in 10 is derived from the two;
- `prm_training`: ImplicitPRMTrainer `ce` vs TRL's KTOTrainer (`kto`) on labelled rows, `dpo` vs DPOTrainer
  (sigmoid) on pairs;
- `attention_entropy`: SFTTrainer with sdpa vs SFT with entropy-regularized attention (align's method registry
  composes it in), batch 1 of T tokens, non-reentrant gradient checkpointing in both (what long context needs).
"""

from __future__ import annotations

from dataclasses import fields

from benchmarks.common import lora_config
from benchmarks.gpu.kit import LLAMA_8B_8_LAYERS, QWEN2_1_5B, Kit, first_batches, long_problems
from benchmarks.gpu.measure import timed_rounds, training_step_fn


def _sft_rows(kit: Kit, count: int, tokens: int):
    from datasets import Dataset

    from align.data.training import sft_rows

    return Dataset.from_list(sft_rows(long_problems(kit.tokenizer(), count, tokens)))


def sft_vs_dco(kit: Kit, lora: bool, shape=QWEN2_1_5B) -> dict:
    from trl import SFTConfig, SFTTrainer

    from align.trainers.dco import DCOConfig, DCOTrainer

    sizes = kit.sizes
    path = kit.model(shape)
    data = _sft_rows(kit, 2 * sizes.batch, sizes.seq_len)
    common = kit.trainer_args(
        f"sft_dco_{shape.name}_{lora}",
        per_device_train_batch_size=sizes.batch,
        max_length=sizes.seq_len,
        learning_rate=1e-5,
    )
    sft = SFTTrainer(model=path, args=SFTConfig(**common), train_dataset=data, peft_config=lora_config(lora))
    dco = DCOTrainer(
        model=path, args=DCOConfig(pass_n=16, **common), train_dataset=data, peft_config=lora_config(lora)
    )
    batches = first_batches(dco, 2)  # DCO's collator: the batches both trainers step on
    variants = {"trl_sft": training_step_fn(kit, sft, batches), "dco": training_step_fn(kit, dco, batches)}
    result = timed_rounds(kit, variants, "trl_sft", sizes.rounds)
    return {
        "model": kit.describe_model(shape),
        "setting": f"{'LoRA r=16' if lora else 'full FT'}, batch {sizes.batch} x T={sizes.seq_len}",
        **result,
    }


def sft_vs_dco_llama(kit: Kit) -> dict:
    """LoRA: two full fine-tuning trainers of 2.8 B parameters would hold ~90 GB of float32 weights and AdamW state."""
    return sft_vs_dco(kit, lora=True, shape=LLAMA_8B_8_LAYERS)


def dpo_vs_margin(kit: Kit) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from align.data.training import preference_rows
    from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

    sizes = kit.sizes
    path = kit.model()
    problems = long_problems(kit.tokenizer(), 2 * sizes.pairs, int(0.8 * sizes.pair_len))
    data = Dataset.from_list(preference_rows(problems))
    common = dict(per_device_train_batch_size=sizes.pairs, max_length=sizes.pair_len, learning_rate=1e-5)
    variants = {
        "trl_dpo": (DPOTrainer, DPOConfig, {"loss_type": ["sigmoid"]}),
        "margin_dpo": (MarginPreferenceTrainer, MarginPreferenceConfig, {"margin_loss": "dpo"}),
        "margin_dpo_diagnosed": (
            MarginPreferenceTrainer,
            MarginPreferenceConfig,
            {"margin_loss": "dpo", "entanglement_steps": 1, "entanglement_pairs": 4},
        ),
    }
    steps = {}
    for name, (trainer_cls, config_cls, extra) in variants.items():
        args = config_cls(**kit.trainer_args(f"dpo_{name}", **common, **extra))
        trainer = trainer_cls(model=path, args=args, train_dataset=data, peft_config=lora_config())
        steps[name] = training_step_fn(kit, trainer, first_batches(trainer, 2))
    result = timed_rounds(kit, steps, "trl_dpo", sizes.rounds)
    ratios = result["ratios"]
    # The recipes diagnose one step in 10: nine plain steps and one diagnosed step, per ten.
    ratios["margin_dpo_diagnostics_1_in_10"] = round(
        0.9 * ratios["margin_dpo"] + 0.1 * ratios["margin_dpo_diagnosed"], 3
    )
    return {
        "model": kit.describe_model(),
        "setting": f"LoRA r=16, {sizes.pairs} pairs x max_length {sizes.pair_len}",
        **result,
    }


def prm_training(kit: Kit) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from align.data.training import outcome_rows, preference_rows
    from align.trainers.implicit_prm import ImplicitPRMConfig, ImplicitPRMTrainer

    sizes = kit.sizes
    path = kit.model()
    problems = long_problems(kit.tokenizer(), 2 * sizes.pairs, int(0.8 * sizes.pair_len))
    outcome, pairs = Dataset.from_list(outcome_rows(problems)), Dataset.from_list(preference_rows(problems))
    common = dict(per_device_train_batch_size=sizes.pairs, max_length=sizes.pair_len, learning_rate=1e-5, beta=0.05)

    def step(name, trainer_cls, config_cls, data, **extra):
        args = config_cls(**kit.trainer_args(f"prm_{name}", **common, **extra))
        trainer = trainer_cls(model=path, args=args, train_dataset=data, peft_config=lora_config())
        return training_step_fn(kit, trainer, first_batches(trainer, 2))

    comparisons = {
        "ce_vs_kto": (
            step("kto", KTOTrainer, KTOConfig, outcome, loss_type="kto"),
            step("ce", ImplicitPRMTrainer, ImplicitPRMConfig, outcome, objective="ce"),
        ),
        "dpo_vs_dpo_sigmoid": (
            step("dpo_sigmoid", DPOTrainer, DPOConfig, pairs, loss_type=["sigmoid"]),
            step("dpo", ImplicitPRMTrainer, ImplicitPRMConfig, pairs, objective="dpo"),
        ),
    }
    merged = {"ratios": {}, "step_s": {}, "tokens_per_s": {}, "peak_mib": {}}
    for name, (baseline, ours) in comparisons.items():
        result = timed_rounds(kit, {"trl": baseline, "implicit_prm": ours}, "trl", sizes.rounds)
        merged["ratios"][name] = result["ratios"]["implicit_prm"]
        for key in ("step_s", "tokens_per_s", "peak_mib"):
            merged[key].update({f"{name}:{variant}": value for variant, value in result[key].items()})
        merged["memory"], merged["rounds"] = result["memory"], result["rounds"]
    return {
        "model": kit.describe_model(),
        "setting": f"LoRA r=16, batch {sizes.pairs}, max_length {sizes.pair_len}, beta 0.05",
        "baseline": "KTOTrainer (kto) / DPOTrainer (sigmoid)",
        **merged,
    }


def attention_entropy(kit: Kit, length: int) -> dict:
    from trl import SFTConfig, SFTTrainer

    from align.training import METHODS, method_classes

    path = kit.model()
    data = _sft_rows(kit, 2, length)
    common = dict(
        per_device_train_batch_size=1,
        max_length=length,
        learning_rate=1e-5,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer_cls, config_cls = method_classes(METHODS["sft"])
    entropy_fields = {"attention_entropy_coef": 1e-3}
    # The fused kernel is another change's; where this align has the field, the kit asks for the fused path.
    has_kernel_field = "attention_entropy_kernel" in {f.name for f in fields(config_cls)}
    if has_kernel_field:
        entropy_fields["attention_entropy_kernel"] = "fused"
    sdpa = SFTTrainer(
        model=path,
        args=SFTConfig(
            **kit.trainer_args(f"sdpa_{length}", **common, model_init_kwargs={"attn_implementation": "sdpa"})
        ),
        train_dataset=data,
    )
    regularized = trainer_cls(
        model=path,
        args=config_cls(**kit.trainer_args(f"entropy_{length}", **common, **entropy_fields)),
        train_dataset=data,
    )
    policy = regularized.model
    batches = first_batches(sdpa, 2)
    variants = {"sdpa": training_step_fn(kit, sdpa, batches), "entropy": training_step_fn(kit, regularized, batches)}
    result = timed_rounds(kit, variants, "sdpa", kit.sizes.rounds)
    return {
        "model": kit.describe_model(),
        "setting": f"full FT, batch 1 x T={length}, gradient checkpointing, lambda 1e-3",
        "kernel": entropy_fields.get("attention_entropy_kernel", "eager"),
        "attn_implementation": policy.config._attn_implementation,
        **result,
    }
