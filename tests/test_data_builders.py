"""`align data coverage|pairs|outcome`: rows from graded samples, counts, and the trainer formats they feed."""

import json

import pytest

from align.cli import main
from align.configs import DataArguments
from align.data.sampled import coverage_rows, outcome_label_rows, pair_rows
from align.evaluation import runs
from tests.scripted_backend import ScriptedBackend, arithmetic_script


def record(pid: str, verdicts: list[str]) -> dict:
    return {
        "id": pid,
        "problem": f"Problem {pid}",
        "answer": "1",
        "samples": [{"completion": f"{pid}-{j}-{v}", "verdict": v} for j, v in enumerate(verdicts)],
    }


RECORDS = [
    record("mixed", ["correct", "incorrect", "correct", "no_answer"]),
    record("all_right", ["correct", "correct", "correct", "correct"]),
    record("all_wrong", ["incorrect", "no_answer", "incorrect", "timeout"]),
    record("unknown", ["timeout", "correct", "timeout", "timeout"]),
]


def test_coverage_rows_keep_correct_traces_with_their_p_hat():
    rows, counts = coverage_rows(RECORDS)
    assert [(r["id"], r["p_hat"]) for r in rows] == [("mixed", 0.5)] * 2 + [("all_right", 1.0)] * 4 + [
        ("unknown", 0.25)
    ]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "mixed-0-correct"}]
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["prompt"][0]["content"].startswith("Problem mixed")
    assert counts == {"problems": 4, "no_correct_sample": 1, "rows": 7}


def test_coverage_can_fall_back_to_the_reference_solution():
    rows, counts = coverage_rows(RECORDS, references={"all_wrong": "Reference.\n\n$\\boxed{1}$"})
    reference = [r for r in rows if r["id"] == "all_wrong"]
    assert len(reference) == 1 and reference[0]["p_hat"] == 0.0
    assert counts["reference_rows"] == 1
    _, counts = coverage_rows(RECORDS, references={"all_wrong": ""})
    assert counts["no_reference_solution"] == 1


def test_pairs_zip_correct_with_incorrect_traces_of_the_same_problem():
    rows, counts = pair_rows(RECORDS, style="plain")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("mixed-0-correct", "mixed-1-incorrect"),
        ("mixed-2-correct", "mixed-3-no_answer"),
    ]
    assert rows[0]["prompt"].startswith("Problem: Problem mixed")  # plain style: strings
    # "unknown" has one correct and three ungraded samples: nothing to reject, so it counts as all-correct
    assert counts["skipped_all_correct"] == 2 and counts["skipped_all_wrong"] == 1
    assert counts["samples_with_unknown_label"] == 4  # timeouts are neither chosen nor rejected


def test_outcome_rows_label_every_graded_trace():
    rows, counts = outcome_label_rows(RECORDS)
    assert len(rows) == 12 and counts["positive"] == 7 and counts["negative"] == 5
    assert counts["samples_with_unknown_label"] == 4
    assert all(isinstance(r["label"], bool) for r in rows)


@pytest.fixture
def scripted(monkeypatch):
    backends = []

    def factory(*args, **kwargs):
        backends.append(ScriptedBackend(arithmetic_script))
        return backends[-1]

    monkeypatch.setattr(runs, "get_backend", factory)
    return backends


def build(name: str, output, *extra) -> int:
    argv = ["data", name, "--model", "scripted", "--dataset", "synthetic", "--limit", "4", "--k", "4"]
    return main(
        [*argv, "--prompt_style", "plain", "--backend", "hf", "--progress", "false", "--output", str(output), *extra]
    )


def load_training_rows(kind: str, path):
    from align.data.training import build_datasets

    train, _ = build_datasets(kind, DataArguments(dataset_name=str(path), prompt_style="plain"), seed=0)
    return train


def test_builders_write_rows_the_trainers_take_as_is(tmp_path, scripted):
    assert build("coverage", tmp_path / "cov") == 0
    summary = json.loads((tmp_path / "cov" / "summary.json").read_text())
    assert summary["num_problems"] == 4 and summary["num_samples"] == 16 and summary["num_correct"] == 8
    assert summary["counts"] == {"problems": 4, "rows": 8} and summary["files"] == {"coverage.jsonl": 8}
    coverage = load_training_rows("sft", tmp_path / "cov" / "coverage.jsonl")
    assert set(coverage.column_names) >= {"prompt", "completion", "p_hat"} and set(coverage["p_hat"]) == {0.5}

    assert build("pairs", tmp_path / "pairs") == 0
    pairs = load_training_rows("preference", tmp_path / "pairs" / "pairs.jsonl")
    assert len(pairs) == 8 and "\\boxed" in pairs[0]["chosen"]

    assert build("outcome", tmp_path / "outcome", "--pairs") == 0
    outcome = load_training_rows("outcome", tmp_path / "outcome" / "outcome.jsonl")
    assert sorted(outcome["label"]) == [False] * 8 + [True] * 8
    assert (tmp_path / "outcome" / "pairs.jsonl").exists()


def test_a_builder_rerun_resumes_from_its_samples(tmp_path, scripted):
    assert build("outcome", tmp_path) == 0
    first = (tmp_path / "outcome.jsonl").read_text()
    assert build("outcome", tmp_path) == 0
    assert len(scripted) == 1  # the second run found every problem in samples.jsonl: no backend was built
    assert (tmp_path / "outcome.jsonl").read_text() == first


def test_builder_arguments_are_checked(tmp_path, capsys):
    assert main(["data", "pairs", "--k", "0", "--output", str(tmp_path)]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    assert main(["data", "pairs", "--k", "2"]) == 2
    assert "--output DIR" in capsys.readouterr().err


def test_plain_completions_continue_the_prompt_the_way_trl_joins_them(tiny_model_dir):
    """TRL tokenizes a plain row as the string `prompt + completion`, so the separator belongs to the completion: a
    reference solution follows "Solution:" after one space, as a model's own continuation does, and a sampled
    completion is used exactly as generated (another space would train on a double space). Chat completions are
    assistant turns, untouched."""
    from transformers import AutoTokenizer

    from align.data.prompts import render_prompt
    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows, sft_rows

    problem = generate_problems(1, "train", [1], 0)[0]
    (row,) = sft_rows([problem], style="plain")
    assert row["prompt"] + row["completion"] == render_prompt(problem.problem, style="plain") + " " + problem.solution
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    assert tokenizer(row["prompt"] + row["completion"])["input_ids"][: len(prompt_ids)] == prompt_ids
    (pair,) = preference_rows([problem], style="plain")
    assert pair["chosen"] == " " + problem.solution and pair["rejected"].startswith(" ")
    (chat,) = sft_rows([problem])
    assert chat["completion"] == [{"role": "assistant", "content": problem.solution}]

    generated = " The sum is $\\boxed{1}$."
    sampled = [{**record("p", ["correct", "incorrect"]), "problem": problem.problem}, record("q", ["incorrect"])]
    sampled[0]["samples"][0]["completion"] = generated
    rows, _ = coverage_rows(sampled, style="plain", references={"q": "Reference: $\\boxed{1}$"})
    assert rows[0]["prompt"] + rows[0]["completion"] == render_prompt(problem.problem, style="plain") + generated
    assert rows[1]["completion"] == " Reference: $\\boxed{1}$"  # a reference row joins like sft_rows
    (pair,) = pair_rows(sampled, style="plain")[0]
    assert pair["chosen"] == generated and pair["rejected"] == "p-1-incorrect"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


USER = {"role": "user", "content": "1+1?"}


def turn(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


STRING_PAIR = {"prompt": "Q: 1+1? A:", "chosen": " 2", "rejected": " 3"}
CHAT_PAIR = {"prompt": [USER], "chosen": turn("2"), "rejected": turn("3")}
IMPLICIT_CHAT_PAIR = {"chosen": [USER, *turn("2")], "rejected": [USER, *turn("3")]}
IMPLICIT_STRING_PAIR = {"chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"}


@pytest.mark.parametrize(
    ("good", "bad", "field", "reason"),
    [
        (STRING_PAIR, {**STRING_PAIR, "rejected": " 2"}, "rejected", "is identical to 'chosen'"),
        (STRING_PAIR, {**STRING_PAIR, "chosen": " "}, "chosen", "is empty"),
        (STRING_PAIR, {**STRING_PAIR, "rejected": None}, "rejected", "is empty"),
        (STRING_PAIR, {"prompt": "Q: 1+1? A:", "chosen": " 2"}, "rejected", "is empty"),
        (CHAT_PAIR, {**CHAT_PAIR, "rejected": turn("2")}, "rejected", "is identical to 'chosen'"),
        (CHAT_PAIR, {**CHAT_PAIR, "chosen": turn("")}, "chosen", "is empty"),
        (CHAT_PAIR, {**CHAT_PAIR, "rejected": []}, "rejected", "is empty"),
        (IMPLICIT_CHAT_PAIR, {**IMPLICIT_CHAT_PAIR, "rejected": [USER]}, "rejected", "is a prefix of the other side"),
        (IMPLICIT_CHAT_PAIR, {**IMPLICIT_CHAT_PAIR, "chosen": [USER, *turn("3")]}, "rejected", "is identical"),
        (IMPLICIT_STRING_PAIR, {**IMPLICIT_STRING_PAIR, "chosen": "Q: 1+1? A:"}, "chosen", "is a prefix"),
    ],
)
def test_unusable_preference_pairs_are_rejected_with_their_row_index_or_skipped_and_counted(
    tmp_path, caplog, good, bad, field, reason
):
    """A pair with identical sides trains to a zero gradient (loss log 2 throughout) and one with an empty side has
    nothing to prefer: a file in preference format names the row (index 1 here), the field and what to do, or with
    skip_invalid the row is skipped and counted, in the string and the conversational formats."""
    from align.data.schema import InvalidRowError
    from align.data.training import build_datasets

    path = _write_jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(InvalidRowError) as error:
        build_datasets("preference", DataArguments(dataset_name=str(path)), seed=0)
    message = str(error.value)
    assert message.startswith(f"{path}: row 1, field '{field}'") and reason in message
    assert "--skip_invalid" in message and "\n" not in message
    with caplog.at_level("WARNING", logger="align.data"):
        train, _ = build_datasets("preference", DataArguments(dataset_name=str(path), skip_invalid=True), seed=0)
    assert len(train) == 2 and train[0]["chosen"] == good["chosen"]
    assert f"skipped 1 invalid preference pairs of {path}" in caplog.text


def test_a_pair_side_of_another_type_or_a_row_that_is_no_object_is_named():
    """Rows given in memory (a file's reader makes one type per column): the field, its value and what was expected."""
    from align.data.schema import InvalidRowError
    from align.data.training import checked_preference_rows, preference_pair_error

    assert preference_pair_error({**STRING_PAIR, "chosen": 2}) == (
        "chosen",
        2,
        "expected a string or a list of messages, got int",
    )
    assert preference_pair_error(["a", "b"])[0] == "<row>"
    with pytest.raises(InvalidRowError, match=r"^pairs: row 1, field 'rejected' = 2: expected a string"):
        checked_preference_rows([STRING_PAIR, {**STRING_PAIR, "rejected": 2}], "pairs")


def test_skipped_pairs_do_not_count_toward_the_sample_limit(tmp_path):
    from align.data.training import build_datasets

    same = {**STRING_PAIR, "rejected": STRING_PAIR["chosen"]}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [same, STRING_PAIR, same, STRING_PAIR, STRING_PAIR])
    args = DataArguments(dataset_name=str(path), skip_invalid=True, max_train_samples=2)
    train, _ = build_datasets("preference", args, seed=0)
    assert train.to_list() == [STRING_PAIR, STRING_PAIR]


def test_pairs_built_from_problems_without_a_solution_are_rejected_or_skipped(tmp_path):
    """Offline pairs take the problem's solution as 'chosen': an answer-only problem gives an empty side."""
    from align.data.schema import InvalidRowError
    from align.data.training import build_datasets

    path = _write_jsonl(
        tmp_path / "problems.jsonl",
        [
            {"id": "worked", "problem": "What is $2+2$?", "answer": "4", "solution": "$2+2=4$.\n\n$\\boxed{4}$"},
            {"id": "answer-only", "problem": "What is $3+3$?", "answer": "6"},
        ],
    )
    with pytest.raises(InvalidRowError, match="row 1, field 'chosen'.*is empty.*pair id 'answer-only'") as error:
        build_datasets("preference", DataArguments(dataset_name=str(path)), seed=0)
    assert str(error.value).startswith(f"preference pairs built from {path}")
    assert "align data pairs" in str(error.value)
    train, _ = build_datasets("preference", DataArguments(dataset_name=str(path), skip_invalid=True), seed=0)
    assert train["id"] == ["worked"]


def test_pairs_leave_out_empty_and_identical_traces_and_count_them():
    """`align data pairs` writes no unusable pair: empty traces and wrong traces equal to a correct one are not
    paired, and the counts (printed and in summary.json) say how many."""
    from align.data.training import preference_pair_error

    sampled = record("p", ["correct", "incorrect", "correct", "incorrect", "no_answer", "correct"])
    texts = ["right", "right", "   ", "wrong", "", "other right"]  # "right" was graded both ways
    for sample, text in zip(sampled["samples"], texts, strict=True):
        sample["completion"] = text
    rows, counts = pair_rows([sampled], style="plain")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("right", "wrong")]
    assert counts["empty_completions_not_paired"] == 2 and counts["identical_completions_not_paired"] == 1
    assert all(preference_pair_error(row) is None for row in rows)
    _, clean = pair_rows(RECORDS)
    assert "empty_completions_not_paired" not in clean and "identical_completions_not_paired" not in clean
