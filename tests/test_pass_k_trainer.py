"""PassAtNGRPOTrainer with every pass_k_objective: the advantages it hands to the loss are the table's, its update is
Σ_i w_i ∇log π(y_i), k follows pass_k_schedule, PassAtNConfig's checks, and `align train pass_n --pass_k_objective X`
for every X."""

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from align.data.synthetic import generate_problems
from align.data.training import prompt_rows
from align.losses.pass_k import PASS_K_OBJECTIVES, grpo_advantages, pass_k_advantages
from align.trainers.pass_n import PassAtNConfig, PassAtNGRPOTrainer
from align.trainers.pass_n_config import parse_pass_k_schedule


K = 4  # completions per prompt
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-instruct" / "pass_n.yaml"


def _prompts(count=8) -> Dataset:
    return Dataset.from_list(prompt_rows(generate_problems(count, "train", levels=(1,), seed=0)))


def _config(cpu_args, **overrides):
    fields = dict(
        max_steps=2,
        per_device_train_batch_size=2 * K,  # two prompts per step
        num_generations=K,
        max_completion_length=8,
        learning_rate=1e-3,
        pass_n=4,
        **cpu_args,
    )
    fields.update(overrides)
    return PassAtNConfig(**fields)


def even_token_sum(completion_ids, **kwargs):
    """A binary reward that splits random completions about evenly: 1 when the sum of the token ids is even."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def even_first_token(completion_ids, **kwargs):
    """A binary reward the tiny model can learn: 1 when the first sampled token has an even id."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


class RecordingTrainer(PassAtNGRPOTrainer):
    """Keeps the advantages each generation batch hands to the loss."""

    def __init__(self, *args, **kwargs):
        self.recorded_advantages = []
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded_advantages.append(output["advantages"].clone())
        return output


def _one_generation(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch per step here
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._generate_and_score_completions(batch)
    rewards = torch.tensor(list(trainer._logs["rewards"]["even_token_sum"]), dtype=torch.float64)
    return inputs, rewards


# --- every objective: construction and the advantages of one generation batch ----------------------------------------

OVERRIDES = {
    "dco": {},
    "pkpo": {"pass_k": 2},
    "passk_analytic": {"pass_k": 2},
    "max_k_loo": {},
    "risk_seeking": {"risk_seeking_beta": 1.5},
    "grpo": {},
}


@pytest.mark.parametrize("objective", PASS_K_OBJECTIVES)
def test_every_objective_hands_its_advantages_to_the_loss(tiny_model_dir, cpu_args, objective):
    args = _config(cpu_args, pass_k_objective=objective, **OVERRIDES[objective])
    trainer = RecordingTrainer(model=tiny_model_dir, reward_funcs=even_token_sum, args=args, train_dataset=_prompts())
    inputs, rewards = _one_generation(trainer)
    groups = rewards.view(-1, K)
    if objective == "grpo":  # TRL's own advantages (scale_rewards="none": r - group mean)
        expected = grpo_advantages(groups)
    else:
        expected = pass_k_advantages(
            objective,
            groups,
            k=args.pass_n if objective == "dco" else args.pass_k_at(0),
            estimator=args.weight_estimator if objective == "dco" else args.pkpo_estimator,
            beta=args.risk_seeking_beta,
        )
    torch.testing.assert_close(inputs["advantages"].double(), expected.reshape(-1), rtol=1e-6, atol=1e-7)
    assert list(trainer._logs["advantages"]) == pytest.approx(expected.reshape(-1).tolist(), rel=1e-6, abs=1e-7)


# --- training --------------------------------------------------------------------------------------------------------


def test_pkpo_trains_with_an_annealed_k_and_logs_pass_k_metrics(tiny_model_dir, cpu_args):
    args = _config(cpu_args, max_steps=3, pass_k_objective="pkpo", pass_k_schedule="3:2,1")
    trainer = RecordingTrainer(model=tiny_model_dir, reward_funcs=even_token_sum, args=args, train_dataset=_prompts())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["pass_k/k"] for entry in logs] == [3.0, 3.0, 1.0]  # k = 3 before step 2, then 1
    for entry in logs:
        for key in ("pass_k/weight_mean", "pass_k/weight_abs_mean", "pass_k/frac_zero_groups", "loss"):
            assert math.isfinite(entry[key]), key
        assert "pass_n/p_hat_mean" not in entry  # DCO's metrics belong to the dco objective
    assert "pass_k/pass_at_k_unbiased" in logs[0]
    assert all((a >= 0).all() for a in trainer.recorded_advantages[:2])  # loo-1 at k >= 2 never pushes down
    assert trainer.recorded_advantages[2].sum().abs() < 1e-6  # k = 1: the leave-one-out centring sums to 0


@pytest.mark.parametrize("objective", ["passk_analytic", "risk_seeking"])
def test_learns_a_binary_reward(tiny_model_dir, cpu_args, objective):
    args = _config(
        cpu_args,
        max_steps=8,
        per_device_train_batch_size=4 * K,
        learning_rate=5e-2,
        max_completion_length=1,
        pass_k_objective=objective,
        pass_k=2,
    )
    trainer = PassAtNGRPOTrainer(
        model=tiny_model_dir, reward_funcs=even_first_token, args=args, train_dataset=_prompts(32)
    )
    trainer.train()
    reward = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(reward) == 8
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.2, reward


def test_update_is_the_weighted_sum_of_sequence_log_prob_gradients(tiny_model_dir, cpu_args):
    """pkpo, dr_grpo on-policy: ∇loss = -Σ_i w_i ∇log π(y_i) / (B · max_completion_length), computed directly."""
    args = _config(cpu_args, pass_k_objective="pkpo", pass_k=2, pkpo_estimator="loo")
    trainer = RecordingTrainer(model=tiny_model_dir, reward_funcs=even_token_sum, args=args, train_dataset=_prompts())
    model = trainer.model
    inputs, _ = _one_generation(trainer)
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
    assert trainer_grads
    for name, p in model.named_parameters():
        if name in trainer_grads:
            torch.testing.assert_close(p.grad, trainer_grads[name], rtol=1e-4, atol=1e-7, msg=name)


# --- configuration ---------------------------------------------------------------------------------------------------


def test_default_objective_is_dco_and_k_defaults_to_half_the_group(cpu_args):
    args = _config(cpu_args)
    assert (args.pass_k_objective, args.pass_k, args.pass_k_schedule, args.pkpo_estimator) == (
        "dco",
        None,
        None,
        "loo-1",
    )
    assert args.risk_seeking_beta == 2.0 and args.pass_k_at(0) is None  # dco's budget is pass_n
    assert _config(cpu_args, pass_k_objective="pkpo").pass_k_at(0) == K // 2
    assert _config(cpu_args, pass_k_objective="pkpo", pass_k=4).pass_k_at(10) == 4
    assert _config(cpu_args, pass_k_objective="risk_seeking", pass_k=99).pass_k_at(0) is None  # ignored
    annealed = _config(cpu_args, pass_k_objective="passk_analytic", pass_k_schedule="3:10, 2:20, 1")
    assert [annealed.pass_k_at(step) for step in (0, 9, 10, 19, 20, 10**6)] == [3, 3, 2, 2, 1, 1]


def test_schedule_parser():
    assert parse_pass_k_schedule("8:1500,1") == ((8, 1500), (1, None))
    assert parse_pass_k_schedule("4") == ((4, None),)
    for bad in ("8:1500", "8,1", "8:10,4:5,1", "0:10,1", "a:1,1", "8:0,1", "", "8:10,,1"):
        with pytest.raises(ValueError, match="pass_k_schedule must look like '8:1500,1'"):
            parse_pass_k_schedule(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pass_k_objective": "pass@k"}, "pass_k_objective must be one of"),
        ({"pkpo_estimator": "rloo"}, "pkpo_estimator must be one of"),
        ({"risk_seeking_beta": 0.0}, "risk_seeking_beta must be a finite number > 0"),
        ({"risk_seeking_beta": math.nan}, "risk_seeking_beta must be a finite number > 0"),
        ({"pass_k": 0}, "pass_k must be an integer >= 1"),
        ({"pass_k": 2.5}, "pass_k must be an integer >= 1"),
        ({"pass_k": 2, "pass_k_schedule": "2:5,1"}, "set pass_k or pass_k_schedule, not both"),
        ({"pass_k_schedule": "2:5"}, "pass_k_schedule must look like"),
        ({"pass_k_objective": "pkpo", "pass_k": 5}, r"pass_k=5 for pkpo must be <= num_generations=4"),
        ({"pass_k_objective": "pkpo", "pass_k": 4, "pkpo_estimator": "loo"}, r"must be < num_generations=4"),
        ({"pass_k_objective": "passk_analytic", "pass_k": 4}, r"every advantage 0"),
        ({"pass_k_objective": "pkpo", "pass_k_schedule": "8:5,1"}, r"pass_k=8 for pkpo"),
        ({"pass_k_objective": "pkpo", "pass_k": 3, "num_generations_eval": 2}, "num_generations_eval=2"),
    ],
)
def test_config_rejects_bad_values_in_one_line(cpu_args, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        _config(cpu_args, **overrides)
    assert "\n" not in str(error.value)


def test_grpo_objective_uses_scale_rewards_without_warning(cpu_args, recwarn):
    _config(cpu_args, pass_k_objective="grpo", scale_rewards="group")
    assert not [w for w in recwarn if "scale_rewards" in str(w.message)]
    with pytest.warns(UserWarning, match="scale_rewards='group' is ignored"):
        _config(cpu_args, pass_k_objective="pkpo", scale_rewards="group")


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", PASS_K_OBJECTIVES)
def test_the_shipped_recipe_builds_every_objective(objective):
    from align.training import parse_args

    _, args, _ = parse_args("pass_n", ["--config", str(RECIPE), "--pass_k_objective", objective])
    assert args.pass_k_objective == objective
    if objective in ("pkpo", "passk_analytic"):
        assert 1 <= args.pass_k_at(0) < args.num_generations


@pytest.mark.parametrize("objective", ["pkpo", "max_k_loo"])
def test_align_train_pass_n_with_an_objective(tiny_model_dir, tmp_path, objective):
    from align.commands.train import main

    recipe = tmp_path / "pass_n.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        "dataset_name: synthetic\nsynthetic_num_train: 8\n"
        "num_generations: 4\nmax_completion_length: 8\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 1\nper_device_train_batch_size: 8\n"
        "grader_workers: 1\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
        "bf16: false\nuse_cpu: true\ngradient_checkpointing: false\n"
    )
    argv = ["pass_n", "--config", str(recipe), "--pass_k_objective", objective, "--pass_k_schedule", "2:1,1"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_align_train_reports_a_bad_objective_in_one_line(tmp_path, capsys):
    from align.cli import main

    code = main(["train", "pass_n", "--config", str(RECIPE), "--pass_k_objective", "pkpo", "--pass_k", "9"])
    assert code != 0
    err = capsys.readouterr().err
    assert "pass_k=9 for pkpo must be <= num_generations=8" in err
    assert "Traceback" not in err
