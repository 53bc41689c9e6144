"""One clear line for bad input (issue 16, items 4, 5, 7, 8, 9, 10, 12): `align <command>: <message>`, exit 2.

Each test names what a user saw before: a traceback, 160 lines of usage, "Repo id must be in the form...", a silent
`./trainer_output`, a PRM data directory reported as "a full model".
"""

import json
import sys
import warnings
from pathlib import Path

import pytest

from align.cli import main
from align.errors import InputError


ROOT = Path(__file__).resolve().parents[1]
CPU = "bf16: false\nuse_cpu: true\n"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # set (not deleted), so that monkeypatch restores the variable's absence after `--debug` set it
    monkeypatch.setenv("ALIGN_DEBUG", "0")


def _recipe(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _samples(tmp_path) -> Path:
    path = tmp_path / "given" / "samples.jsonl"
    path.parent.mkdir()
    record = {"id": "a", "problem": "What is $1+1$?", "answer": "2", "samples": [{"completion": "\\boxed{2}"}]}
    path.write_text(json.dumps(record) + "\n")
    return path


# -- the CLI handler ---------------------------------------------------------------------------------------------


def test_an_input_error_is_one_line_with_the_command_and_exit_status_2(monkeypatch, capsys):
    import align.commands.env as env

    def bad_input(argv):
        raise InputError("field 'x' = 3: expected a string")

    monkeypatch.setattr(env, "main", bad_input)
    assert main(["env"]) == 2
    assert capsys.readouterr().err == "align env: field 'x' = 3: expected a string\n"


def test_a_nested_command_names_itself(tmp_path, capsys):
    assert main(["data", "pairs", "--k", "0", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "align data pairs: k must be >= 1, got 0\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    import align.commands.env as env

    def bug(argv):
        raise ValueError("a bare ValueError from deep inside a library is a bug, not input")

    monkeypatch.setattr(env, "main", bug)
    with pytest.raises(ValueError, match="is a bug"):
        main(["env"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_an_input_error(monkeypatch, how):
    import align.commands.env as env

    def bad_input(argv):
        assert "--debug" not in argv
        raise InputError("bad")

    monkeypatch.setattr(env, "main", bad_input)
    if how == "env":
        monkeypatch.setenv("ALIGN_DEBUG", "1")
    with pytest.raises(InputError, match="bad"):
        main(["env", "--debug"] if how == "flag" else ["env"])


def test_align_train_reports_input_errors_in_one_line_not_a_traceback(tmp_path, capsys):
    """`align train` showed every input error as a traceback."""
    recipe = _recipe(tmp_path, f"{CPU}model_name_or_path: {tmp_path / 'no-such-model'}\noutput_dir: {tmp_path}\n")
    assert main(["train", "sft", "--config", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"align train: no such model directory or alias: {tmp_path / 'no-such-model'} (known aliases: "
        "smollm2-135m-instruct; a Hub id needs network)"
    )


# -- 4: models and PRMs that do not exist --------------------------------------------------------------------------


def test_a_model_path_that_does_not_exist_is_named_with_the_known_aliases():
    from align.models import resolve_model_path

    with pytest.raises(FileNotFoundError) as error:  # InputFileNotFoundError: an InputError and a FileNotFoundError
        resolve_model_path("runs/typo/dco")  # was "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    assert isinstance(error.value, InputError)
    assert str(error.value) == (
        "no such model directory or alias: runs/typo/dco (known aliases: smollm2-135m-instruct; a Hub id needs "
        "network)"
    )


def test_a_hub_id_while_the_hub_is_offline_and_not_cached(monkeypatch):
    from align.models import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("runs/dco") == "runs/dco"  # the README's old example: a path shaped like a Hub id
    expected = (
        r"^no such model directory or alias: runs/dco \(known aliases: smollm2-135m-instruct; a Hub id needs "
        r"network; as a Hub id it failed: We couldn't connect to 'https://huggingface.co'[^\n]*\)$"
    )
    for load in (load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(InputError, match=expected):
            load("runs/dco")


def test_a_hub_id_that_fails_to_load_online_is_one_line(monkeypatch):
    """Online, transformers tried the Hub and failed after its retries with a 50-80 line connection error."""
    import transformers

    from align.models import load_tokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(InputError) as error:
        load_tokenizer("someone/typo")
    assert str(error.value) == (
        "no such model directory or alias: someone/typo (known aliases: smollm2-135m-instruct; a Hub id needs "
        "network; as a Hub id it failed: We couldn't connect to 'https://huggingface.co' to load the files.)"
    )


def test_eval_and_data_check_the_model_before_they_write_anything(tmp_path, capsys):
    missing = tmp_path / "runs" / "typo" / "dco"
    for command in (["eval", "--output_dir"], ["data", "pairs", "--output"]):
        out = tmp_path / command[0]
        argv = [
            *command[:-1],
            "--model",
            str(missing),
            "--dataset",
            "synthetic",
            "--limit",
            "1",
            command[-1],
            str(out),
        ]
        assert main(argv) == 2
        prefix = " ".join(command[:-1])
        assert capsys.readouterr().err == (
            f"align {prefix}: no such model directory or alias: {missing} (known aliases: smollm2-135m-instruct; a "
            "Hub id needs network)\n"
        )
        assert not out.exists()


def test_a_file_or_a_data_directory_given_as_a_model(tmp_path):
    from align.models import load_model_and_tokenizer

    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match=f"^{data} is not a model directory: it holds no config.json or adapter_"):
        load_model_and_tokenizer(str(data))
    with pytest.raises(InputError, match=f"^{data / 'rows.jsonl'} is a file, not a model directory"):
        load_model_and_tokenizer(str(data / "rows.jsonl"))


@pytest.mark.parametrize("kind", ["missing", "hub id offline", "data directory", "jsonl file"])
def test_prm_paths_that_are_no_model_are_not_called_a_full_model(tmp_path, tiny_model_dir, monkeypatch, kind):
    """A nonexistent path, a data directory and a .jsonl file were all reported as "is a full model"."""
    from align.evaluation.scoring import check_scorer_paths
    from align.prm import ImplicitPRM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = {
        "missing": tmp_path / "nope",
        "hub id offline": "runs-prm",  # a relative name that is not here: a Hub id, which offline is not cached
        "data directory": tmp_path,
        "jsonl file": tmp_path / "rows.jsonl",
    }[kind]
    (tmp_path / "rows.jsonl").write_text("{}\n")
    expected = {
        "missing": f"no such model directory or alias: {path} (",
        "hub id offline": f"no such model directory or alias: {path} (",
        "data directory": f"{path} is not a model directory",
        "jsonl file": f"{path} is a file, not a model directory",
    }[kind]
    for flag, call in [
        ("--prm", lambda: check_scorer_paths(str(path))),
        ("--prm-ref", lambda: check_scorer_paths(tiny_model_dir, str(path))),
    ]:
        with pytest.raises(InputError) as error:
            call()
        assert str(error.value).startswith(f"{flag}: {expected}") and "full model" not in str(error.value)
    with pytest.raises(InputError) as error:
        ImplicitPRM.from_pretrained(str(path))
    assert str(error.value).startswith(expected)


def test_align_eval_checks_the_prm_before_grading(tmp_path, capsys):
    samples = _samples(tmp_path)
    argv = ["eval", "--samples", str(samples), "--prm", str(tmp_path), "--no_progress", "--grader_workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align eval: --prm: {tmp_path} is not a model directory") and err.count("\n") == 1
    assert not (samples.parent / "summary.json").exists()  # nothing was graded


# -- 5: dataset files ----------------------------------------------------------------------------------------------


def test_align_eval_names_the_malformed_line_and_the_empty_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4,}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval", "--dataset", str(bad), "--output_dir", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        f"align eval: {bad}: line 2 is not valid JSON (Expecting property name enclosed in double quotes at column "
        "33); every line must be one JSON object\n"
    )
    assert main(["eval", "--dataset", str(empty), "--output_dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == f"align eval: {empty} has no rows\n"


def test_an_empty_samples_file_has_no_rows(tmp_path, capsys):
    empty = tmp_path / "samples.jsonl"
    empty.write_text("")
    assert main(["eval", "--samples", str(empty), "--no_progress", "--grader_workers", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"align eval: {empty} has no rows")
    assert main(["eval", "--samples", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"align eval: --samples {tmp_path / 'none.jsonl'}: no such file\n"


def test_a_missing_dataset_file_is_an_input_error():
    from align.data.loaders import load_problems

    with pytest.raises(InputError, match="does not exist"):
        load_problems("nope/missing.jsonl")


# -- 7: wrong YAML types --------------------------------------------------------------------------------------------


def test_a_scalar_where_a_list_is_meant_is_a_list_of_one(tmp_path):
    """`synthetic_levels: 1` raised TypeError: 'int' object is not iterable."""
    from align.commands.eval import parse
    from align.training import parse_args

    data_args, _, _ = parse_args("sft", ["--config", _recipe(tmp_path, f"{CPU}synthetic_levels: 2\n")])
    assert data_args.synthetic_levels == [2]
    config = parse(["--config", _recipe(tmp_path, "synthetic_levels: 3\n", "eval.yaml"), "--output_dir", "x"])
    assert config.synthetic_levels == [3]


def test_a_string_for_a_list_of_strings_stays_a_string(tmp_path):
    """PEFT reads `lora_target_modules: all-linear` as a keyword, not as a module named all-linear."""
    from align.training import parse_args

    _, _, model_args = parse_args("sft", ["--config", _recipe(tmp_path, f"{CPU}lora_target_modules: all-linear\n")])
    assert model_args.lora_target_modules == "all-linear"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_steps: four", "field 'max_steps' = 'four': expected an integer"),
        ("max_steps: true", "field 'max_steps' = True: expected an integer"),
        ("learning_rate: fast", "field 'learning_rate' = 'fast': expected a number"),
        ("use_peft: maybe", "field 'use_peft' = 'maybe': expected true or false"),
        ("synthetic_levels: [1, two]", "field 'synthetic_levels' = [1, 'two']: expected an integer"),
        ("eval_strategy: sometimes", "field 'eval_strategy' = 'sometimes': expected one of no, steps, epoch"),
    ],
)
def test_a_yaml_value_of_the_wrong_type_names_the_field_value_and_type(tmp_path, capsys, line, expected):
    """`max_steps: four` printed 160 lines of usage before the error."""
    recipe = _recipe(tmp_path, f"{CPU}{line}\n")
    assert main(["train", "sft", "--config", recipe, "--dry_run"]) == 2
    assert capsys.readouterr().err == f"align train: {recipe}: {expected}\n"


def test_config_file_problems_are_one_line(tmp_path, capsys):
    unknown = _recipe(tmp_path, f"{CPU}not_a_real_field: 3\n")
    assert main(["train", "sft", "--config", unknown, "--dry_run"]) == 2
    assert capsys.readouterr().err == (
        f"align train: {unknown}: unknown field 'not_a_real_field' (a typo? `align train sft --help` lists the "
        "fields)\n"
    )
    assert main(["train", "sft", "--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"align train: no such config file: {tmp_path / 'none.yaml'}\n"
    broken = _recipe(tmp_path, "output_dir: x\n  use_cpu: true\n", "broken.yaml")
    assert main(["eval", f"--config={broken}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align eval: {broken} is not valid YAML: mapping values are not allowed here")
    assert err.count("\n") == 1


def test_a_bad_flag_is_one_line_without_the_usage(tmp_path, capsys):
    assert main(["eval", "--n", "four", "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "align eval: argument --n: invalid int value: 'four' (see align eval --help)\n"


# -- 8: the default output_dir ---------------------------------------------------------------------------------------


def test_a_recipe_without_output_dir_writes_to_runs_model_method_and_says_so(tmp_path, caplog):
    """It wrote silently to ./trainer_output."""
    from align.training import parse_args

    with caplog.at_level("WARNING", logger="align.train"):
        _, training_args, _ = parse_args("dco", ["--config", _recipe(tmp_path, CPU)])
    assert training_args.output_dir == "runs/smollm2-135m-instruct/dco"
    assert "the recipe sets no output_dir: writing to runs/smollm2-135m-instruct/dco" in caplog.text
    model = tmp_path / "my-model"
    _, training_args, _ = parse_args("sft", ["--config", _recipe(tmp_path, CPU), "--model_name_or_path", str(model)])
    assert training_args.output_dir == "runs/my-model/sft"
    _, training_args, _ = parse_args("sft", ["--config", _recipe(tmp_path, CPU), "--output-dir", str(tmp_path)])
    assert training_args.output_dir == str(tmp_path)


# -- 9: --samples ignores the generation fields -------------------------------------------------------------------


def test_eval_samples_warns_about_the_config_fields_it_ignores(tmp_path, capsys):
    """`--config eval/math500.yaml --samples FILE` silently ignored the config's dataset and n."""
    from align.commands.eval import parse

    samples = str(_samples(tmp_path))
    parse(["--config", str(ROOT / "eval" / "math500.yaml"), "--samples", samples, "--temperature", "1.0"])
    assert capsys.readouterr().err == (
        "align eval: --samples re-grades existing generations and ignores dataset, max_new_tokens, n, prompt_style, "
        "split, temperature, top_p (they apply to generating samples)\n"
    )
    parse(["--samples", samples, "--seed", "3", "--grading_timeout", "2"])
    assert capsys.readouterr().err == ""  # fields re-grading reads
    parse(["--samples", samples, "--prm", "runs/prm", "--prompt_style", "plain", "--model", "m"])
    assert capsys.readouterr().err == ""  # a PRM renders missing prompts with them


# -- 10: dry runs of GPU recipes -------------------------------------------------------------------------------------


def test_a_dry_run_of_a_gpu_recipe_validates_its_configs_on_a_cpu(capsys):
    """It failed at transformers' bf16 check."""
    from transformers.utils import is_torch_bf16_gpu_available

    recipe = str(ROOT / "recipes" / "llama-3-8b" / "dco.yaml")
    assert main(["train", "dco", "--config", recipe, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "method: dco" in out and "bf16=True" in out and "pass_n=256" in out
    skipped = "dry run: not checked on this machine: bf16 needs a GPU that computes bf16"
    assert (skipped in out) != is_torch_bf16_gpu_available()


def test_a_dry_run_still_refuses_what_is_wrong_on_any_machine(tmp_path, capsys):
    recipe = _recipe(tmp_path, "bf16: true\nfp16: true\n")
    assert main(["train", "sft", "--config", recipe, "--dry_run"]) == 2
    assert "At most one of fp16 and bf16 can be True" in capsys.readouterr().err


# -- 12: help texts and warnings -----------------------------------------------------------------------------------


def test_eval_help_lists_config_and_says_what_no_flags_do(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--config FILE.yaml" in out
    no_progress = out[out.index("--no_progress, --no-progress") :].splitlines()[1]
    assert no_progress.strip() == "Turn --progress off."


def test_repro_help_gives_one_duration(capsys):
    with pytest.raises(SystemExit):
        main(["repro", "--help"])
    out = capsys.readouterr().out
    # each experiment's duration is stated once in the description and once in the size group, and they agree
    assert "about an hour" not in out and "about 3 hours" not in out
    assert out.count("About 30 minutes for 2 seeds") == 1 and "dco about 30 minutes" in out
    assert out.count("about 65 minutes on 2 free cores") == 1 and "pass-k about 65" in out


def test_parsing_a_recipe_prints_no_future_warning(tmp_path):
    """TRL's default `gradient_checkpointing: true` made transformers warn that the name is deprecated, every run."""
    from align.training import parse_args

    for extra, expected in [
        ([], True),
        (["--gradient_checkpointing", "false"], False),
        (["--no_gradient_checkpointing"], False),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            _, training_args, _ = parse_args("sft", ["--config", _recipe(tmp_path, CPU), *extra])
        assert training_args.gradient_checkpointing is expected and training_args.activation_checkpointing is expected
    recipe = _recipe(
        tmp_path, f"{CPU}gradient_checkpointing: false\ngradient_checkpointing_kwargs:\n  use_reentrant: false\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, training_args, _ = parse_args("sft", ["--config", recipe, "--gradient-checkpointing"])
    assert training_args.gradient_checkpointing is True
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_the_console_script_prints_one_line_for_bad_input(tmp_path):
    """The installed entry point, end to end: no traceback, exit status 2."""
    import subprocess

    recipe = _recipe(tmp_path, f"{CPU}max_steps: four\n")
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "sft", "--config", recipe, "--dry_run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"align train: {recipe}: field 'max_steps' = 'four': expected an integer\n"


def test_dataset_options_found_wrong_while_loading_are_one_line(tmp_path, capsys):
    """A column mapping and an unbounded synthetic task are read when the problems load, after parsing."""
    argv = ["eval", "--dataset", "synthetic", "--output_dir", str(tmp_path)]
    assert main([*argv, "--limit", "2", "--column_mapping", "problem:question"]) == 2
    assert capsys.readouterr().err == (
        "align eval: column mapping item 'problem:question' is not FIELD=COLUMN (e.g. problem=question)\n"
    )
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "align eval: The synthetic task is unbounded: pass a limit (number of problems), e.g. --limit 100.\n"
    )
