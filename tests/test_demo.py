"""`align demo` end to end (quick sizes), its resumability, and the greedy-confidence diagnostic it relies on."""

import json
import math

import pytest
import torch

from align.cli import main as align_main


def test_demo_quick_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| cross-entropy |" in report and "| DCO (N'=16) |" in report and "| base |" in report
    assert (out / "passk.png").stat().st_size > 0
    for name in ("base", "sft", "dco"):
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        assert summary["num_problems"] == 4 and summary["n"] == 4
    # The two fine-tuned runs trained for the same steps from the same recipes, differing only in the loss.
    sft_state = json.loads((out / "train" / "sft" / "trainer_state.json").read_text())
    dco_state = json.loads((out / "train" / "dco" / "trainer_state.json").read_text())
    assert sft_state["global_step"] == dco_state["global_step"] == 2

    # A rerun reuses every stage: no training, no generation.
    import align.evaluation.runs as runs
    import align.training as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished training run was redone"))
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: pytest.fail("finished evaluations were regenerated"))
    assert align_main(["demo", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]) == 0


def test_demo_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--output-dir", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    for method in ("sft", "dco"):
        assert f"align train {method} --config " in plan and f"smollm2-135m-instruct/{method}.yaml" in plan
    assert str(out) in plan and not out.exists()


def test_greedy_confidence_equals_teacher_forced_probability(tiny_model_dir):
    from align.diagnostics.confidence import greedy_confidence
    from align.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    prompts = ["What is 1 + 1?", "Compute $3 \\times 4 + 5$. Please reason step by step."]
    results = greedy_confidence(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    for prompt, result in zip(prompts, results):
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        completion_ids = torch.tensor([result["token_ids"]])
        assert completion_ids.shape[1] == result["num_tokens"] > 0
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        with torch.no_grad():
            logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[0, :, None]).sum().item()
        assert result["logp"] == pytest.approx(logp, abs=1e-4)
        assert result["prob"] == pytest.approx(math.exp(logp), rel=1e-4)
        assert 0.0 <= result["prob"] <= 1.0


@pytest.mark.slow
def test_demo_quick_with_smollm2(tmp_path):
    """What CI runs: the quick demo with the embedded SmolLM2-135M-Instruct."""
    out = tmp_path / "demo"
    assert align_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "passk.png").exists()
