"""`report_to: tensorboard` (the `tracking` extra, in the dev setup too): a run writes TensorBoard event files."""

from align.cli import main


def test_a_run_with_report_to_tensorboard_writes_event_files_with_the_training_loss(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""
model_name_or_path: {tiny_model_dir}
dataset_name: synthetic
synthetic_num_train: 2
output_dir: {out}
max_steps: 1
per_device_train_batch_size: 2
max_length: 128
logging_steps: 1
bf16: false
use_cpu: true
gradient_checkpointing: false
report_to: tensorboard
save_strategy: "no"
""")
    assert main(["train", "sft", "--config", str(recipe)]) == 0
    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out / 'runs'}"
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    (loss,) = accumulator.Scalars("train/loss")
    assert loss.step == 1 and loss.value > 0
