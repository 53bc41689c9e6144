"""Loaders: rows shaped like each Hub dataset normalize to the schema; bad rows fail clearly or are counted."""

import json

import pytest

from align.data.answers import boxed_answers, final_answer, last_boxed, split_gsm8k_answer
from align.data.loaders import (
    HUB_SOURCES,
    DatasetUnavailableError,
    is_problem_source,
    load_problems,
    load_problems_as_configured,
    parse_column_mapping,
    problems_from_rows,
    read_source,
)
from align.data.schema import InvalidRowError


# One row as each Hub dataset publishes it (columns and value types copied from the dataset cards).
MATH500_ROW = {
    "problem": "What is $1+1$?",
    "solution": "We add.\n\nSo $1+1=\\boxed{2}$.",
    "answer": "2",
    "subject": "Prealgebra",
    "level": 1,
    "unique_id": "test/prealgebra/1.json",
}
HENDRYCKS_ROW = {
    "problem": "Simplify $\\frac{2}{4}$.",
    "level": "Level 2",
    "type": "Prealgebra",
    "solution": "Divide both by 2: $\\boxed{\\frac{1}{2}}$.",
}
LIGHTEVAL_ROW = {  # DigitalLearningGmbH/MATH-lighteval: same columns as hendrycks
    "problem": "Find $x$ if $x+3=5$.",
    "level": "Level 1",
    "type": "Algebra",
    "solution": "Subtract 3: $x=\\boxed{2}$ and $\\fbox{not this}$ is not it... actually $\\boxed{2}$.",
}
GSM8K_ROW = {
    "question": "Tom has 3 apples and buys 1,200 more. How many apples does he have?",
    "answer": "He has 3 + 1200 = <<3+1200=1203>>1203 apples.\n#### 1,203",
}


def load_rows(rows, source="hub", row_format="auto", mapping=None, **kwargs):
    return problems_from_rows(rows, source, column_mapping=mapping, row_format=row_format, **kwargs)


def test_last_boxed_handles_nesting_fbox_and_bare_forms():
    assert last_boxed("a $\\boxed{1}$ then $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert last_boxed("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("so \\fbox{7}") == "7"
    assert last_boxed("the answer is $\\boxed 5$.") == "5"
    assert last_boxed("no answer here") is None
    assert last_boxed("unclosed \\boxed{12") is None


def test_last_boxed_skips_empty_boxes_and_scans_pathological_text_quickly():
    assert last_boxed("$\\boxed{3}$. Put your final answer within \\boxed{}.") == "3"
    assert boxed_answers("\\boxed{\\{1,2\\}} and \\fbox{x}") == ["\\{1,2\\}", "x"]
    assert last_boxed("\\boxed{" * 200_000) is None  # linear scan, no quadratic re-scanning


def test_final_answer_is_the_box_or_an_explicit_final_answer_statement():
    assert final_answer("so $\\boxed{ 12 }$") == "12"
    assert final_answer("Thus the final answer is $\\frac{1}{2}$. I hope it is correct.") == "\\frac{1}{2}"
    assert final_answer("The final answer is \\(x = 3\\)") == "x = 3"
    assert final_answer("So the answer is $36$. Or is it? The answer is: $$37$$") == "37"
    assert final_answer("Final Answer: $\\frac{3}{4}$") == "\\frac{3}{4}"
    # a restated question or a number in prose is not an answer the model committed to
    assert final_answer("To find the answer to $80 - 18$, we think. The answer is 6.") is None
    assert final_answer("The final answer is within \\boxed{}.") is None


def test_split_gsm8k_answer():
    work, final = split_gsm8k_answer(GSM8K_ROW["answer"])
    assert final == "1203"
    assert "<<" not in work and work == "He has 3 + 1200 = 1203 apples."
    assert split_gsm8k_answer("no marker") is None


def test_math500_rows():
    hub = HUB_SOURCES["math500"]
    (problem,) = load_rows([MATH500_ROW], row_format=hub.row_format, mapping=hub.column_mapping).problems
    assert (problem.id, problem.answer, problem.level, problem.subject) == (
        "test/prealgebra/1.json",
        "2",
        1,
        "Prealgebra",
    )


@pytest.mark.parametrize("row", [HENDRYCKS_ROW, LIGHTEVAL_ROW])
def test_math_rows_take_the_last_boxed_answer(row):
    hub = HUB_SOURCES["math"]
    loaded = problems_from_rows(
        [row], "math[test]", column_mapping=hub.column_mapping, row_format="math", id_prefix="math-test"
    )
    (problem,) = loaded.problems
    assert problem.answer == {HENDRYCKS_ROW["problem"]: "\\frac{1}{2}", LIGHTEVAL_ROW["problem"]: "2"}[row["problem"]]
    assert problem.level == int(row["level"].split()[-1])
    assert problem.subject == row["type"]
    assert problem.id == "math-test-0"


def test_gsm8k_rows_become_math_style_problems():
    (problem,) = load_rows([GSM8K_ROW], row_format="gsm8k", id_prefix="gsm8k-test").problems
    assert problem.problem == GSM8K_ROW["question"]
    assert problem.answer == "1203"
    assert problem.solution.endswith("The answer is $\\boxed{1203}$.")
    assert problem.id == "gsm8k-test-0"


def test_auto_row_format_recognizes_each_shape():
    problems = load_rows([MATH500_ROW, HENDRYCKS_ROW, GSM8K_ROW], mapping={"subject": "subject"}).problems
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "1203"]


def test_local_files_of_each_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [MATH500_ROW, MATH500_ROW | {"unique_id": "b"}]) + "\n")
    loaded = load_problems(str(path), limit=1)
    assert [p.id for p in loaded.problems] == ["test/prealgebra/1.json"]
    parquet = tmp_path / "rows.parquet"
    import pandas as pd

    pd.DataFrame([{"question": "2+2?", "final": 4}]).to_parquet(parquet)
    (problem,) = load_problems(str(parquet), column_mapping="problem=question,answer=final").problems
    assert (problem.problem, problem.answer, problem.id) == ("2+2?", "4", "rows-0")


@pytest.mark.parametrize("name", ["math500", "math", "gsm8k", "someone/some-dataset"])
def test_hub_datasets_offline_fail_with_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="pass a local copy instead") as error:
        load_problems(name, "test", limit=3)
    assert "--dataset path/to/" in str(error.value)


def test_missing_local_file_and_unknown_names():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems("nope/missing.jsonl")
    with pytest.raises(ValueError, match="Unknown dataset 'mathh'"):
        load_problems("mathh")


BAD_ROWS = [
    ({"answer": "1"}, "field 'problem'", "missing required field"),
    ({"problem": "", "answer": "1"}, "field 'problem'", "is empty"),
    ({"problem": "p", "answer": ["1"]}, "field 'answer'", "expected a string"),
    ({"problem": "p", "solution": "no box here"}, "field 'solution'", "has no \\\\boxed"),
    ({"problem": "p", "answer": "1", "level": "hard"}, "field 'level'", "expected an int"),
    ("not an object", "field '<row>'", "expected a JSON object"),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_bad_rows_name_the_row_field_and_reason(row, field, reason):
    rows = [MATH500_ROW, row]
    with pytest.raises(InvalidRowError, match=f"row 1, {field}") as error:
        load_rows(rows, source="data.jsonl")
    assert reason.replace("\\\\", "\\") in str(error.value)


def test_skip_invalid_counts_every_skipped_row():
    rows = [MATH500_ROW] + [row for row, _, _ in BAD_ROWS] + [MATH500_ROW | {"unique_id": "z"}]
    loaded = load_rows(rows, skip_invalid=True)
    assert len(loaded.problems) == 2
    assert loaded.skipped == len(BAD_ROWS) == len(loaded.skipped_reasons)
    assert "row 1" in loaded.skipped_reasons[0]


def test_column_mapping_parsing():
    assert parse_column_mapping("problem=question, answer=final") == {"problem": "question", "answer": "final"}
    assert parse_column_mapping(None) == {}
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_column_mapping("problem")
    with pytest.raises(ValueError, match="unknown field 'questoin'"):
        parse_column_mapping("questoin=q")


def test_synthetic_still_loads_through_the_same_entry_point():
    loaded = load_problems("synthetic", "test", limit=4, synthetic_levels=(1, 2))
    assert [p.level for p in loaded.problems] == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="pass a limit"):
        load_problems("synthetic")


def test_read_source_is_the_one_dispatch_over_files_named_sources_and_hub_ids(tmp_path, monkeypatch):
    from align.data import loaders

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    read = read_source(str(path), "train")
    assert read.rows == [{"prompt": "p", "chosen": "a", "rejected": "b"}] and read.id_prefix == "pairs"
    assert read.row_format is None and read.column_mapping == {}

    monkeypatch.setattr(loaders, "_hub_rows", lambda hub_id, configs, split: [{"from": hub_id, "configs": configs}])
    named = read_source("gsm8k", "test")
    assert named.source == "openai/gsm8k[test]" and named.rows == [{"from": "openai/gsm8k", "configs": ("main",)}]
    assert named.row_format == HUB_SOURCES["gsm8k"].row_format and named.id_prefix == "gsm8k-test"
    assert read_source("math", "train", dataset_config="algebra").rows[0]["configs"] == ("algebra",)
    other = read_source("someone/pairs", "train", dataset_config="v2")
    assert other.rows == [{"from": "someone/pairs", "configs": ("v2",)}] and other.id_prefix == "pairs-train"
    with pytest.raises(ValueError, match="Unknown dataset 'synthetic'"):
        read_source("synthetic")  # generated, not read: load_problems handles it
    assert is_problem_source("synthetic") and is_problem_source("math500")
    assert not is_problem_source(str(path)) and not is_problem_source("someone/pairs")


def test_load_problems_as_configured_reads_the_options_and_warns_about_skipped_rows(tmp_path, caplog):
    from types import SimpleNamespace

    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [MATH500_ROW, {"answer": "1"}, MATH500_ROW]))
    options = SimpleNamespace(dataset=str(path), split="test", limit=None, skip_invalid=True)
    with caplog.at_level("WARNING", logger="align.data"):
        loaded = load_problems_as_configured(options)
    assert len(loaded) == 2 and loaded.skipped == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 invalid rows of {path} (first: {loaded.skipped_reasons[0]})"
    ]
    # training names its dataset `dataset_name` and loads one split per call: name, split and limit override
    training = SimpleNamespace(dataset_name="synthetic", synthetic_levels=[2], synthetic_seed=0)
    loaded = load_problems_as_configured(training, name="synthetic", split="train", limit=3)
    assert [p.level for p in loaded.problems] == [2, 2, 2]


def test_a_malformed_jsonl_line_is_named_with_its_file_line_and_json_error(tmp_path):
    """`datasets` reported a malformed line as a pyarrow traceback; now: the file, the line (from 1), the error."""
    from align.errors import InputError

    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(MATH500_ROW) + "\n\n" + '{"problem": "2+2?", "answer": 4,}\n')
    with pytest.raises(InputError) as error:
        load_problems(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: line 3 is not valid JSON (Expecting property name enclosed in double quotes")
    assert "at column 33" in message and "\n" not in message


@pytest.mark.parametrize(("suffix", "content"), [(".jsonl", ""), (".jsonl", "\n\n"), (".json", ""), (".json", "[]")])
def test_a_file_without_rows_says_so(tmp_path, suffix, content):
    from align.errors import InputError

    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(InputError, match=f"^{path} has no rows$"):
        load_problems(str(path))


def test_the_empty_output_of_align_data_has_no_rows_for_training(tmp_path):
    """`align data pairs` writes a 0-row pairs.jsonl when no problem had a correct and a wrong sample."""
    from align.configs import DataArguments
    from align.data.training import build_datasets
    from align.errors import InputError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    with pytest.raises(InputError, match=f"^{pairs} has no rows$"):
        build_datasets("preference", DataArguments(dataset_name=str(pairs)), seed=0)


def test_a_source_whose_rows_are_all_invalid_has_no_valid_rows(tmp_path):
    from types import SimpleNamespace

    from align.errors import InputError

    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"answer": "1"}) + "\n")
    options = SimpleNamespace(dataset=str(path), split="test", limit=None, skip_invalid=True)
    with pytest.raises(InputError, match=f"^{path} has no valid rows: all 1 were skipped as invalid"):
        load_problems_as_configured(options)


def test_row_messages_say_rows_count_from_zero():
    with pytest.raises(InvalidRowError) as error:
        load_rows([MATH500_ROW, {"answer": "1"}], source="data.jsonl")
    assert "row 1, field 'problem'" in str(error.value) and "Rows are counted from 0" in str(error.value)


def test_json_files_hold_a_list_of_rows_or_json_lines_and_rows_get_every_column(tmp_path):
    from align.data.files import read_local_rows
    from align.errors import InputError

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2", "level": 3}]))
    assert read_local_rows(str(listed)) == [
        {"problem": "p", "answer": "1", "level": None},  # as a table: every row has every column
        {"problem": "q", "answer": "2", "level": 3},
    ]
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"problem": "q"}) + "\n")
    assert read_local_rows(str(lines))[1] == {"problem": "q", "answer": None}
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"problem": "p", "answer": "1"}))
    assert read_local_rows(str(one)) == [{"problem": "p", "answer": "1"}]
    document = tmp_path / "document.json"
    document.write_text(json.dumps({"data": [1]}, indent=2))
    with pytest.raises(InputError, match="expected a JSON list of rows"):
        read_local_rows(str(document))
    # a column whose values have different types across rows (datasets refused the file with an Arrow cast error)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(MATH500_ROW) + "\n" + json.dumps({**MATH500_ROW, "level": "Level 2"}) + "\n")
    assert [problem.level for problem in load_problems(str(mixed)).problems] == [1, 2]


def test_a_damaged_parquet_file_is_one_line(tmp_path):
    from align.errors import InputError

    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=f"^{path} is not a readable parquet file"):
        load_problems(str(path))
