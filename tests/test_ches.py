"""`align.diagnostics.ches` and `align diagnose pairs`: CHES against sums computed by hand, zero for identical
responses, independent of batching and padding, TRL's own tokenization, the command end to end, and bad rows."""

import json

import pytest
import torch

from align.diagnostics.ches import (
    ches_from_batch,
    preference_collator,
    score_preference_dataset,
    tokenize_like_dpo,
)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setenv("ALIGN_DEBUG", "0")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny random Llama (eval mode, float32), its tokenizer, and the same model with a LoRA adapter whose B
    matrices are non-zero (so the adapter changes the hidden states)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import build_lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), build_lora_config(lora_r=4, lora_alpha=8, lora_dropout=0)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return {"model": model, "lora": lora.eval(), "tokenizer": tokenizer}


def _rows(style: str, num: int = 4) -> list[dict]:
    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows

    rows = preference_rows(generate_problems(num, "train", [1, 2], 0), style=style)
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]


def _batch(tokenizer, rows, max_length=None):
    return preference_collator(tokenizer, max_length)(tokenize_like_dpo(tokenizer, rows))


def _head_inputs(model, ids: list[int]) -> torch.Tensor:
    """What the LM head multiplies at every position of one unpadded sequence (full logits, no slicing)."""
    captured = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0][0].double()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return captured[0]


def _by_hand(model, tokenized: list[dict]):
    """CHES, ln-CHES and ‖S⁺‖² of each pair from one unpadded forward per response: S = Σ_{k=1}^{|y|} h_{x,y<k},
    the LM head's inputs at positions |x| − 1 .. |x| + |y| − 2."""
    ches, ln_ches, scale = [], [], []
    for row in tokenized:
        prompt = row["prompt_ids"]
        sums = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = prompt + row[side]
            hidden = _head_inputs(model, ids)
            sums.append((hidden[len(prompt) - 1 : len(ids) - 1].sum(0), len(row[side])))
        (s_w, n_w), (s_l, n_l) = sums
        ches.append(s_w @ s_l - s_w @ s_w)
        ln_ches.append((s_w / n_w) @ (s_l / n_l) - (s_w / n_w) @ (s_w / n_w))
        scale.append(s_w @ s_w)
    return torch.stack(ches), torch.stack(ln_ches), torch.stack(scale)


@pytest.mark.parametrize(("which", "style"), [("model", "plain"), ("model", "chat"), ("lora", "chat")])
def test_ches_equals_the_sums_of_hidden_states_by_hand(tiny, which, style):
    model, tokenizer = tiny[which], tiny["tokenizer"]
    rows = _rows(style)
    tokenized = tokenize_like_dpo(tokenizer, rows)
    ches, ln_ches = ches_from_batch(model, preference_collator(tokenizer)(tokenized))
    assert ches.dtype == ln_ches.dtype == torch.float64 and ches.shape == ln_ches.shape == (len(rows),)
    expected, expected_ln, scale = _by_hand(model, tokenized)
    # CHES is a difference of two numbers of size ‖S⁺‖²: compare relative to that size
    assert torch.allclose(ches, expected, rtol=0, atol=1e-5 * float(scale.max()))
    lengths = torch.tensor([len(r["chosen_ids"]) for r in tokenized], dtype=torch.float64)
    assert torch.allclose(ln_ches, expected_ln, rtol=0, atol=1e-5 * float((scale / lengths**2).max()))
    # Not trivially zero: the pairs differ (a single pair's CHES may legitimately be close to 0).
    assert ches.abs().max() > 1e-3 * scale.min()


def test_identical_responses_have_zero_ches(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    rows = [{**row, "rejected": row["chosen"]} for row in _rows("chat", 3)]
    tokenized = tokenize_like_dpo(tokenizer, rows)
    model.train()  # scored in eval mode, and the caller's mode is given back
    ches, ln_ches = ches_from_batch(model, preference_collator(tokenizer)(tokenized))
    assert model.training
    model.eval()
    _, _, scale = _by_hand(model, tokenized[:1])
    assert ches.abs().max() <= 1e-6 * float(scale[0]) and ln_ches.abs().max() <= 1e-6 * float(scale[0])


def test_scores_do_not_depend_on_batching_or_padding(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    rows = _rows("chat", 5)
    together = score_preference_dataset(model, tokenizer, rows, batch_size=5)
    alone = score_preference_dataset(model, tokenizer, rows, batch_size=1)
    reversed_rows = score_preference_dataset(model, tokenizer, rows[::-1], batch_size=2)[::-1]
    # a short pair padded next to the longest one: right padding must not move its score
    assert len({r["chosen_tokens"] for r in together}) > 1
    for a, b, c in zip(together, alone, reversed_rows):
        size = max(abs(a["ches"]), 1.0)
        assert a["ches"] == pytest.approx(b["ches"], abs=1e-5 * size) == pytest.approx(c["ches"], abs=1e-5 * size)
        assert a["ln_ches"] == pytest.approx(b["ln_ches"], abs=1e-5 * max(abs(a["ln_ches"]), 1.0))
        assert a["chosen_tokens"] == b["chosen_tokens"] == c["chosen_tokens"]
    assert [r["index"] for r in together] == list(range(5))


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_tokens_are_the_ones_a_trl_dpo_trainer_collates(tiny_model_dir, tiny, cpu_args, style):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = _rows(style, 3)
    max_length = 80  # cuts some responses (keep_start), never a whole one
    trainer = DPOTrainer(
        model=tiny_model_dir,
        args=DPOConfig(**cpu_args, max_length=max_length),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = _batch(tiny["tokenizer"], rows, max_length)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert int(ours["attention_mask"].sum(1).max()) == max_length  # truncation was exercised
    records = score_preference_dataset(tiny["model"], tiny["tokenizer"], rows, max_length=max_length)
    completion = theirs["completion_mask"].sum(1)
    assert [r["chosen_tokens"] for r in records] == completion[: len(rows)].tolist()
    assert [r["rejected_tokens"] for r in records] == completion[len(rows) :].tolist()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_diagnose_pairs_writes_ranked_scores_and_a_summary(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from align.cli import main

    rows = [{"id": f"p{i}", **row} for i, row in enumerate(_rows("plain", 5))]
    dataset = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    output = tmp_path / "out" / "scores.jsonl"
    argv = ["diagnose", "pairs", "--model", tiny_model_dir, "--dataset", dataset, "--batch-size", "2"]
    assert main([*argv, "--output", str(output), "--top", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["rank"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["ches"] for r in records] == sorted((r["ches"] for r in records), reverse=True)
    assert sorted(r["index"] for r in records) == list(range(5))
    assert all(r["id"] == f"p{r['index']}" for r in records)
    assert set(records[0]) == {"rank", "index", "id", "ches", "ln_ches", "chosen_tokens", "rejected_tokens"}
    assert summary["count"] == 5 and summary["top_indices"] == [r["index"] for r in records[:3]]
    assert summary["mean_ches"] == pytest.approx(sum(r["ches"] for r in records) / 5)
    assert summary["output"] == str(output)

    monkeypatch.chdir(tmp_path)  # default output: <dataset stem>_ches.jsonl here; `synthetic` the recipe's pairs
    assert main([*argv, "--limit", "2"]) == 0 and len((tmp_path / "pairs_ches.jsonl").read_text().splitlines()) == 2
    assert main(["diagnose", "pairs", "--model", tiny_model_dir, "--dataset", "synthetic", "--limit", "2"]) == 0
    synthetic = [json.loads(line) for line in (tmp_path / "synthetic_ches.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in synthetic) == [0, 1] and all("id" in r for r in synthetic)


@pytest.mark.parametrize(
    ("edit", "row", "field", "why"),
    [
        (lambda row: row.pop("rejected"), 1, "rejected", "is missing"),
        (lambda row: row.update(chosen="  "), 1, "chosen", "is empty"),
        (lambda row: row.update(prompt=None), 1, "prompt", "is missing"),
    ],
)
def test_a_bad_row_is_one_line_naming_row_and_field(tiny_model_dir, tmp_path, capsys, edit, row, field, why):
    from align.cli import main

    rows = _rows("plain", 3)
    edit(rows[row])
    dataset = _write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["diagnose", "pairs", "--model", tiny_model_dir, "--dataset", dataset]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in captured.err
    assert message.startswith("align diagnose pairs: ")
    assert f"row {row}, field '{field}'" in message and why in message and "drop the row" in message
    assert not (tmp_path / "bad_ches.jsonl").exists()


def test_a_missing_file_or_bad_option_exits_2(tmp_path, capsys):
    from align.cli import main

    assert main(["diagnose", "pairs", "--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["diagnose", "pairs", "--dataset", "synthetic", "--batch-size", "0"]) == 2


def test_library_errors_name_the_row(tiny):
    from align.errors import InputError

    rows = _rows("chat", 2)
    rows[1]["chosen"] = [{"role": "assistant", "content": ""}]
    with pytest.raises(InputError, match=r"my pairs: row 1, field 'chosen'.*is empty"):
        score_preference_dataset(tiny["model"], tiny["tokenizer"], rows, source="my pairs")
    with pytest.raises(InputError, match=r"row 0, field 'prompt'.*fills max_length=4"):
        score_preference_dataset(tiny["model"], tiny["tokenizer"], _rows("chat", 1), max_length=4)


def test_refuses_a_model_whose_last_hidden_state_is_not_the_lm_head_input(tiny_model_dir, tiny):
    """Some architectures leave hidden_states[-1] before the final norm; scoring it would not be the paper's h."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_last_hidden_states = False  # hidden_states[-1]: the last layer's output, before the norm
    with pytest.raises(ValueError, match="is not the input of its LM head"):
        ches_from_batch(model, _batch(tiny["tokenizer"], _rows("chat", 1)))
