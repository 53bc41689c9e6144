"""PassAtNGRPOTrainer on the tiny model: trains, logs pass_n/*, replaces GRPO's advantages by the pass@N weights,
and its update is Σ_i w_i ∇log π(y_i); the verifier reward; config validation; `align train pass_n`."""

import math
import warnings

import pytest
import torch
from datasets import Dataset

from align.data.synthetic import generate_problems
from align.data.training import prompt_rows
from align.rewards import VerifierReward
from align.trainers.pass_n import GraderGRPOConfig, GraderGRPOTrainer, PassAtNConfig, PassAtNGRPOTrainer


K = 4  # completions per prompt


def _prompts(count=8) -> Dataset:
    return Dataset.from_list(prompt_rows(generate_problems(count, "train", levels=(1,), seed=0)))


def _config(cpu_args, config_class=PassAtNConfig, **overrides):
    fields = dict(
        max_steps=2,
        per_device_train_batch_size=2 * K,  # two prompts per step
        num_generations=K,
        max_completion_length=8,
        learning_rate=1e-3,
        **cpu_args,
    )
    if config_class is PassAtNConfig:
        fields["pass_n"] = 4
    fields.update(overrides)
    return config_class(**fields)


def even_token_sum(completion_ids, **kwargs):
    """A binary reward that splits random completions about evenly: 1 when the sum of the token ids is even."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def even_first_token(completion_ids, **kwargs):
    """A binary reward the tiny model can learn: 1 when the first sampled token has an even id."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


def textbook_f(n: float, p: float) -> float:
    if p == 0:
        return 1.0
    return n * p * (1 - p) ** (n - 1) / (1 - (1 - p) ** n)


def independent_weights(rewards: list[float], group_size: int, n: float, estimator: str) -> list[float]:
    """The pass@N weights recomputed by hand from one generation batch's rewards."""
    weights = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        c = sum(group)
        if c == 0:
            weights += [0.0] * group_size
            continue
        f = textbook_f(n, c / group_size)
        if estimator == "plain":
            weights += [f / c if r else 0.0 for r in group]
        else:
            weights += [f * (group_size - c) / (c * (group_size - 1)) if r else -f / (group_size - 1) for r in group]
    return weights


class RecordingTrainer(PassAtNGRPOTrainer):
    """Keeps the advantages each generation batch hands to the loss."""

    def __init__(self, *args, **kwargs):
        self.recorded_advantages = []
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded_advantages.append(output["advantages"].clone())
        return output


PASS_N_METRICS = (
    "pass_n/p_hat_mean",
    "pass_n/p_hat_std",
    "pass_n/frac_no_correct",
    "pass_n/frac_all_correct",
    "pass_n/weight_mean",
    "pass_n/pass_at_n",
    "pass_n/pass_at_n_unbiased",
)


# --- the verifier reward ---------------------------------------------------------------------------------------------


def test_verifier_reward_grades_against_the_answer_column():
    logged = {}
    with VerifierReward(num_workers=1) as reward:
        assert reward.__name__ == "accuracy"
        completions = [
            [{"role": "assistant", "content": "We add.\n\nThe answer is $\\boxed{42}$."}],
            [{"role": "assistant", "content": "The answer is $\\boxed{41}$."}],
            "so it is $\\boxed{\\frac{1}{2}}$",
            "no final answer here",
        ]
        scores = reward(
            prompts=["p"] * 4,
            completions=completions,
            answer=["42", "42", "0.5", 7],
            log_extra=lambda column, values: logged.setdefault(column, values),
        )
        assert scores == [1.0, 0.0, 1.0, 0.0]
        assert logged["verdict"] == ["correct", "incorrect", "correct", "no_answer"]
        assert logged["extracted_answer"][:2] == ["42", "41"]
        pids = reward.grader.worker_pids
        reward.close()
        assert reward._grader is None
        assert reward(completions=["$\\boxed{3}$"], answer=["3"]) == [1.0]  # a fresh pool after close()
        assert reward.grader.worker_pids != pids
    assert reward._grader is None
    with pytest.raises(ValueError, match="`answer` column"):
        VerifierReward()(completions=["x"], solution=["1"])
    with pytest.raises(ValueError, match="row 1 has an empty `answer`"):
        VerifierReward()(completions=["x", "y"], answer=["1", " "])


# --- training --------------------------------------------------------------------------------------------------------


def test_trains_with_the_default_verifier_reward_and_logs_pass_n_metrics(tiny_model_dir, cpu_args):
    args = _config(cpu_args, grader_workers=1)
    trainer = PassAtNGRPOTrainer(model=tiny_model_dir, args=args, train_dataset=_prompts())
    assert trainer.reward_func_names == ["accuracy"]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in (*PASS_N_METRICS, "rewards/accuracy/mean", "reward", "entropy"):
            assert key in entry and math.isfinite(entry[key]), key
        # A random tiny model never boxes the right sum: every group unsolved, nothing to push.
        assert entry["pass_n/frac_no_correct"] == 1.0 and entry["pass_n/weight_mean"] == 0.0
    assert trainer.verifier_reward._grader is None  # grading processes stopped when train() returned


@pytest.mark.parametrize("estimator", ["plain", "loo"])
def test_weights_match_an_independent_computation_from_the_logged_rewards(tiny_model_dir, cpu_args, estimator):
    args = _config(cpu_args, weight_estimator=estimator, logging_steps=1)
    trainer = RecordingTrainer(model=tiny_model_dir, reward_funcs=even_token_sum, args=args, train_dataset=_prompts())
    assert trainer.verifier_reward is None  # the given reward replaces the verifier
    trainer.train()
    rewards = list(trainer._logs["rewards"]["even_token_sum"])  # the last generation batch, in generation order
    assert len(rewards) == 2 * K and 0 < sum(rewards) < 2 * K, rewards  # both kinds of samples
    expected = independent_weights(rewards, K, 4, estimator)
    assert trainer.recorded_advantages[-1].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert list(trainer._logs["advantages"]) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    p_hats = [sum(rewards[i : i + K]) / K for i in range(0, 2 * K, K)]
    assert last["pass_n/p_hat_mean"] == pytest.approx(sum(p_hats) / 2)
    assert last["pass_n/frac_no_correct"] == pytest.approx(sum(p == 0 for p in p_hats) / 2)
    assert last["pass_n/weight_mean"] == pytest.approx(sum(expected) / (2 * K), abs=1e-7)
    assert last["pass_n/pass_at_n"] == pytest.approx(sum(1 - (1 - p) ** 4 for p in p_hats) / 2)
    assert last["pass_n/pass_at_n_unbiased"] == pytest.approx(sum(float(p > 0) for p in p_hats) / 2)  # N = K


def test_learns_a_binary_reward(tiny_model_dir, cpu_args):
    args = _config(
        cpu_args, max_steps=8, per_device_train_batch_size=4 * K, learning_rate=5e-2, max_completion_length=1, pass_n=2
    )
    trainer = PassAtNGRPOTrainer(
        model=tiny_model_dir, reward_funcs=even_first_token, args=args, train_dataset=_prompts(32)
    )
    trainer.train()
    p_hat = [entry["pass_n/p_hat_mean"] for entry in trainer.state.log_history if "pass_n/p_hat_mean" in entry]
    assert len(p_hat) == 8
    assert sum(p_hat[-3:]) / 3 > sum(p_hat[:3]) / 3 + 0.25, p_hat


def test_update_is_the_weighted_sum_of_sequence_log_prob_gradients(tiny_model_dir, cpu_args):
    """dr_grpo on-policy: ∇loss = -Σ_i w_i ∇log π(y_i) / (B · max_completion_length), against a direct computation."""
    trainer = RecordingTrainer(
        model=tiny_model_dir, reward_funcs=even_token_sum, args=_config(cpu_args), train_dataset=_prompts()
    )
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch per step here
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._generate_and_score_completions(batch)
    weights = inputs["advantages"]
    assert weights.abs().sum() > 0

    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    trainer_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # temperature 1
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    width = inputs["completion_ids"].shape[1]
    sequence_logp = (token_logp[:, -width:] * inputs["completion_mask"]).sum(-1)
    direct = -(weights * sequence_logp).sum() / (len(weights) * trainer.args.max_completion_length)
    direct.backward()
    for name, p in model.named_parameters():
        if name in trainer_grads:
            torch.testing.assert_close(p.grad, trainer_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_grpo_baseline_trains_with_the_verifier(tiny_model_dir, cpu_args):
    args = _config(cpu_args, config_class=GraderGRPOConfig, max_steps=1, grader_workers=1, loss_type="dr_grpo")
    trainer = GraderGRPOTrainer(model=tiny_model_dir, args=args, train_dataset=_prompts())
    trainer.train()
    assert "rewards/accuracy/mean" in trainer.state.log_history[0]
    assert not any(key.startswith("pass_n/") for key in trainer.state.log_history[0])


# --- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pass_n": 0.5}, "pass_n must be a number >= 1"),
        ({"pass_n": math.inf}, "pass_n must be a number >= 1"),
        ({"weight_estimator": "rloo"}, "weight_estimator must be one of"),
        ({"grading_timeout": 0}, "grading_timeout must be > 0"),
        ({"grader_workers": 0}, "grader_workers must be >= 1"),
    ],
)
def test_config_rejects_bad_values(cpu_args, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(cpu_args, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "dapo"}, "length-reweighted"),
        ({"scale_rewards": "group"}, "scale_rewards='group' is ignored"),
        ({"num_iterations": 2}, "off-policy"),
        ({"steps_per_generation": 2}, "older policy"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"mask_truncated_completions": True}, "mask_truncated_completions"),
    ],
)
def test_config_warns_about_settings_that_change_the_estimator(cpu_args, overrides, message):
    with pytest.warns(UserWarning, match=message):
        _config(cpu_args, **overrides)


def test_default_config_is_the_exact_estimator(cpu_args):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PassAtNConfig")
        args = _config(cpu_args)
    assert (args.loss_type, args.scale_rewards, args.beta, args.num_iterations) == ("dr_grpo", "none", 0.0, 1)
    assert _config(cpu_args, loss_type="luspo", importance_sampling_level="sequence").loss_type == "luspo"


def test_trainer_checks_its_config_and_dataset(tiny_model_dir, cpu_args):
    from trl import GRPOConfig

    grpo_args = GRPOConfig(per_device_train_batch_size=K, num_generations=K, **cpu_args)
    with pytest.raises(TypeError, match="needs a PassAtNConfig"):
        PassAtNGRPOTrainer(model=tiny_model_dir, args=grpo_args, train_dataset=_prompts())
    no_answers = Dataset.from_list([{"prompt": "What is 1 + 1?", "solution": "2"}] * 4)
    with pytest.raises(ValueError, match="`answer` column"):
        PassAtNGRPOTrainer(model=tiny_model_dir, args=_config(cpu_args), train_dataset=no_answers)


def test_align_train_pass_n_cli(tiny_model_dir, tmp_path):
    from align.commands.train import main

    recipe = tmp_path / "pass_n.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        "dataset_name: synthetic\nsynthetic_num_train: 8\n"
        "pass_n: 4\nweight_estimator: loo\nnum_generations: 4\nmax_completion_length: 8\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 1\nper_device_train_batch_size: 8\n"
        "grader_workers: 1\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
        "bf16: false\nuse_cpu: true\ngradient_checkpointing: false\n"
    )
    assert main(["pass_n", "--config", str(recipe)]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "trainer_state.json").is_file()
