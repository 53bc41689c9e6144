"""The `align` entry point: command discovery, `align env`, recipe parsing."""

import subprocess
import sys

import pytest

from align.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "env" in out and "train" in out


def test_unknown_command_fails(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_env_prints_resolved_versions():
    import torch
    import transformers
    import trl

    proc = subprocess.run([sys.executable, "-m", "align.cli", "env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name, version in [
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("trl", trl.__version__),
    ]:
        assert f"{name}" in proc.stdout and version in proc.stdout
    assert "default model" in proc.stdout


def test_train_rejects_unknown_recipe_keys(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("output_dir: x\nbf16: false\nuse_cpu: true\nnot_a_real_field: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "sft", "--config", str(recipe), "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "not_a_real_field" in proc.stderr


def test_train_sft_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""
model_name_or_path: {tiny_model_dir}
dataset_name: synthetic
synthetic_num_train: 8
output_dir: {out}
max_steps: 2
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_length: 256
bf16: false
use_cpu: true
gradient_checkpointing: false
report_to: none
save_strategy: "no"
""")
    assert main(["train", "sft", "--config", str(recipe)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


def test_train_explains_bf16_on_cpu(tmp_path):
    """A run (not a dry run: that one skips hardware checks, tests/test_input_errors.py) of a bf16 recipe on a CPU."""
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'x'}\nmodel_name_or_path: {tmp_path / 'never-loaded'}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "sft", "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "bf16: false" in proc.stderr


def test_trainer_format_files_are_used_as_is(tmp_path):
    """Rows already in a trainer's format (e.g. from `align data pairs`, or implicit-prompt pairs) are not rebuilt."""
    import json

    from align.configs import DataArguments
    from align.data.training import build_datasets

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
            "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}],
        }
    ] * 3
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, evaluation = build_datasets("preference", DataArguments(dataset_name=str(pairs), max_train_samples=2), 0)
    assert len(train) == 2 and train[0]["chosen"] == rows[0]["chosen"] and evaluation is None


def test_problem_files_are_converted_to_the_method_format(tmp_path):
    import json

    from align.configs import DataArguments
    from align.data.training import build_datasets

    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": "What is $2+2$?", "answer": "4", "solution": "$\\boxed{4}$"}) + "\n")
    train, _ = build_datasets("outcome", DataArguments(dataset_name=str(problems), negatives_per_problem=2), 0)
    assert [row["label"] for row in train] == [True, False, False]
    assert train[0]["prompt"][0]["content"].startswith("What is $2+2$?")


def test_every_method_names_importable_classes_a_dataset_kind_and_its_default_recipe():
    """The registry's rows hold: classes resolve, kinds are align.data.training's, and each default recipe is a
    shipped recipe whose launch line is for that method."""
    import importlib
    from types import SimpleNamespace

    from align.data.training import DATASET_KINDS
    from align.training import METHODS, dataset_kind_for, default_recipe, method_classes

    for name, method in METHODS.items():
        module = importlib.import_module(method.module, "align.trainers")
        trainer_cls, config_cls = method_classes(method)
        assert issubclass(trainer_cls, getattr(module, method.trainer))
        assert issubclass(config_cls, getattr(module, method.config))
        kinds = {dataset_kind_for(method, SimpleNamespace(objective=objective)) for objective in ("ce", "dpo", "nca")}
        assert kinds <= set(DATASET_KINDS)
        recipe = default_recipe(name)
        assert f"train {name} --config recipes/smollm2-135m-instruct/{recipe.name}" in recipe.read_text()
    assert dataset_kind_for(METHODS["prm"], SimpleNamespace(objective="ce")) == "outcome"
    assert dataset_kind_for(METHODS["prm"], SimpleNamespace(objective="dpo")) == "preference"


def test_a_launch_dry_run_prints_the_command_and_the_configs_and_launches_nothing(monkeypatch, capsys):
    """`--accelerate-config ... --dry_run` resolves the config, shows the command, parses what every process would,
    and starts no process (it used to drop --dry_run and launch a real run)."""
    import subprocess

    from align.training import default_recipe

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a dry run launched a process"))
    argv = ["train", "sft", "--config", str(default_recipe("sft")), "--accelerate-config", "cpu_ddp"]
    assert main([*argv, "--num-processes", "2", "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "accelerate.commands.launch --config_file" in captured.err and "cpu_ddp.yaml" in captured.err
    assert "--num_processes 2 -m align.cli train sft" in captured.err and "--use_cpu true" in captured.err
    assert "method: sft" in captured.out and "use_cpu=True" in captured.out
