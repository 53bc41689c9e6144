"""The training-time evaluation callback: exact coverage and sampled pass@k / maj@k logged during a run."""

import json

import pytest

from align.configs import DataArguments
from align.data.synthetic import generate_problems
from align.evaluation.callback import CoverageEvalCallback


DIRECT = "Give only the final answer, as \\boxed{ANSWER}."


def _sft_rows(count: int):
    from align.data.training import sft_rows

    return sft_rows(generate_problems(count, "train", [1]), target="answer", instruction=DIRECT)


def test_a_trl_run_logs_exact_and_sampled_metrics_to_history_and_tensorboard(
    tiny_model_dir, cpu_args, tmp_path, monkeypatch
):
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trl import SFTConfig, SFTTrainer

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = SFTConfig(
        **{**cpu_args, "report_to": "tensorboard", "logging_steps": 2},
        max_steps=4,
        per_device_train_batch_size=4,
        max_length=128,
        learning_rate=1e-3,
    )
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(_sft_rows(16)))
    callback = CoverageEvalCallback(
        trainer, generate_problems(3, "test", [1]), every=2, samples=4, ks=[1, 4], max_new_tokens=6, instruction=DIRECT
    )
    trainer.add_callback(callback)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_exact_pass@1" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        assert {"eval_exact_pass@4", "eval_exact_mean_log_p", "eval_pass@1", "eval_pass@4", "eval_maj@4"} <= set(entry)
        assert 0 <= entry["eval_exact_pass@1"] <= entry["eval_exact_pass@4"] <= 1 and entry["eval_coverage_s"] > 0
    # the trainer's own logs keep their metrics (TRL averages them in its `log`, which the callback does not call)
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [2, 4] and all("mean_token_accuracy" in e for e in losses)
    assert trainer.model.training  # evaluation left the model as it found it
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"eval/exact_pass@1", "eval/exact_pass@4", "eval/pass@1", "eval/maj@4"} <= set(tags)


def test_align_train_turns_it_on_from_the_recipe(tiny_model_dir, tmp_path):
    from align import training

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: synthetic\nsynthetic_num_train: 16\n"
        f"completion_target: answer\nprompt_instruction: '{DIRECT}'\nmax_steps: 3\nper_device_train_batch_size: 4\n"
        "max_length: 128\nlogging_steps: 1\nsave_strategy: 'no'\nreport_to: none\nbf16: false\nuse_cpu: true\n"
        "gradient_checkpointing: false\ndisable_tqdm: true\n"
        "coverage_eval_steps: 2\ncoverage_eval_problems: 4\ncoverage_eval_ks: [1, 16, 256]\n"
    )
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path / "run")]
    training.run("sft", *training.parse_args("sft", argv))
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_exact_pass@256" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 3]  # every 2 steps and at the last
    assert "eval_pass@1" not in evaluations[0]  # sampling is off unless coverage_eval_samples is set


def test_a_grpo_run_keeps_its_own_metrics_next_to_the_evaluation(tiny_model_dir, tmp_path):
    """GRPOTrainer averages and clears its step metrics in its `log`: the callback's logging must not flush them."""
    from align import training

    recipe = tmp_path / "pass_n.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: synthetic\nsynthetic_num_train: 8\n"
        "pass_n: 4\nnum_generations: 4\nmax_completion_length: 8\nmax_steps: 2\nper_device_train_batch_size: 8\n"
        "grader_workers: 1\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\nbf16: false\nuse_cpu: true\n"
        "gradient_checkpointing: false\ndisable_tqdm: true\n"
        "coverage_eval_steps: 1\ncoverage_eval_problems: 2\ncoverage_eval_samples: 2\ncoverage_eval_ks: [1, 2]\n"
        "coverage_eval_max_new_tokens: 4\n"
    )
    trainer = training.run(
        "pass_n", *training.parse_args("pass_n", ["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    )
    history = trainer.state.log_history
    assert [e["step"] for e in history if "eval_exact_pass@2" in e and "eval_maj@2" in e] == [1, 2]
    assert [e["step"] for e in history if "reward" in e and "loss" in e] == [1, 2]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"coverage_eval_steps": -1}, "coverage_eval_steps must be >= 0"),
        ({"coverage_eval_steps": 5, "coverage_eval_exact": False}, "nothing is evaluated"),
        ({"coverage_eval_problems": 0}, "coverage_eval_problems must be >= 1"),
        ({"coverage_eval_ks": [0, 16]}, "coverage_eval_ks must be integers >= 1"),
    ],
)
def test_bad_options_are_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(**fields)
