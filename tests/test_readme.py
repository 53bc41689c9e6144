"""The README's commands work as written. Every command of its Usage sections that runs on a CPU (Train, Evaluate,
Build data, Diagnose) runs here in README order, in a directory where `recipes/` and `eval/` are the repository's and
the outputs chain under `runs/` as the README says; only the sizes shrink (the tiny model for the default one, one
training step, two problems), and the Hub-only MATH-500 becomes the offline synthetic task."""

import re
import shlex
from pathlib import Path

import pytest

from align.cli import main as align_main
from align.models import DEFAULT_MODEL


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CPU_SECTIONS = ("Train", "Evaluate", "Build data", "Diagnose")  # heading prefixes of the sections run here
# Commands the CPU test cannot run, and why. Every other command of the CPU sections runs; these must stay in the
# README as written (the test fails when one changes, so that this list is kept up to date with it).
GPU_ONLY = {
    "align train dco --config recipes/llama-3-8b/dco.yaml --accelerate-config zero3 --num-processes 8": "8 GPUs",
    "accelerate launch --config_file accelerate_configs/zero3.yaml -m align.cli train dco "
    "--config recipes/llama-3-8b/dco.yaml": "ZeRO-3 on GPUs, an 8B model",
    "sbatch --nodes=2 recipes/launch.slurm dco recipes/llama-3-8b/dco.yaml": "a Slurm cluster",
}
NEEDS_THE_HUB = {"math500"}  # named by a command or its --config: replaced by the offline synthetic task


def readme_commands() -> dict[str, list[str]]:
    """The commands of every ```bash block of the README (comments dropped), by the heading above the block."""
    commands: dict[str, list[str]] = {}
    heading = None
    for block_heading, block in re.findall(r"(?ms)^#+ (.+?)$|^```bash\n(.*?)^```", README.read_text()):
        if block_heading:
            heading = block_heading
            continue
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.setdefault(heading, []).append(shlex.join(words))
    return commands


def cpu_commands() -> list[str]:
    sections = [lines for heading, lines in readme_commands().items() if heading.startswith(CPU_SECTIONS)]
    return [line for lines in sections for line in lines]


def tiny(command: str, tiny_model_dir: str) -> list[str]:
    """The argv of `align <command>` at tiny sizes: the flags appended override the README's."""
    argv = [tiny_model_dir if word == DEFAULT_MODEL else word for word in shlex.split(command)[1:]]
    name = argv[0] if argv[0] not in ("data", "diagnose") else " ".join(argv[:2])
    config = next((argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--config"), None)
    named = " ".join(argv) + ((REPO / config).read_text() if config and argv[0] == "eval" else "")
    offline = ["--dataset", "synthetic"] if any(dataset in named for dataset in NEEDS_THE_HUB) else []
    sampling = ["--limit", "2", "--max_new_tokens", "8", "--grader_workers", "1", "--progress", "false"]
    sizes = {
        "train": ["--model_name_or_path", tiny_model_dir, "--max_steps", "1", "--synthetic_num_train", "8"]
        + ["--per_device_train_batch_size", "2"],
        "eval": [] if "--samples" in argv else [*sampling, "--n", "2"],
        "data coverage": [*sampling, "--k", "2"],
        "data pairs": [*sampling, "--k", "2"],
        "data outcome": [*sampling, "--k", "2"],
        "diagnose attention": ["--limit", "2", "--max-length", "64"],
        "diagnose entanglement": [],
        "diagnose pairs": ["--limit", "2"],
        "diagnose steps": [],
        "eval-steps": ["--synthetic", "4", "--num-calibration", "4"],
    }
    grpo = ["--num_generations", "2", "--max_completion_length", "8"] if name == "train" and argv[1] == "prime" else []
    return [*argv, *offline, *sizes[name], *grpo]


def test_the_readme_lists_every_gpu_only_command_as_skipped_and_names_files_that_exist():
    commands = [line for lines in readme_commands().values() for line in lines]
    for command in GPU_ONLY:
        assert command in commands, f"README no longer has `{command}`: update GPU_ONLY in {__file__}"
        for word in shlex.split(command):
            if word.endswith((".yaml", ".slurm")):
                assert (REPO / word).is_file(), f"`{command}` names {word}, which does not exist"
    assert not set(GPU_ONLY) & set(cpu_commands())
    assert len(cpu_commands()) >= 10  # the sections were found


@pytest.mark.slow
def test_the_readme_cpu_commands_run_as_written(tiny_model_dir, tmp_path, monkeypatch):
    for folder in ("recipes", "eval"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    for command in cpu_commands():
        assert align_main(tiny(command, tiny_model_dir)) == 0, command
    # the commands chained: each read what an earlier one wrote where the README says it is
    for output in (
        "runs/smollm2-135m-instruct/dco/adapter_model.safetensors",
        "runs/dco-n64/adapter_model.safetensors",
        "runs/dco-math500/summary.json",
        "runs/base-bon/summary.json",
        "runs/smollm2-135m-instruct/margin_dpo/entanglement.png",
        "runs/outc/outcome.jsonl",
        "runs/attn/attention_entropy.png",
    ):
        assert (tmp_path / output).is_file(), output
