"""`align.diagnostics.entanglement`: per-pair gradient geometry against brute force, parameter selection, records,
summaries, resuming, and the `align diagnose entanglement` plot."""

import json
from types import SimpleNamespace

import pytest
import torch

from align.diagnostics.entanglement import (
    EntanglementMonitor,
    PairGeometry,
    pair_geometry,
    read_records,
    regime,
    select_parameters,
    summarize,
)
from align.diagnostics.entanglement.prediction import first_order_prediction, measurement, update_coefficients


@pytest.fixture(scope="module")
def preference_batch_and_models(tiny_model_dir):
    """A right-padded [chosen; rejected] batch from TRL's collator, and the tiny model with and without LoRA, both
    with TRL's fused LM head (built by a DPOTrainer, the same way the margin trainer gets them)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows
    from align.models import build_lora_config

    dataset = Dataset.from_list(preference_rows(generate_problems(6, "train", [1, 2], 0)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {}
    for name, peft_config in [("full", None), ("lora", build_lora_config(lora_r=4, lora_alpha=8, lora_dropout=0.0))]:
        args = DPOConfig(
            output_dir="unused",
            report_to="none",
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            max_length=256,
        )
        trainer = DPOTrainer(
            model=tiny_model_dir, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
        if peft_config is not None:  # LoRA B starts at zero; give it values so its gradients are not degenerate
            with torch.no_grad():
                for n, p in trainer.model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
        models[name] = trainer.model
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    return batch, models


def _brute_force(model, batch, params):
    """Plain logits of the whole padded batch, log-softmax, one `torch.autograd.grad` per response."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    token_logps = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    logps = (token_logps * batch["completion_mask"][:, 1:]).sum(1)
    num_pairs = logps.size(0) // 2
    rows = []
    for i in range(num_pairs):
        g_w = torch.cat([g.flatten() for g in torch.autograd.grad(logps[i], params, retain_graph=True)]).double()
        g_l = torch.cat([g.flatten() for g in torch.autograd.grad(logps[i + num_pairs], params, retain_graph=True)])
        g_l = g_l.double()
        rows.append((logps[i].item(), logps[i + num_pairs].item(), g_w @ g_l, g_w @ g_w, g_l @ g_l))
    return rows


@pytest.mark.parametrize(
    ("which", "spec"), [("full", "trainable"), ("lora", "trainable"), ("full", r"layers\.1\.mlp")]
)
def test_pair_geometry_equals_brute_force(preference_batch_and_models, which, spec):
    batch, models = preference_batch_and_models
    model = models[which]
    selected = select_parameters(model, spec)
    if which == "lora":
        assert selected and all("lora_" in name for name, _ in selected)
    if spec != "trainable":
        assert len(selected) == 3 and all(".layers.1.mlp." in name for name, _ in selected)
    params = [p for _, p in selected]
    geometry = pair_geometry(model, batch, range(3), params)
    for i, (logp_w, logp_l, inner, norm_w, norm_l) in enumerate(_brute_force(model, batch, params)):
        assert geometry.logp_chosen[i].item() == pytest.approx(logp_w, rel=1e-5)
        assert geometry.logp_rejected[i].item() == pytest.approx(logp_l, rel=1e-5)
        assert geometry.inner[i].item() == pytest.approx(inner.item(), rel=1e-4)
        assert geometry.chosen_norm_sq[i].item() == pytest.approx(norm_w.item(), rel=1e-4)
        assert geometry.rejected_norm_sq[i].item() == pytest.approx(norm_l.item(), rel=1e-4)
    assert all(p.grad is None for p in params)  # nothing accumulated: the update cannot see the diagnostics


def test_select_parameters_errors_name_the_problem(preference_batch_and_models):
    _, models = preference_batch_and_models
    with pytest.raises(ValueError, match="matches none of the .* trainable parameters"):
        select_parameters(models["full"], "does_not_exist")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(frozen, "trainable")


def test_regimes_from_predicted_signs():
    assert regime(1.0, -1.0) == "ideal"
    assert regime(1.0, 1.0) == "both_up"
    assert regime(-1.0, -1.0) == "both_down"
    assert regime(-1.0, 1.0) == "inverted"
    assert regime(0.0, 0.0) == "inactive"


def _geometry(inner, norm_w, norm_l):
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return PairGeometry(t([-1.0] * len(inner)), t([-2.0] * len(inner)), t(inner), t(norm_w), t(norm_l))


def test_update_coefficients_name_their_source():
    """The sampled pairs' (d_w, d_l): the loss's, the normalized update's c/‖g‖, or assumed equal for TRL's loss."""
    geometry = _geometry([1.0, 0.0], [4.0, 9.0], [1.0, 0.0])
    d_chosen, d_rejected = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6])
    source, d_w, d_l = update_coefficients([0, 2], geometry, d_chosen, d_rejected)
    assert source == "loss" and d_w.tolist() == pytest.approx([0.1, 0.3]) and d_l.tolist() == pytest.approx([0.4, 0.6])
    source, d_w, d_l = update_coefficients([0, 2], geometry, d_chosen, d_rejected, torch.tensor([2.0, 0.0, 3.0]))
    assert source == "normalized" and d_w.tolist() == [1.0, 1.0] and d_l.tolist() == [2.0, 0.0]  # ‖g_l‖ = 0: 0
    source, d_w, d_l = update_coefficients([1], geometry)
    assert source == "assumed_equal" and d_w.tolist() == d_l.tolist() == [1.0]


def test_first_order_prediction_and_measurement():
    """Δlog π_w = d_w‖g_w‖² − d_l⟨g_w,g_l⟩ = 4 − 3, Δlog π_l = d_w⟨g_w,g_l⟩ − d_l‖g_l‖² = 3 − 2 (both up); a zero
    norm gives no cosine or ratio, and a response with no predicted change no sign to check."""
    geometry = _geometry([3.0, 0.0], [4.0, 0.0], [2.0, 1.0])
    ones = torch.ones(2, dtype=torch.float64)
    entangled, no_chosen_gradient = first_order_prediction(geometry, ones, ones)
    assert entangled["pred_delta_chosen"] == 1.0 and entangled["pred_delta_rejected"] == 1.0
    assert entangled["regime"] == "both_up" and entangled["condition_ratio"] == 1.5
    assert entangled["cosine"] == pytest.approx(3 / 8**0.5)
    assert no_chosen_gradient["cosine"] is None and no_chosen_gradient["condition_ratio"] is None
    measured = measurement(entangled, before=(-10.0, -12.0), after=(-10.5, -11.0))
    assert measured["delta_chosen"] == -0.5 and measured["delta_rejected"] == 1.0
    assert measured["measured_regime"] == "inverted"
    assert measured["sign_correct_chosen"] is False and measured["sign_correct_rejected"] is True
    no_prediction = {"pred_delta_chosen": 0.0, "pred_delta_rejected": 0.0}
    assert measurement(no_prediction, (-1.0, -1.0), (-2.0, 0.0))["sign_correct_chosen"] is None


def test_cosine_and_condition_ratio_of_a_zero_gradient_are_0_with_finite_gradients():
    """0/0 for a zero gradient norm is defined as 0 (a zero vector is orthogonal to every vector), with a zero
    gradient there; elsewhere the closed forms cos = 3/√8 and ratio = 3/min(4, 2) = 1.5 and their derivatives."""
    from align.losses.margin import condition_ratio, cosine

    zero = torch.tensor(0.0)
    assert cosine(zero, zero, zero).item() == 0.0 and condition_ratio(zero, zero, zero).item() == 0.0
    inner = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    norm_w = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64, requires_grad=True)
    norm_l = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    cos, ratio = cosine(inner, norm_w, norm_l), condition_ratio(inner, norm_w, norm_l)
    assert cos.tolist() == pytest.approx([0.0, 0.0, 3 / 8**0.5]) and ratio.tolist() == pytest.approx([0.0, 0.0, 1.5])
    (cos.sum() + ratio.sum()).backward()
    for grad in (inner.grad, norm_w.grad, norm_l.grad):
        assert torch.isfinite(grad).all() and grad[:2].tolist() == [0.0, 0.0]
    # d cos/d inner = 1/(‖g_w‖‖g_l‖), d ratio/d inner = 1/‖g_l‖² (the smaller); d cos/d‖g_w‖² = −cos/(2‖g_w‖²),
    # d ratio/d‖g_w‖² = 0 (not the minimum), d ratio/d‖g_l‖² = −inner/‖g_l‖⁴.
    assert inner.grad[2].item() == pytest.approx(1 / 8**0.5 + 1 / 2)
    assert norm_w.grad[2].item() == pytest.approx(-3 / 8**0.5 / 8)
    assert norm_l.grad[2].item() == pytest.approx(-3 / 8**0.5 / 4 - 3 / 4)


def _record(step, regime_name, delta_w, delta_l, correct_w=True, correct_l=True, ratio=0.5):
    return {
        "step": step,
        "regime": regime_name,
        "inner": 1.0,
        "cosine": 0.5,
        "condition_ratio": ratio,
        "norm_chosen_sq": 4.0,
        "norm_rejected_sq": 1.0,
        "delta_chosen": delta_w,
        "delta_rejected": delta_l,
        "sign_correct_chosen": correct_w,
        "sign_correct_rejected": correct_l,
        "logp_chosen": -10.0,
        "logp_rejected": -11.0,
    }


def test_sign_is_not_scored_below_the_resolution():
    from align.diagnostics.entanglement.prediction import SIGN_RESOLUTION_NATS, sign_correct

    assert sign_correct(0.5, 0.1) is True and sign_correct(-0.5, 0.1) is False
    assert sign_correct(0.5, SIGN_RESOLUTION_NATS / 2) is None and sign_correct(None, 0.1) is None


def test_summarize_counts_regimes_and_accuracy():
    records = [
        _record(1, "ideal", 0.1, -0.1),
        _record(1, "both_down", -0.1, -0.2, correct_w=False, ratio=1.5),
        _record(2, "both_up", 0.2, 0.1),
        _record(2, "inactive", 0.0, 0.0, correct_w=None, correct_l=None),
    ]
    m = summarize(records)
    assert m["entanglement/frac_ideal"] == pytest.approx(1 / 3)
    assert m["entanglement/frac_entangled"] == pytest.approx(2 / 3)
    assert m["entanglement/sign_accuracy"] == pytest.approx(5 / 6)
    assert m["entanglement/sign_accuracy_chosen"] == pytest.approx(2 / 3)
    assert m["entanglement/frac_chosen_down"] == pytest.approx(1 / 4)
    assert m["entanglement/grad_norm_chosen"] == pytest.approx(2.0)
    assert summarize([]) == {}


def test_read_records_reports_bad_lines(tmp_path):
    path = tmp_path / "entanglement.jsonl"
    path.write_text(json.dumps(_record(1, "ideal", 0.1, -0.1)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"entanglement.jsonl:2: not a JSON line"):
        read_records(str(path))
    path.write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match=r":1: missing fields \['delta_chosen', 'delta_rejected', 'regime'\]"):
        read_records(str(path))


def test_start_run_empties_a_fresh_run_and_trims_a_resumed_one(tmp_path):
    accelerator = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1)
    monitor = EntanglementMonitor([], num_pairs=1, every=1, output_dir=str(tmp_path), accelerator=accelerator)
    lines = [json.dumps(_record(step, "ideal", 0.1, -0.1)) for step in (1, 2, 3, 4)]
    (tmp_path / "entanglement.jsonl").write_text("\n".join(lines) + "\n")
    monitor.start_run(global_step=2)  # resumed from checkpoint-2: steps 3 and 4 will be measured again
    assert [r["step"] for r in read_records(monitor.path)] == [1, 2]
    monitor.start_run(global_step=0)
    assert read_records(monitor.path) == []


def test_monitor_samples_each_step_once_and_deterministically():
    accelerator = SimpleNamespace(is_main_process=True, process_index=1, num_processes=2)
    monitor = EntanglementMonitor([], num_pairs=3, every=5, output_dir="unused", accelerator=accelerator, seed=7)
    assert monitor.due(0) and monitor.due(10) and not monitor.due(3)
    assert monitor.sample_pairs(8, step=10) == monitor.sample_pairs(8, step=10)
    assert len(monitor.sample_pairs(8, step=10)) == 3 and monitor.sample_pairs(2, step=10) == [0, 1]


def test_diagnose_command_writes_a_plot(tmp_path, capsys):
    from align.commands.diagnose import main as diagnose

    path = tmp_path / "run" / "entanglement.jsonl"
    path.parent.mkdir()
    records = [_record(s, r, 0.1 * s, -0.1, ratio=0.9 + 0.05 * s) for s in (1, 3, 5) for r in ("ideal", "both_down")]
    for record in records[2:]:  # the update-based prediction and its split (records of runs before it lack them)
        for side, value in (("chosen", 0.1), ("rejected", -0.1)):
            record[f"predicted_update_{side}"] = value
            record[f"update_sign_correct_{side}"] = True
            for part, share in (("own", 0.6), ("other_pairs", -0.2), ("momentum", 0.5), ("weight_decay", 0.1)):
                record[f"update_{part}_{side}"] = share * value
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert diagnose(["entanglement", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    png = tmp_path / "run" / "entanglement.png"
    assert summary["plot"] == str(png) and summary["records"] == 6 and summary["steps"] == 3
    assert summary["frac_entangled"] == 0.5
    assert summary["update_sign_accuracy"] == 1.0 and summary["update_own_chosen"] == pytest.approx(0.06)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = tmp_path / "custom.png"
    assert diagnose(["entanglement", str(path), "--output", str(out)]) == 0 and out.exists()


def test_diagnose_command_explains_a_missing_file(tmp_path, capsys):
    from align.commands.diagnose import main as diagnose

    assert diagnose(["entanglement", str(tmp_path / "nope.jsonl")]) == 2
    assert "entanglement_steps" in capsys.readouterr().err
