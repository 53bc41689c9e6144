"""The tiny fixture model fits TRL 1.16 on CPU: SFT and DPO each train two steps."""

from datasets import Dataset


def _sft_dataset():
    prompts = ["What is $12 + 7$?", "What is $30 - 4$?", "Solve for $x$: $2x = 8$.", "What is $5 + 5$?"]
    answers = ["19", "26", "4", "10"]
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p}],
                "completion": [{"role": "assistant", "content": f"The answer is $\\boxed{{{a}}}$."}],
            }
            for p, a in zip(prompts, answers)
        ]
    )


def test_sft_trainer_two_steps(tiny_model_dir, cpu_args):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, max_length=128, **cpu_args)
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_sft_dataset())
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0


def test_sft_assistant_only_loss_uses_generation_markers(tiny_model_dir, cpu_args):
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "What is $1 + 1$?"},
                    {"role": "assistant", "content": "$\\boxed{2}$"},
                ]
            }
        ]
        * 4
    )
    args = SFTConfig(max_steps=2, per_device_train_batch_size=2, assistant_only_loss=True, max_length=128, **cpu_args)
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    row = trainer.train_dataset[0]
    assert 0 < sum(label != -100 for label in row["labels"]) < len(row["labels"])
    assert trainer.train().global_step == 2


def test_dpo_trainer_two_steps(tiny_model_dir, cpu_args):
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is ${a} + {a}$?"}],
                "chosen": [{"role": "assistant", "content": f"$\\boxed{{{2 * a}}}$"}],
                "rejected": [{"role": "assistant", "content": f"$\\boxed{{{2 * a + 1}}}$"}],
            }
            for a in range(4)
        ]
    )
    args = DPOConfig(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, max_length=128, **cpu_args)
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2
    first_loss = trainer.state.log_history[0]["loss"]
    assert abs(first_loss - 0.6931) < 1e-3  # policy == reference at step 0: -log sigmoid(0)
