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
