"""The update-based prediction g·Δθ and its decomposition (own pair, other pairs, momentum, weight decay), checked
against closed forms on SGD and Adam steps; and `EntanglementCallback` on TRL's own DPOTrainer, without subclassing."""

import math

import pytest
import torch
from datasets import Dataset

from tests.test_margin_trainer import _pairs, _parameters, _records, _trainer


PARTS = ("own", "other_pairs", "momentum", "weight_decay")


@pytest.fixture(scope="module")
def pairs():
    return Dataset.from_list(_pairs(16))


def _close(a, b, rel=1e-4, abs_=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _parts_sum(record, side):
    return sum(record[f"update_{part}_{side}"] for part in PARTS)


def test_sgd_own_term_is_the_papers_prediction_scaled_by_the_step(tiny_model_dir, pairs, cpu_args):
    """Plain SGD, B=2 pairs per micro-batch, 2 accumulation steps, no clipping: Δθ = −η Σ_j ∇ℓ_j/(B·GA), so a pair's
    own term is η/(B·GA) times the paper's per-unit-step prediction, and the four parts add up to g·Δθ."""
    lr = 1e-2
    trainer = _trainer(
        tiny_model_dir,
        pairs,
        cpu_args,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        learning_rate=lr,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        entanglement_steps=1,
        entanglement_pairs=2,
    )
    trainer.train()
    records = _records(trainer)
    assert len(records) == 4
    for record in records:
        assert record["update_decomposition"] == "SGD" and record["clip_scale"] == 1.0
        for side in ("chosen", "rejected"):
            assert _close(record[f"update_own_{side}"], lr / 4 * record[f"pred_delta_{side}"])
            assert _close(_parts_sum(record, side), record[f"predicted_update_{side}"], rel=1e-3, abs_=1e-7)
            # Only float32 rounding of θ_after − θ_before remains (SGD without momentum has none).
            assert abs(record[f"update_momentum_{side}"]) < 1e-4 * abs(record[f"predicted_update_{side}"])
            assert record[f"update_weight_decay_{side}"] == 0.0
            # The other pairs of the batch (the second micro-batch included) move this pair too.
            assert record[f"update_other_pairs_{side}"] != 0.0


def test_adamw_first_step_with_clipping_and_weight_decay(tiny_model_dir, pairs, cpu_args):
    """AdamW, one pair per step, clipping active, weight decay: at step 1 there is no momentum and no other pair, so
    g·Δθ = own + weight decay, with the clipping factor and Adam's preconditioner in the own term; from step 2 the
    momentum term appears. The sign of g·Δθ matches the measured change."""
    trainer = _trainer(
        tiny_model_dir,
        pairs,
        cpu_args,
        lr_scheduler_type="constant",
        learning_rate=1e-4,  # Adam moves every coordinate by ~lr: keep the step in the first-order regime
        weight_decay=0.1,
        max_grad_norm=1e-3,
        per_device_train_batch_size=1,
        max_steps=3,
        entanglement_steps=1,
        entanglement_pairs=1,
    )
    trainer.train()
    records = _records(trainer)
    first, later = records[0], records[1:]
    assert first["update_decomposition"] == "AdamW" and 0 < first["clip_scale"] < 1
    for side in ("chosen", "rejected"):
        assert abs(first[f"update_other_pairs_{side}"]) < 1e-4 * abs(first[f"update_own_{side}"])
        assert abs(first[f"update_momentum_{side}"]) < 1e-4 * abs(first[f"update_own_{side}"])
        assert first[f"update_weight_decay_{side}"] != 0.0
        assert _close(_parts_sum(first, side), first[f"predicted_update_{side}"], rel=1e-3)
    assert all(abs(r["update_momentum_chosen"]) > 0 for r in later)
    scored = [r[f"update_sign_correct_{s}"] for r in records for s in ("chosen", "rejected")]
    assert all(scored) and len(scored) == 6


def test_update_prediction_gets_the_sign_where_the_pairwise_one_fails(tiny_model_dir, pairs, cpu_args):
    """AdamW on 4 pairs per step: the paper's pairwise prediction ignores the other pairs and Adam's rescaling; the
    prediction from the real Δθ is first order in the step that was taken and gets >= 95% of the signs."""
    trainer = _trainer(
        tiny_model_dir,
        pairs,
        cpu_args,
        learning_rate=5e-4,
        per_device_train_batch_size=4,
        max_steps=6,
        entanglement_steps=1,
        entanglement_pairs=4,
    )
    trainer.train()
    records = _records(trainer)
    update = [r[f"update_sign_correct_{s}"] for r in records for s in ("chosen", "rejected")]
    update = [u for u in update if u is not None]
    assert len(update) >= 40
    assert sum(update) / len(update) >= 0.95
    metrics = [e for e in trainer.state.log_history if "entanglement/update_sign_accuracy" in e]
    assert metrics and all(0 <= e["entanglement/update_sign_accuracy"] <= 1 for e in metrics)


def _trl_trainer(tiny_model_dir, pairs, cpu_args, **config):
    return _trainer(tiny_model_dir, pairs, cpu_args, trl=True, peft=True, **config)


def test_callback_on_trl_dpo_trainer(tiny_model_dir, pairs, cpu_args, tmp_path):
    """A plain trl.DPOTrainer (LoRA) with EntanglementCallback: records with DPO's closed-form coefficients (at step 1
    the policy is the reference, so d_w = d_l = β/2), the update's decomposition, and bit-identical parameters to
    the same training without the callback."""
    from align.diagnostics.entanglement import EntanglementCallback

    common = dict(max_steps=3, learning_rate=1e-3, per_device_train_batch_size=2, beta=0.1)
    plain = _trl_trainer(tiny_model_dir, pairs, cpu_args, **common)
    plain.train()
    watched = _trl_trainer(tiny_model_dir, pairs, {**cpu_args, "output_dir": str(tmp_path / "watched")}, **common)
    watched.add_callback(EntanglementCallback(watched, every=1, pairs=2))
    watched.train()
    before, after = _parameters(plain), _parameters(watched)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    records = _records(watched)
    assert [r["step"] for r in records] == [1, 1, 2, 2, 3, 3]
    assert all(r["coefficients"] == "loss" and r["margin_loss"] == "dpo" for r in records)
    for record in records[:2]:
        assert _close(record["d_chosen"], 0.05, rel=1e-4) and _close(record["d_rejected"], 0.05, rel=1e-4)
        assert _close(record["loss"], math.log(2), rel=1e-4)
    for record in records:
        assert record["update_decomposition"] == "AdamW"
        assert _close(_parts_sum(record, "chosen"), record["predicted_update_chosen"], rel=1e-3, abs_=1e-7)
    assert any("entanglement/update_sign_accuracy" in entry for entry in watched.state.log_history)


def test_callback_refuses_what_it_cannot_diagnose(tiny_model_dir, pairs, cpu_args):
    from align.diagnostics.entanglement import EntanglementCallback

    mixed = _trl_trainer(tiny_model_dir, pairs, cpu_args, loss_type=["sigmoid", "sft"], max_steps=1)
    with pytest.raises(ValueError, match="assume_equal_coefficients=True"):
        EntanglementCallback(mixed)
    EntanglementCallback(mixed, assume_equal_coefficients=True)  # the update-based prediction needs no coefficients
    margin = _trainer(tiny_model_dir, pairs, cpu_args, max_steps=1)
    with pytest.raises(ValueError, match="entanglement_steps"):
        EntanglementCallback(margin)

    class KTOTrainer:
        """Stands in for trl.KTOTrainer: the refusal reads only the class name."""

    from align.diagnostics.entanglement.callback import trl_margin_loss

    with pytest.raises(ValueError, match="no pair margin"):
        trl_margin_loss(KTOTrainer(), assume_equal=False)
    with pytest.raises(ValueError, match="every=0"):
        EntanglementCallback(mixed, every=0)
