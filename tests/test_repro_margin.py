"""`align repro margin`: the margin proving ground end to end on the tiny model (with a stand-in CHES scorer), its
resume, measurements that equal the trainer's own tokens and log-probs, the statistics and verdicts on numbers made
to be shown / not shown / refuted, the CHES skip, and the command's errors."""

import json
import shutil
import sys
import types

import numpy as np
import pytest

from align.cli import main as align_main
from align.experiments import margin_measure
from align.experiments.margin_report import compute_results, write_report
from align.experiments.margin_stats import average_ranks, sign_agreement, spearman, verdict


@pytest.fixture
def fake_ches(monkeypatch):
    """A stand-in `align.diagnostics.ches` (the real one is another module's job): CHES = row index, in reverse."""
    calls = []

    def score_preference_dataset(model, processing_class, dataset, batch_size=8, max_length=None):
        calls.append(len(dataset))
        rows = [{"index": i, "ches": float(i), "ln_ches": float(i) / 10} for i in range(len(dataset))]
        return rows[::-1]  # any order: the experiment sorts by index

    module = types.ModuleType("align.diagnostics.ches")
    module.score_preference_dataset = score_preference_dataset
    monkeypatch.setitem(sys.modules, "align.diagnostics.ches", module)
    return calls


def test_margin_proving_ground_on_tiny_model(tiny_model_dir, tmp_path, fake_ches, monkeypatch, capsys):
    out = tmp_path / "margin"
    argv = ["repro", "margin", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]
    assert align_main(argv) == 0
    first = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    names = {"dpo-s0", "dpo_normalized-s0", "simpo-s0"}
    for split in ("train", "test"):
        assert set(results["summaries"][split]) == names
        assert set(results["differences"][split]) == {"dpo_normalized-s0 - dpo-s0", "simpo-s0 - dpo-s0"}
        assert set(results["verdicts"][split]["0"]) == {"a1", "a2", "a", "b"}
        assert set(results["verdicts"][split]["0"].values()) <= {"shown", "not shown", "refuted"}
        for row in results["summaries"][split].values():
            assert row["chosen_fell"]["low"] <= row["chosen_fell"]["mean"] <= row["chosen_fell"]["high"]
    # every arm moved the log-probs (lr 5e-4 in --quick), and the paired difference is the difference of the means
    summary, difference = results["summaries"]["train"], results["differences"]["train"]
    assert all(abs(summary[name]["delta_chosen"]["mean"]) > 1e-4 for name in names)
    expected = summary["dpo_normalized-s0"]["margin"]["mean"] - summary["dpo-s0"]["margin"]["mean"]
    assert difference["dpo_normalized-s0 - dpo-s0"]["margin"]["diff"] == pytest.approx(expected, abs=1e-9)
    # each run kept its entanglement records; QUICK diagnoses both steps on 2 pairs
    for name in names:
        assert (out / "train" / name / "entanglement.jsonl").is_file()
        agreement = results["sign_agreement"][name]
        assert agreement["records"] == 4 and agreement["sign_correct_chosen"]["n"] > 0
    assert not list((out / "train").glob("*/checkpoint-*"))
    # CHES once on the 8 training pairs, cached; ρ of CHES = index against DPO's Δw, with its interval
    assert fake_ches == [8] and (out / "ches" / "train.json").is_file()
    rho = results["ches"]["0"]["ches"]
    assert rho["n"] == 8 and rho["low"] <= rho["high"] and -1 <= rho["rho"] <= 1
    report = (out / "report.md").read_text()
    for heading in ("## Verdicts", "## Paired differences, held-out pairs", "sign agreement", "CHES ρ"):
        assert heading in report
    assert (out / "repro-margin.png").stat().st_size > 0 and "stage times (s)" in first

    # a rerun redoes nothing: every run is found finished, every measurement and CHES cached
    def no_forward(*args, **kwargs):
        raise AssertionError("a cached measurement was recomputed")

    measure_log_probs = margin_measure.sequence_log_probs
    monkeypatch.setattr(margin_measure, "sequence_log_probs", no_forward)
    assert align_main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3 and fake_ches == [8]
    assert json.loads((out / "results.json").read_text())["summaries"] == results["summaries"]

    # a run that is gone (or never finished) is trained again, and measured again though its old measurement is kept
    monkeypatch.setattr(margin_measure, "sequence_log_probs", measure_log_probs)
    shutil.rmtree(out / "train" / "simpo-s0")
    assert align_main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2
    stamp = json.loads((out / "measure" / "simpo-s0.json").read_text())["adapter_stamp"]
    assert stamp[1] == (out / "train" / "simpo-s0" / "adapter_model.safetensors").stat().st_mtime_ns

    # another configuration in the same directory: one line, no traceback
    assert align_main([*argv, "--num-train", "12"]) != 0
    err = capsys.readouterr().err
    assert "holds results of a different configuration" in err and "num_train" in err and "Traceback" not in err


def test_measurements_are_the_trainers_tokens_and_log_probs(tiny_model_dir, tmp_path, cpu_args):
    """tokenize_pair = DPOTrainer's tokenized dataset; sequence_log_probs at the start = the trainer's reference."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.experiments.margin import QUICK, build_pairs
    from align.models import build_lora_config
    from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

    rows = build_pairs(QUICK)["train"][:4]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = MarginPreferenceConfig(**{**cpu_args, "max_length": 80, "per_device_train_batch_size": 4})
    trainer = MarginPreferenceTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=build_lora_config(lora_dropout=0.0),
    )
    for row, tokenized in zip(rows, trainer.train_dataset):
        ours = margin_measure.tokenize_pair(tokenizer, row)
        assert ours == (tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"])
    # the collator cuts at max_length 80, inside the completions (prompts are 54-55 tokens)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    reference_chosen, reference_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    measured = margin_measure.sequence_log_probs(model, tokenizer, rows, max_length=80, batch_size=3)
    assert [m["logp_chosen"] for m in measured] == pytest.approx(reference_chosen.tolist(), abs=1e-4)
    assert [m["logp_rejected"] for m in measured] == pytest.approx(reference_rejected.tolist(), abs=1e-4)
    chosen_lengths = batch["completion_mask"][:4].sum(dim=1).tolist()
    assert [m["len_chosen"] for m in measured] == chosen_lengths


def _measurements(delta_w, delta_l, length=10):
    return [
        {"logp_chosen": -50.0 + w, "logp_rejected": -60.0 + lo, "len_chosen": length, "len_rejected": length}
        for w, lo in zip(delta_w, delta_l)
    ]


def test_verdicts_on_numbers_made_to_be_shown_not_shown_and_refuted(tmp_path):
    rng = np.random.default_rng(0)
    n = 64
    noise = lambda: rng.normal(0, 1, n)  # noqa: E731
    start = {"train": _measurements(np.zeros(n), np.zeros(n)), "test": _measurements(np.zeros(n), np.zeros(n))}
    base_w, base_l = -1.0 + 0.1 * noise(), -3.0 + 0.1 * noise()
    cases = {
        # seed 0: normalized keeps the chosen up (shown) and the same margin within noise (no loss shown)
        0: (base_w + 2.0, base_l + 2.0 + 0.05 * noise()),
        # seed 1: normalized is the same as dpo up to symmetric noise: nothing shown either way
        1: (base_w + 0.3 * noise(), base_l + 0.3 * noise()),
        # seed 2: normalized lowers the chosen further and loses margin: both refuted
        2: (base_w - 1.0, base_l + 1.0),
    }
    after = {}
    for seed, (w, lo) in cases.items():
        for name, (dw, dl) in {"dpo": (base_w, base_l), "dpo_normalized": (w, lo), "simpo": (base_w, base_l)}.items():
            after[f"{name}-s{seed}"] = {"train": _measurements(dw, dl), "test": _measurements(dw, dl)}
    config = {"model": "m", "seeds": [0, 1, 2], "num_train": n, "num_test": n, "steps": 16, "batch_size": 4,
              "learning_rate": 5e-5, "warmup_steps": 2, "max_length": 256, "arms": {}}  # fmt: skip
    results = compute_results(config=config, start=start, after=after, entanglement={}, ches={"skipped": "x"},
                              timings={})  # fmt: skip
    train = results["verdicts"]["train"]
    assert train["0"] == {"a1": "shown", "a2": "shown", "a": "shown", "b": "not shown"}
    assert train["1"]["a2"] == "not shown" and train["1"]["a"] == "not shown" and train["1"]["b"] == "not shown"
    assert train["1"]["a1"] in ("not shown", "shown")  # the fraction can move by chance; Δw is noise around 0
    assert train["2"] == {"a1": "not shown", "a2": "refuted", "a": "refuted", "b": "refuted"}  # dpo's fell already
    dpo = results["summaries"]["train"]["dpo-s0"]
    assert dpo["chosen_fell"]["mean"] == 1.0 and dpo["reward_correct"]["mean"] == 1.0
    assert dpo["margin"]["mean"] == pytest.approx(float(np.mean(base_w - base_l)), abs=1e-9)
    assert dpo["ln_margin"]["mean"] == pytest.approx(float(np.mean(base_w - base_l)) / 10, abs=1e-9)
    write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "seed 2, training pairs: (a) refuted, (b) refuted" in report and "lost margin" in report
    assert "chosen kept from falling (a): shown in 1 of 3 seeds" in report and "Not computed: x" in report


def test_verdict_sign_agreement_and_spearman_helpers():
    assert verdict(0.1, 0.5, +1) == "shown" and verdict(-0.5, -0.1, +1) == "refuted"
    assert (
        verdict(-0.5, -0.1, -1) == "shown"
        and verdict(-0.1, 0.1, -1) == "not shown"
        and verdict(0.0, 1, 1) == ("not shown")
    )
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks(np.array([[2.0, 2.0, 1.0], [1.0, 2.0, 3.0]])).tolist() == [[2.5, 2.5, 1.0], [1, 2, 3]]
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert spearman(x, [10, 9, 8, 7, 6, 5])["rho"] == pytest.approx(-1.0)
    # ranks of y: [1, 3, 2, 4, 5, 6]: ρ = 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/210
    result = spearman(x, [0.1, 0.5, 0.3, 0.7, 0.8, 0.9], resamples=500)
    assert result["rho"] == pytest.approx(1 - 12 / 210) and result["low"] <= result["high"]
    records = [
        {
            "sign_correct_chosen": True,
            "update_sign_correct_chosen": None,
            "update_own_chosen": 0.5,
            "delta_chosen": -1,
        },
        {"sign_correct_chosen": False, "update_sign_correct_chosen": True, "delta_chosen": 0.2},
        {"sign_correct_chosen": True, "delta_chosen": 1e-6},  # an older record: no update-based fields
    ]
    agreement = sign_agreement(records)
    assert agreement["sign_correct_chosen"] == {"n": 3, "frac_correct": pytest.approx(2 / 3)}
    assert agreement["update_sign_correct_chosen"] == {"n": 1, "frac_correct": 1.0}
    assert agreement["update_sign_correct_rejected"] == {"n": 0, "frac_correct": None}
    assert agreement["update_own_chosen"] == {"n": 1, "mean": 0.5}
    assert agreement["frac_measured_chosen_fell"] == pytest.approx(1 / 3)


def test_ches_stage_skips_with_a_message_when_the_module_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "align.diagnostics.ches", None)  # import raises ImportError
    path = tmp_path / "ches" / "train.json"
    result = margin_measure.ches_scores(path, "unused", [], max_length=16, batch_size=2)
    assert "align.diagnostics.ches is not importable" in result["skipped"] and not path.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "3"], "not options of `align repro margin`"),
        (["--learning-rate", "1e-4"], "not options of `align repro margin`"),
        (["--seeds", "-1"], "training seeds are integers >= 0"),
        (["--num-test", "0"], "sizes must be >= 1"),
        (["--levels", "6"], "levels in 1..5"),
    ],
)
def test_repro_margin_rejects_bad_arguments(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "margin", "--quick", "--output-dir", str(tmp_path / "x"), *flags])
    assert message in capsys.readouterr().err
