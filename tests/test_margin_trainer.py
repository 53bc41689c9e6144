"""MarginPreferenceTrainer on the tiny Llama: TRL equivalence, diagnostics that observe without changing the update,
first-order sign predictions against measured Δlog π, the normalized update, every loss, LoRA, GA, DDP, the recipe."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from align.losses.margin import MARGIN_LOSS_TABLE, MARGIN_LOSSES, REFERENCE_FREE_LOSSES


def _pairs(num, appended_tail=False):
    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows

    rows = preference_rows(generate_problems(num, "train", [1], 0))
    if appended_tail:
        # Rejected = chosen + a wrong continuation: the rejected sequence contains the whole chosen one, so their
        # log-prob gradients share almost everything (the paper's entangled case: DPO lowers the chosen log-prob).
        for row in rows:
            chosen = row["chosen"][0]["content"]
            row["rejected"] = [{"role": "assistant", "content": chosen + " Then 12 + 7 = 20, so the answer is 20."}]
    return rows


@pytest.fixture(scope="module")
def offline_pairs():
    from datasets import Dataset

    return Dataset.from_list(_pairs(16))


@pytest.fixture(scope="module")
def tail_pairs():
    from datasets import Dataset

    return Dataset.from_list(_pairs(16, appended_tail=True))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A second tiny Llama (other seed) used as an explicit reference, so policy != reference at step 0."""
    from align.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-ref"), seed=1)


def _trainer(model_dir, dataset, cpu_args, ref_dir=None, peft=False, trl=False, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

    fields = {**cpu_args, "per_device_train_batch_size": 2, "max_length": 256, "max_steps": 2, **config}
    peft_config = None
    if peft:
        from align.models import build_lora_config

        peft_config = build_lora_config(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir) if ref_dir else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if trl:
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(
            model=model_dir,
            ref_model=ref_model,
            args=DPOConfig(**fields),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    return MarginPreferenceTrainer(
        model=model_dir,
        ref_model=ref_model,
        args=MarginPreferenceConfig(**fields),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _first_batch(trainer, size=4):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(size)])
    return trainer._prepare_inputs(batch)


def _loss_metrics_grads(trainer, batch):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


@pytest.mark.parametrize(("margin_loss", "loss_type"), [("dpo", "sigmoid"), ("ipo", "ipo"), ("slic", "hinge")])
def test_matches_trl_loss_metrics_and_gradients(
    tiny_model_dir, reference_dir, offline_pairs, cpu_args, margin_loss, loss_type
):
    ours = _trainer(tiny_model_dir, offline_pairs, cpu_args, ref_dir=reference_dir, margin_loss=margin_loss, beta=0.1)
    trl = _trainer(tiny_model_dir, offline_pairs, cpu_args, ref_dir=reference_dir, trl=True, loss_type=[loss_type])
    loss, metrics, grads = _loss_metrics_grads(ours, _first_batch(ours))
    trl_loss, trl_metrics, trl_grads = _loss_metrics_grads(trl, _first_batch(trl))
    assert loss == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)
    assert abs(trl_metrics["rewards/margins"]) > 1e-3  # the reference differs from the policy: a real comparison
    assert set(metrics) == set(trl_metrics)
    for key in trl_metrics:
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-6), key
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-5, atol=1e-7)


def test_precomputed_reference_gives_the_same_loss(tiny_model_dir, reference_dir, offline_pairs, cpu_args):
    live = _trainer(tiny_model_dir, offline_pairs, cpu_args, ref_dir=reference_dir)
    cached = _trainer(
        tiny_model_dir, offline_pairs, cpu_args, ref_dir=reference_dir, precompute_ref_log_probs=True, max_steps=1
    )
    batch = _first_batch(cached)
    assert "ref_chosen_logps" in batch
    loss, metrics, _ = _loss_metrics_grads(live, _first_batch(live))
    cached_loss, cached_metrics, _ = _loss_metrics_grads(cached, batch)
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert cached_metrics["rewards/margins"] == pytest.approx(metrics["rewards/margins"], rel=1e-4, abs=1e-6)
    cached.train()


def _parameters(trainer):
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def test_diagnostics_do_not_change_the_update(tiny_model_dir, offline_pairs, cpu_args, tmp_path):
    """Same parameters after 3 AdamW steps (with gradient accumulation) with diagnostics on every step or off."""
    common = dict(max_steps=3, learning_rate=1e-3, gradient_accumulation_steps=2)
    plain = _trainer(tiny_model_dir, offline_pairs, cpu_args, **common)
    plain.train()
    watched = _trainer(
        tiny_model_dir,
        offline_pairs,
        {**cpu_args, "output_dir": str(tmp_path / "watched")},
        entanglement_steps=1,
        entanglement_pairs=2,
        **common,
    )
    watched.train()
    before, after = _parameters(plain), _parameters(watched)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    records = _records(watched)
    # One diagnostic per optimizer step (not per micro-batch), two pairs each.
    assert [r["step"] for r in records] == [1, 1, 2, 2, 3, 3]
    logged = [entry for entry in watched.state.log_history if "entanglement/cosine" in entry]
    assert len(logged) == 3


def _records(trainer):
    with open(os.path.join(trainer.args.output_dir, "entanglement.jsonl")) as handle:
        return [json.loads(line) for line in handle]


SGD = dict(optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=1)


@pytest.mark.parametrize(
    ("margin_loss", "beta", "entangled_regime"),
    [("dpo", 0.1, "both_down"), ("simpo", 2.0, "both_up")],
)
def test_predicted_signs_match_measured_changes(
    tiny_model_dir, tail_pairs, cpu_args, margin_loss, beta, entangled_regime
):
    """Plain SGD, one pair per step, small steps: the first-order prediction from (d_w, d_l) and the measured gradient
    geometry gets the sign of Δlog π right for >= 95% of responses, including in the entangled regime that these pairs
    produce (DPO: chosen and rejected both fall; SimPO, whose d_w/d_l = |y_l|/|y_w| < 1 here: both rise)."""
    trainer = _trainer(
        tiny_model_dir,
        tail_pairs,
        cpu_args,
        margin_loss=margin_loss,
        beta=beta,
        learning_rate=1e-2,
        max_steps=12,
        entanglement_steps=1,
        entanglement_pairs=1,
        **SGD,
    )
    trainer.train()
    records = _records(trainer)
    assert len(records) == 12
    outcomes = [r["sign_correct_chosen"] for r in records] + [r["sign_correct_rejected"] for r in records]
    assert all(o is not None for o in outcomes)
    assert sum(outcomes) / len(outcomes) >= 0.95
    assert sum(r["regime"] == entangled_regime for r in records) >= 9
    if margin_loss == "dpo":
        assert sum(r["delta_chosen"] < 0 for r in records) >= 9


@pytest.mark.parametrize("margin_loss", ["dpo", "simpo"])
def test_normalized_update_keeps_chosen_up_and_rejected_down(tiny_model_dir, tail_pairs, cpu_args, margin_loss):
    """The same entangled pairs with normalize_pair_gradients: no chosen log-prob falls and no rejected one rises."""
    trainer = _trainer(
        tiny_model_dir,
        tail_pairs,
        cpu_args,
        margin_loss=margin_loss,
        beta=0.1 if margin_loss == "dpo" else 2.0,
        learning_rate=1e-2,
        max_steps=8,
        entanglement_steps=1,
        entanglement_pairs=1,
        normalize_pair_gradients=True,
        **SGD,
    )
    trainer.train()
    records = _records(trainer)
    assert len(records) == 8
    assert all(r["coefficients"] == "normalized" and r["regime"] == "ideal" for r in records)
    assert all(r["delta_chosen"] > 0 for r in records)
    assert all(r["delta_rejected"] < 0 for r in records)


def test_normalized_update_is_the_per_pair_normalized_gradient(tiny_model_dir, offline_pairs, cpu_args):
    """The trainer's gradient equals Σ_i c_i(−g_w,i/‖g_w,i‖ + g_l,i/‖g_l,i‖)/B, built by brute force."""
    from align.losses.margin import margin_loss

    trainer = _trainer(tiny_model_dir, offline_pairs, cpu_args, ref_dir=None, normalize_pair_gradients=True)
    batch = _first_batch(trainer)
    _, _, grads = _loss_metrics_grads(trainer, batch)
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        ref = trainer.ref_model(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=labels, fused_lm_head=True
        )
        ref_logps = ref.log_probs.sum(1)
    logps = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
    ).log_probs.sum(1)
    lengths = batch["completion_mask"].sum(1)
    c = margin_loss(
        "dpo", *logps.chunk(2), *ref_logps.chunk(2), *lengths.chunk(2), trainer._margin_hparams
    ).pair_weight
    expected = [torch.zeros_like(p) for p in params]
    num_pairs = logps.size(0) // 2
    for i in range(num_pairs):
        g_w = torch.autograd.grad(logps[i], params, retain_graph=True)
        g_l = torch.autograd.grad(logps[i + num_pairs], params, retain_graph=True)
        norm_w = torch.sqrt(sum((g**2).sum() for g in g_w))
        norm_l = torch.sqrt(sum((g**2).sum() for g in g_l))
        for k in range(len(params)):
            expected[k] += c[i] * (-g_w[k] / norm_w + g_l[k] / norm_l) / num_pairs
    for name, e in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[name], e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("margin_loss", [*MARGIN_LOSSES, "trl"])
def test_trains_with_every_margin_loss(tiny_model_dir, offline_pairs, cpu_args, margin_loss):
    extra = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]} if margin_loss == "trl" else {}
    trainer = _trainer(
        tiny_model_dir,
        offline_pairs,
        cpu_args,
        margin_loss=margin_loss,
        learning_rate=1e-3,
        entanglement_steps=1,
        entanglement_pairs=1,
        **extra,
    )
    before = _parameters(trainer)
    trainer.train()
    after = _parameters(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    records = _records(trainer)
    assert len(records) == 2
    expected = "assumed_equal" if margin_loss == "trl" else "loss"
    assert {r["coefficients"] for r in records} == {expected}
    if margin_loss in REFERENCE_FREE_LOSSES:  # TRL's rewards are β·log π
        entry = trainer.state.log_history[0]
        assert entry["rewards/chosen"] == pytest.approx(trainer.args.beta * entry["logps/chosen"], rel=1e-4)


def test_lora_with_gradient_accumulation_and_normalized_update(tiny_model_dir, offline_pairs, cpu_args):
    trainer = _trainer(
        tiny_model_dir,
        offline_pairs,
        cpu_args,
        peft=True,
        max_steps=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        entanglement_steps=1,
        entanglement_pairs=2,
        normalize_pair_gradients=True,
    )
    assert trainer.ref_model is None  # TRL's LoRA reference: the adapter-disabled base
    selected = {id(p) for p in trainer._selected_params}
    lora = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert selected == lora
    before = _parameters(trainer)
    trainer.train()
    after = _parameters(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    records = _records(trainer)
    # One diagnostic per optimizer step (its first micro-batch). No sign assertion here: the normalized update's
    # guarantee is per pair under plain SGD, and this step is AdamW over 4 pairs.
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    assert all(r["coefficients"] == "normalized" for r in records)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"margin_loss": "kto"}, "margin_loss='kto' is not one of"),
        ({"loss_type": ["hinge"]}, "Set `margin_loss: trl`"),
        ({"ld_alpha": 0.5}, "ld_alpha=0.5 configures TRL's own DPO loss"),
        ({"beta": 0.0}, "beta=0.0 must be > 0"),
        ({"margin_loss": "simpo", "precompute_ref_log_probs": True}, "reference-free"),
        ({"entanglement_steps": -1}, "entanglement_steps=-1"),
        ({"entanglement_pairs": 0}, "entanglement_pairs=0"),
        ({"entanglement_params": "layers.(["}, "not a valid regular expression"),
        ({"margin_loss": "dpop", "normalize_pair_gradients": True}, "DPOP and CPO add a chosen-only term"),
        ({"margin_loss": "trl", "normalize_pair_gradients": True}, "margin_loss='trl'"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(cpu_args, fields, message):
    from align.trainers.margin import MarginPreferenceConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MarginPreferenceConfig(**cpu_args, **fields)


def test_config_choices_are_the_loss_table():
    """`margin_loss`'s choices and help come from `MARGIN_LOSS_TABLE` (plus TRL's own losses, `trl`)."""
    import dataclasses

    from align.trainers.margin import MarginPreferenceConfig

    (field,) = [f for f in dataclasses.fields(MarginPreferenceConfig) if f.name == "margin_loss"]
    assert field.metadata["choices"] == [*MARGIN_LOSS_TABLE, "trl"]
    assert all(name in field.metadata["help"] for name in MARGIN_LOSS_TABLE)


def test_parameter_regex_that_matches_nothing_is_an_error(tiny_model_dir, offline_pairs, cpu_args):
    with pytest.raises(ValueError, match="matches none of the"):
        _trainer(tiny_model_dir, offline_pairs, cpu_args, entanglement_steps=1, entanglement_params="no_such_layer")


def test_recipes_parse(tmp_path):
    from align import training as train

    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    for recipe, extra in [
        ("smollm2-135m-instruct/margin_dpo.yaml", []),
        ("smollm2-135m-instruct/margin_simpo.yaml", []),
        ("llama-3.1-8b-instruct/margin_dpo.yaml", ["--bf16", "false", "--use_cpu", "true"]),
        ("llama-3.1-8b-instruct/margin_simpo.yaml", ["--bf16", "false", "--use_cpu", "true"]),
    ]:
        parser = train.build_parser(train.METHODS["margin"])
        _, config, _ = parser.parse_args_and_config(["--config", os.path.join(root, recipe), *extra])
        assert config.margin_loss in {"dpo", "simpo"} and config.entanglement_steps > 0


_DDP_SCRIPT = """
import json, os, sys, torch
from datasets import Dataset
from transformers import AutoTokenizer
from align.data.synthetic import generate_problems
from align.data.training import preference_rows
from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

model_dir, output_dir = sys.argv[1], sys.argv[2]
rows = preference_rows(generate_problems(16, "train", [1], 0))
args = MarginPreferenceConfig(
    output_dir=output_dir, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False,
    save_strategy="no", max_steps=2, per_device_train_batch_size=2, max_length=256, learning_rate=1e-3,
    entanglement_steps=1, entanglement_pairs=1, normalize_pair_gradients=True, disable_tqdm=True,
    ddp_find_unused_parameters=False,
)
trainer = MarginPreferenceTrainer(
    model=model_dir, args=args, train_dataset=Dataset.from_list(rows),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
)
trainer.train()
model = trainer.accelerator.unwrap_model(trainer.model)
flat = torch.cat([p.detach().double().flatten() for _, p in sorted(model.named_parameters())])
gathered = [torch.zeros_like(flat) for _ in range(2)]
torch.distributed.all_gather(gathered, flat)
if trainer.accelerator.is_main_process:
    print("RESULT " + json.dumps({"world": trainer.accelerator.num_processes,
                                   "max_param_diff": float((gathered[0] - gathered[1]).abs().max())}), flush=True)
# End together and skip interpreter teardown, as `align` does: tearing down gloo/DDP state at exit aborts a rank
# ("terminate called without an active exception") now and then without trainer.end(), and every time with it.
from align.cli import exit_without_teardown
trainer.accelerator.wait_for_everyone()
exit_without_teardown()
"""


@pytest.mark.distributed
def test_ddp_gathers_every_rank_pairs(tiny_model_dir, tmp_path):
    """Two CPU processes (gloo): each rank diagnoses its own pairs, rank 0 writes both; parameters stay in sync."""
    script = tmp_path / "ddp_margin.py"
    script.write_text(_DDP_SCRIPT)
    output_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    with socket.socket() as probe:  # a free port: other test files may launch process groups at the same time
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run(
        [*command, str(script), tiny_model_dir, str(output_dir)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"world": 2, "max_param_diff": 0.0}
    records = [json.loads(line) for line in (output_dir / "entanglement.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["rank"]) for r in records) == [(1, 0), (1, 1), (2, 0), (2, 1)]


@pytest.mark.slow
def test_smollm2_lora_steps_with_diagnostics(smollm2_path, cpu_args):
    """The embedded SmolLM2 with LoRA: two DPO steps with diagnostics and the normalized update on short pairs."""
    from datasets import Dataset

    rows = _pairs(4)
    trainer = _trainer(
        smollm2_path,
        Dataset.from_list(rows),
        cpu_args,
        peft=True,
        max_length=160,
        learning_rate=1e-4,
        entanglement_steps=1,
        entanglement_pairs=1,
        normalize_pair_gradients=True,
    )
    trainer.train()
    records = _records(trainer)
    assert len(records) == 2
    assert all(r["norm_chosen_sq"] > 0 and r["cosine"] is not None for r in records)
