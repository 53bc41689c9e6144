"""Scoring with an implicit PRM: steps -> tokens for several tokenizers, exact zeros at initialization, padding
invariance, agreement with full-logit log-probs, LoRA references, errors."""

import math

import pytest
import torch

from align.data.prompts import render_prompt
from align.data.synthetic import corrupt_solution, generate_problems
from align.prm import ImplicitPRM, end_of_turn_text
from align.steps import assign_tokens_to_steps, segment_completion, step_char_spans


SOLUTION = "We add 45 and 23.\n\n$45 + 23 = 68$.\n\nThe answer is $\\boxed{68}$."
PROMPT = "Q: What is $45 + 23$?\nA: "


# ---------------------------------------------------------------- steps as character spans


def _texts(text, spans):
    return [text[s:e] for s, e in spans]


def test_separator_steps_keep_the_separator_with_the_step_it_ends():
    assert _texts(SOLUTION, step_char_spans(SOLUTION)) == [
        "We add 45 and 23.\n\n",
        "$45 + 23 = 68$.\n\n",
        "The answer is $\\boxed{68}$.",
    ]


def test_separator_runs_and_edges_make_no_empty_steps():
    text = "\n\nFirst.\n\n\n\nSecond.\n\n"
    assert _texts(text, step_char_spans(text)) == ["\n\nFirst.\n\n\n\n", "Second.\n\n"]
    assert step_char_spans("") == [(0, 0)]
    assert _texts("one step", step_char_spans("one step")) == ["one step"]
    assert _texts("a\nb", step_char_spans("a\nb", separator="\n")) == ["a\n", "b"]


def test_regex_steps_start_at_each_header():
    text = "Step 1: add. Step 2: check. Step 3: answer 7."
    spans = step_char_spans(text, pattern=r"(?=Step \d+:)")
    assert _texts(text, spans) == ["Step 1: add. ", "Step 2: check. ", "Step 3: answer 7."]


def test_tokens_belong_to_the_step_holding_their_last_character():
    steps = [(0, 5), (5, 9), (9, 12)]
    # token (3, 7) crosses into step 1 and ends there; a zero-width token at 9 goes to the step starting at 9
    tokens = [(0, 3), (3, 7), (7, 9), (9, 9), (9, 12)]
    assert assign_tokens_to_steps(tokens, steps) == [1, 3, 5]


# ---------------------------------------------------------------- steps -> tokens for several tokenizers


def _wordpiece():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        _corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]", "<|im_end|>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="<|im_end|>")


def _unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    special = ["<unk>", "<pad>", "<|im_end|>"]
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=special, unk_token="<unk>")
    tokenizer.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>")


def _merging_bpe():
    """A BPE without pre-tokenization: merges run across whitespace, so tokens like '.\\n\\nThe' cross steps."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _corpus()
    tokenizer = Tokenizer(models.BPE())
    alphabet = sorted(set("".join(corpus)))
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=260, special_tokens=["<pad>", "<|im_end|>"], initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>")


def _corpus():
    return [p.solution for p in generate_problems(200, "train", levels=[1, 2])] + [PROMPT] * 20


def _tiny_bpe():
    from align.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _check_step_token_mapping(tokenizer, exact: bool):
    """Token ranges partition the completion's tokens; each token lies in its step or ends in it (crossing a
    boundary); where no token crosses a boundary, the step's tokens cover exactly its text."""
    suffix = "<|im_end|>"
    seg = segment_completion(tokenizer, PROMPT, SOLUTION, suffix=suffix)
    text, spans = seg.text, seg.step_spans
    assert text == SOLUTION + suffix
    assert _texts(text, spans)[-1].endswith(suffix)
    bounds = [0, *seg.step_ends]
    assert bounds[-1] == len(seg.token_spans)
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    covered = set()
    for start, end in seg.token_spans:
        covered.update(range(start, end))
    crossing = 0
    for k, (step_start, step_end) in enumerate(spans):
        tokens = seg.token_spans[bounds[k] : bounds[k + 1]]
        for start, end in tokens:
            assert step_start <= max(end - 1, start) < step_end  # its last character is in this step
            crossing += start < step_start
        if not any(start < step_start for start, _ in tokens) and not any(
            start < step_end < end for start, end in seg.token_spans
        ):
            mine = set().union(*(set(range(s, e)) for s, e in tokens)) if tokens else set()
            assert mine == covered & set(range(step_start, step_end))
            if exact:
                assert "".join(text[s:e] for s, e in tokens) == text[step_start:step_end]
    return crossing


@pytest.mark.parametrize(
    ("build", "exact"), [(_tiny_bpe, True), (_wordpiece, False), (_unigram, False), (_merging_bpe, False)]
)
def test_step_spans_map_back_to_the_step_text(build, exact):
    tokenizer = build()
    crossing = _check_step_token_mapping(tokenizer, exact)
    if build is _merging_bpe:
        assert crossing > 0, "this tokenizer is here to merge tokens across step boundaries"


def test_explicit_step_offsets_and_their_validation(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seg = segment_completion(tokenizer, PROMPT, SOLUTION, step_ends=[6, len(SOLUTION)])
    assert _texts(seg.text, seg.step_spans) == ["We add", SOLUTION[6:]]
    for bad in ([0, 5], [5, 5], [8, 3], [len(SOLUTION) + 1]):
        with pytest.raises(ValueError, match="strictly increasing character offsets"):
            segment_completion(tokenizer, PROMPT, SOLUTION, step_ends=bad, index=3)


def test_end_of_turn_comes_from_the_chat_template_and_is_not_doubled(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert end_of_turn_text(tokenizer) == "<|im_end|>\n"
    tokenizer.chat_template = None
    assert end_of_turn_text(tokenizer) == "<|im_end|>"
    seg = segment_completion(tokenizer, PROMPT, SOLUTION + "<|im_end|>", suffix="<|im_end|>\n")
    assert seg.text == SOLUTION + "<|im_end|>\n"


def test_truncation_drops_the_steps_past_max_length(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = segment_completion(tokenizer, PROMPT, SOLUTION)
    cut = segment_completion(tokenizer, PROMPT, SOLUTION, max_length=full.completion_start + 5)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == full.completion_start + 5 and len(cut.step_spans) == 1


# ---------------------------------------------------------------- scoring with models


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny model as reference, and a perturbed copy as a 'trained' PRM (so log-ratios are non-zero)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.testing import perturbed_copy

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return perturbed_copy(tiny_model_dir), reference, tokenizer


def _examples(tokenizer, count=6):
    import random

    problems = generate_problems(count, "test", levels=[1, 2, 3])
    rng = random.Random(0)
    prompts = [render_prompt(p.problem, tokenizer) for p in problems]
    completions = [p.solution if i % 2 else corrupt_solution(p, rng)[0] for i, p in enumerate(problems)]
    completions[0] = completions[0] + "\n\nLet me double check the sum once more, carefully and slowly."
    return prompts, completions


def test_at_initialization_every_token_and_step_reward_is_zero(tiny_model_dir, models):
    from transformers import AutoModelForCausalLM

    _, reference, tokenizer = models
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts, completions = _examples(tokenizer)
    for result in ImplicitPRM(copy, tokenizer, ref_model=reference).score(prompts, completions):
        assert set(result.token_rewards) == {0.0} and set(result.step_rewards) == {0.0}
        assert result.score == 0.0 and result.outcome_reward == 0.0


def test_batched_scoring_equals_one_at_a_time(models):
    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer)
    scorer = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=4)
    batched = scorer.score(prompts, completions)
    for prompt, completion, together in zip(prompts, completions, batched):
        [alone] = scorer.score([prompt], [completion])
        assert alone.token_rewards == pytest.approx(together.token_rewards, abs=1e-5)
        assert alone.step_rewards == pytest.approx(together.step_rewards, abs=1e-5)
        assert alone.score == pytest.approx(together.score, abs=1e-5)
    assert len({len(r.token_rewards) for r in batched}) > 1  # the batch really mixed lengths


def test_token_rewards_match_full_logit_log_probs(models):
    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer, count=2)
    beta = 0.3
    results = ImplicitPRM(policy, tokenizer, ref_model=reference, beta=beta).score(prompts, completions)
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt + result.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logps = [torch.log_softmax(m(ids).logits[0, :-1].double(), -1) for m in (policy, reference)]
        targets = ids[0, 1:]
        per_token = [lp.gather(-1, targets[:, None])[:, 0] for lp in logps]
        expected = (beta * (per_token[0] - per_token[1]))[-len(result.token_rewards) :]
        assert result.token_rewards == pytest.approx(expected.tolist(), abs=1e-5)
        # the scored tokens are exactly the completion + end-of-turn text
        assert tokenizer.decode(ids[0, -len(result.token_rewards) :]) == result.text


def test_results_are_consistent_across_aggregates(models):
    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer)
    scorer = ImplicitPRM(policy, tokenizer, ref_model=reference)
    by = {how: scorer.score(prompts, completions, aggregate=how) for how in ("min", "mean", "last", "sum")}
    for i, result in enumerate(by["min"]):
        steps = result.step_rewards
        assert len(steps) == len(result.steps) == len(result.q_values) == len(result.step_token_spans) >= 3
        assert result.score == pytest.approx(min(steps))
        assert by["sum"][i].score == pytest.approx(result.outcome_reward, abs=1e-9)
        assert by["sum"][i].score == pytest.approx(sum(result.token_rewards), abs=1e-9)
        assert by["mean"][i].score == pytest.approx(sum(steps) / len(steps))
        assert by["last"][i].score == pytest.approx(steps[-1])
        assert result.q_values[-1] == pytest.approx(result.outcome_reward, abs=1e-9)
        assert "".join(result.steps) == result.text


def test_reference_free_scores_beta_log_pi(models):
    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer, count=2)
    free = ImplicitPRM(policy, tokenizer, reference_free=True, beta=0.1).score(prompts, completions)
    with_ref = ImplicitPRM(policy, tokenizer, ref_model=reference, beta=0.1).score(prompts, completions)
    ref_only = ImplicitPRM(reference, tokenizer, reference_free=True, beta=0.1).score(prompts, completions)
    for a, b, c in zip(free, with_ref, ref_only):
        assert all(x < 0 for x in a.token_rewards)  # β·log π of real tokens
        assert [x - y for x, y in zip(a.token_rewards, c.token_rewards)] == pytest.approx(b.token_rewards, abs=1e-5)


def test_lora_reference_is_the_adapter_disabled_base(tiny_model_dir, models):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align.models import build_lora_config

    _, reference, tokenizer = models
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, build_lora_config(lora_r=4, lora_dropout=0.0))
    prompts, completions = _examples(tokenizer, count=3)
    fresh = ImplicitPRM(peft_model, tokenizer).score(prompts, completions)
    assert all(set(r.token_rewards) == {0.0} for r in fresh)  # LoRA B = 0: policy == base
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    adapter_ref = ImplicitPRM(peft_model, tokenizer).score(prompts, completions)
    explicit_ref = ImplicitPRM(peft_model, tokenizer, ref_model=reference).score(prompts, completions)
    for a, b in zip(adapter_ref, explicit_ref):
        assert any(x != 0 for x in a.token_rewards)
        assert a.token_rewards == pytest.approx(b.token_rewards, abs=1e-5)


def _samples_of_few_prompts(tokenizer):
    """N completions per prompt, as a sampler gives them: 3 prompts x 4, one prompt with a single completion."""
    prompts, completions = _examples(tokenizer, count=6)
    grouped_prompts, grouped = [], []
    for index in range(3):
        for j in range(4):
            grouped_prompts.append(prompts[index])
            grouped.append(completions[(index + j) % len(completions)] + " ok" * j)
    return [*grouped_prompts, prompts[5]], [*grouped, completions[5]]


@pytest.mark.parametrize("lora", [False, True])
def test_completions_of_one_prompt_score_against_its_cache_as_if_reencoded(tiny_model_dir, models, lora):
    from peft import get_peft_model

    from align.models import build_lora_config

    policy, reference, tokenizer = models
    if lora:  # the reference is the same model with its adapter disabled: a cache per (model, adapter state)
        from transformers import AutoModelForCausalLM

        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), build_lora_config(lora_r=4))
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        reference = None
    prompts, completions = _samples_of_few_prompts(tokenizer)
    shared = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=3, share_prompt=True)
    plain = ImplicitPRM(policy, tokenizer, ref_model=reference, batch_size=3, share_prompt=False)
    # the plan: one cached group per prompt with several completions, batched longest first; the single one apart
    encoded = [shared._segment(p, c, None, i) for i, (p, c) in enumerate(zip(prompts, completions))]
    plan = shared._plan(encoded)
    assert [prefix is not None for prefix, _ in plan] == [True, True, True, False]
    assert [sorted(i for batch in batches for i in batch) for _, batches in plan[:3]] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    for _, batches in plan:
        lengths = [len(encoded[i].input_ids) for batch in batches for i in batch]
        assert lengths == sorted(lengths, reverse=True)
    assert [len(batches) for _, batches in plan] == [2, 2, 2, 1]
    for a, b in zip(shared.score(prompts, completions), plain.score(prompts, completions)):
        assert any(x != 0 for x in a.token_rewards)
        assert a.token_rewards == pytest.approx(b.token_rewards, abs=1e-5)
        assert a.step_rewards == pytest.approx(b.step_rewards, abs=1e-5)
        assert a.text == b.text and a.steps == b.steps


def test_from_pretrained_reads_settings_and_needs_a_reference_for_full_models(tmp_path, tiny_model_dir, models):
    import json

    policy, _, tokenizer = models
    policy.save_pretrained(tmp_path / "prm")
    tokenizer.save_pretrained(tmp_path / "prm")
    with pytest.raises(ValueError, match="full model"):
        ImplicitPRM.from_pretrained(str(tmp_path / "prm"))
    assert ImplicitPRM.from_pretrained(str(tmp_path / "prm"), reference_free=True).reference_free
    (tmp_path / "prm" / "implicit_prm.json").write_text(
        json.dumps({"beta": 0.2, "step_separator": "\n", "reference_model": tiny_model_dir})
    )
    scorer = ImplicitPRM.from_pretrained(str(tmp_path / "prm"))
    assert (scorer.beta, scorer.step_separator) == (0.2, "\n") and scorer.ref_model is not None
    assert ImplicitPRM.from_pretrained(str(tmp_path / "prm"), ref_model=tiny_model_dir, beta=1.0).beta == 1.0


def test_bad_inputs_fail_with_clear_errors(models):
    policy, reference, tokenizer = models
    with pytest.raises(ValueError, match="needs its reference model"):
        ImplicitPRM(policy, tokenizer)
    with pytest.raises(ValueError, match="do not pass ref_model"):
        ImplicitPRM(policy, tokenizer, ref_model=reference, reference_free=True)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ImplicitPRM(policy, tokenizer, ref_model=reference, beta=0)
    scorer = ImplicitPRM(policy, tokenizer, ref_model=reference)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="aggregate must be one of"):
        scorer.score(["a"], ["b"], aggregate="max")
    with pytest.raises(TypeError, match="completion 1: prompt and completion must be strings"):
        scorer.score(["a", "b"], ["c", [{"role": "assistant", "content": "d"}]])


def test_sigmoid_of_scores_is_a_probability(models):
    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer, count=2)
    for result in ImplicitPRM(policy, tokenizer, ref_model=reference).score(prompts, completions):
        assert math.isfinite(result.score) and 0 < 1 / (1 + math.exp(-result.score)) < 1


def test_the_harness_stores_the_scorers_scores_and_step_rewards(models):
    from align.evaluation.scoring import score_records

    policy, reference, tokenizer = models
    prompts, completions = _examples(tokenizer, count=4)
    records = [
        {"id": f"p{i}", "prompt": prompt, "samples": [{"completion": completion}, {"completion": completion[:20]}]}
        for i, (prompt, completion) in enumerate(zip(prompts, completions))
    ]
    scorer = ImplicitPRM(policy, tokenizer, ref_model=reference)
    assert score_records(records, scorer, aggregate="min", batch_size=3, progress=False) == 8
    for record, prompt in zip(records, prompts):
        for sample in record["samples"]:
            [direct] = scorer.score([prompt], [sample["completion"]])
            assert sample["score"] == pytest.approx(direct.score, abs=1e-6)
            assert sample["step_rewards"] == pytest.approx(direct.step_rewards, abs=1e-6)


@pytest.mark.slow
def test_smollm2_recipe_trains_a_prm_that_scores_with_its_own_tokenizer(smollm2_path, tmp_path):
    """SmolLM2's tokenizer maps steps back to their text; the CPU recipe trains (2 steps) a LoRA PRM that
    `ImplicitPRM.from_pretrained` loads with its adapter-disabled base as the reference."""
    from align.cli import main as align_main
    from align.models import load_tokenizer

    _check_step_token_mapping(load_tokenizer(smollm2_path), exact=True)
    output = tmp_path / "prm"
    overrides = ["--max_steps", "2", "--synthetic_num_train", "4", "--per_device_train_batch_size", "2"]
    overrides += [
        "--output_dir",
        str(output),
        "--save_strategy",
        "no",
        "--learning_rate",
        "1e-3",
        "--max_length",
        "256",
    ]
    recipe = "recipes/smollm2-135m-instruct/implicit_prm.yaml"
    assert align_main(["train", "prm", "--config", recipe, *overrides]) == 0
    assert (output / "adapter_config.json").is_file() and (output / "implicit_prm.json").is_file()
    scorer = ImplicitPRM.from_pretrained(str(output))
    assert scorer.suffix == "<|im_end|>\n" and scorer.beta == 0.05
    prompts = [render_prompt("What is $45 + 23$?", scorer.tokenizer)] * 2
    results = scorer.score(prompts, [SOLUTION, SOLUTION.replace("68", "69")])
    for result in results:
        assert [len(result.steps), len(result.step_rewards)] == [3, 3]
        assert any(value != 0 for value in result.token_rewards)
        assert result.score == pytest.approx(min(result.step_rewards))


def test_diagnose_steps_prints_each_steps_reward_and_marks_the_lowest(tmp_path, tiny_model_dir, models, capsys):
    import json

    from align.cli import main as align_main

    policy, _, tokenizer = models
    prm = tmp_path / "prm"
    policy.save_pretrained(prm)
    tokenizer.save_pretrained(prm)
    (prm / "implicit_prm.json").write_text(json.dumps({"beta": 0.05, "reference_model": tiny_model_dir}))
    prompts, completions = _examples(tokenizer, count=1)
    record = {"id": "p0", "answer": "1", "prompt": prompts[0], "samples": [{"completion": completions[0]}] * 2}
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(record) + "\n")
    args = ["diagnose", "steps", "--prm", str(prm), "--samples", str(samples), "--id", "p0", "--sample", "1"]
    assert align_main(args) == 0
    out = capsys.readouterr().out
    [expected] = ImplicitPRM.from_pretrained(str(prm)).score(prompts, completions)
    assert "sample 1: ungraded, score(min) = " in out and "sample 0" not in out
    assert out.count("<- lowest") == 1 and f"{min(expected.step_rewards):+.4f}" in out
    assert align_main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["step_rewards"] == pytest.approx(expected.step_rewards)
    with pytest.raises(SystemExit, match="no record with id 'missing'"):
        align_main(["diagnose", "steps", "--prm", str(prm), "--samples", str(samples), "--id", "missing"])
