"""`align.per_sample_grads` against one-sequence-at-a-time autograd (padding, LoRA through PEFT, a layer called twice,
both inner-product branches), and the one-backward normalized update of MarginPreferenceTrainer against its exact
per-sequence path."""

import pytest
import torch
from torch import nn

from align.per_sample_grads import LinearGradTape, unsupported_reason


class _SharedLayerNet(nn.Module):
    """Per-position MLP whose `shared` layer runs twice per forward; y_n = Σ_t mask_{n,t} out(h_{n,t})."""

    def __init__(self, dim):
        super().__init__()
        self.first = nn.Linear(dim, dim, bias=False)
        self.shared = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, 1, bias=False)

    def forward(self, x, mask):
        h = torch.tanh(self.shared(torch.tanh(self.first(x))))
        h = torch.tanh(self.shared(h))
        return (self.out(h).squeeze(-1) * mask).sum(dim=1)


def _one_at_a_time(value_of_row, params, num):
    """The exact per-sample gradients, one autograd.grad per sample: [[G_{n,p} for p] for n]."""
    return [list(torch.autograd.grad(value_of_row(n), params, allow_unused=True)) for n in range(num)]


def _close(got, want):
    """Equal to 1e-5 of the tensor's scale: a padded forward rounds differently from an unpadded one."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _check(grads, exact, params, num):
    flat = [torch.cat([g.reshape(-1) for g in per]).double() for per in exact]
    gram = torch.stack(flat) @ torch.stack(flat).T
    _close(grads.squared_norms(), gram.diagonal())
    left, right = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 3, 1, 3])
    _close(grads.inner_products(left, right), gram[left, right])
    for n in range(num):  # a one-hot weight picks G_n itself
        one_hot = torch.zeros(num).index_fill_(0, torch.tensor([n]), 1.0)
        for got, want in zip(grads.weighted_sum(one_hot), exact[n], strict=True):
            _close(got, want)
    weights = torch.randn(num, generator=torch.Generator().manual_seed(1))
    for k, got in enumerate(grads.weighted_sum(weights)):
        _close(got, sum(weights[n] * exact[n][k] for n in range(num)))


@pytest.mark.parametrize("dim", [4, 32])  # out·in below / above T·(in + out): from G_n, and from the token Grams
def test_matches_autograd_with_padding_and_a_layer_called_twice(dim):
    torch.manual_seed(0)
    model = _SharedLayerNet(dim)
    params = [model.first.weight, model.shared.weight, model.out.weight]
    lengths = [3, 1, 2, 3]
    x = torch.randn(len(lengths), max(lengths), dim)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).float()
    tape = LinearGradTape(model, params)
    with tape:
        y = model(x, mask)
    assert tape.num_calls == 4  # first, shared twice, out
    grads = tape.gradients(y)
    exact = _one_at_a_time(lambda n: model(x[n : n + 1, : lengths[n]], mask[n : n + 1, : lengths[n]])[0], params, 4)
    _check(grads, exact, params, 4)


def test_float32_under_bf16_autocast():
    """Under autocast the layers run in bf16; the per-sample sums are taken in float32 (float64 for inner products)."""
    torch.manual_seed(0)
    model = _SharedLayerNet(8)
    params = [model.first.weight, model.shared.weight, model.out.weight]
    x, mask = torch.randn(3, 4, 8), torch.ones(3, 4)
    tape = LinearGradTape(model, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with tape:
            y = model(x, mask)
        grads = tape.gradients(y.float())
        norms, sums = grads.squared_norms(), grads.weighted_sum(torch.ones(3))
    assert norms.dtype == torch.float64 and all(g.dtype == torch.float32 for g in sums)
    exact = torch.autograd.grad(model(x, mask).sum(), params)  # float32 throughout
    for got, want in zip(sums, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.log_probs import enable_fused_log_probs

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    enable_fused_log_probs(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero, which would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lora_sequence_log_probs_match_autograd(tiny_model_dir):
    from transformers import AutoTokenizer

    from align.log_probs import token_log_probs

    model = _lora_model(tiny_model_dir)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    assert unsupported_reason(model, params) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["What is 12 + 7? The answer is 19.", "3x + 5 = 20, so x = 5.", "4 + 9 = 13.", "Paris. Hello world!"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # right padding: rows of different lengths
    ids, attention = batch["input_ids"], batch["attention_mask"]
    assert attention.sum(1).unique().numel() > 1
    tape = LinearGradTape(model, params)
    with tape:
        with torch.no_grad(), model.disable_adapter():  # a reference forward: nothing to record
            token_log_probs(model, ids, attention, attention_mask=attention)
        assert tape.num_calls == 0
        log_probs, _ = token_log_probs(model, ids, attention, attention_mask=attention)
    assert tape.num_calls == len(params)
    grads = tape.gradients(log_probs.sum(dim=1))

    def row_logp(n):
        length = int(attention[n].sum())
        return token_log_probs(model, ids[n : n + 1, :length], attention[n : n + 1, :length])[0].sum()

    _check(grads, _one_at_a_time(row_logp, params, len(texts)), params, len(texts))


def test_unsupported_setups_are_named(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainable = [p for p in full.parameters() if p.requires_grad]
    assert "weight of Embedding, not of a plain nn.Linear" in unsupported_reason(full, trainable)
    assert "output embedding" in unsupported_reason(full, [full.lm_head.weight])
    layer = nn.Sequential(nn.Linear(3, 3))
    assert "0.bias is not the weight of an nn.Linear" in unsupported_reason(layer, [layer[0].bias])
    assert "trainable bias" in unsupported_reason(layer, [layer[0].weight])
    layer[0].bias.requires_grad_(False)
    assert unsupported_reason(layer, [layer[0].weight]) is None
    full.gradient_checkpointing_enable()
    assert "gradient checkpointing" in unsupported_reason(full, [full.model.layers[0].mlp.up_proj.weight])
    with pytest.raises(ValueError, match="cannot take per-sample gradients here"):
        LinearGradTape(full, trainable)


def _margin_trainer(model_dir, cpu_args, fast, **config):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from align.data.synthetic import generate_problems
    from align.data.training import preference_rows
    from align.models import build_lora_config
    from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

    fields = {**cpu_args, "per_device_train_batch_size": 2, "max_length": 256, "max_steps": 3, "learning_rate": 1e-3}
    trainer = MarginPreferenceTrainer(
        model=model_dir,
        args=MarginPreferenceConfig(**{**fields, **config}, normalize_pair_gradients=True),
        train_dataset=Dataset.from_list(preference_rows(generate_problems(12, "train", [1], 0))),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=build_lora_config(lora_r=4, lora_alpha=8, lora_dropout=0.0),
    )
    trainer.fast_normalized_update = fast
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_backward_update_equals_the_per_sequence_update(tiny_model_dir, cpu_args, accumulation):
    """Under LoRA the one-backward path is taken, and 3 AdamW steps land on the per-sequence path's parameters."""
    results = {}
    for fast in (True, False):
        trainer = _margin_trainer(tiny_model_dir, cpu_args, fast, gradient_accumulation_steps=accumulation)
        trainer.train()
        assert trainer.normalized_update_path == ("one_backward" if fast else "per_sequence")
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[fast] = params, losses
    (fast_params, fast_losses), (exact_params, exact_losses) = results[True], results[False]
    assert len(fast_losses) == 3
    assert fast_losses == pytest.approx(exact_losses, rel=1e-5)
    # AdamW's first steps are ≈ lr·g/(|g| + ε): a coordinate whose gradient is ~1e-5 of the typical one turns the two
    # paths' float32 rounding (their gradients agree to 1e-5 of scale, test below) into a few % of its step, so the
    # absolute tolerance is 1% of one step (lr = 1e-3). Adam is blind to a gradient's scale: the test below checks it.
    for name, value in fast_params.items():
        torch.testing.assert_close(value, exact_params[name], rtol=1e-4, atol=1e-5)


def test_one_backward_gradient_equals_the_per_sequence_gradient(tiny_model_dir, cpu_args):
    """The gradient of one micro-batch, LoRA B randomized so that every gradient is non-trivial."""
    grads = {}
    for fast in (True, False):
        trainer = _margin_trainer(tiny_model_dir, cpu_args, fast)
        model = trainer.model
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert trainer.normalized_update_path == ("one_backward" if fast else "per_sequence")
        grads[fast] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys()
    for name, value in grads[True][1].items():
        torch.testing.assert_close(value, grads[False][1][name], rtol=1e-5, atol=1e-8)


def test_regex_parameters_fall_back_to_the_per_sequence_path(tiny_model_dir, cpu_args):
    trainer = _margin_trainer(tiny_model_dir, cpu_args, True, entanglement_params=r"layers\.1\.", max_steps=1)
    trainer.train()
    assert trainer.normalized_update_path == "per_sequence"


_DDP_SCRIPT = """
import json, sys, torch
from datasets import Dataset
from transformers import AutoTokenizer
from align.data.synthetic import generate_problems
from align.data.training import preference_rows
from align.models import build_lora_config
from align.trainers.margin import MarginPreferenceConfig, MarginPreferenceTrainer

model_dir, output_dir, fast = sys.argv[1], sys.argv[2], sys.argv[3] == "fast"
args = MarginPreferenceConfig(
    output_dir=output_dir, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False,
    save_strategy="no", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
    learning_rate=1e-3, normalize_pair_gradients=True, disable_tqdm=True, ddp_find_unused_parameters=False,
)
trainer = MarginPreferenceTrainer(
    model=model_dir, args=args, train_dataset=Dataset.from_list(preference_rows(generate_problems(16, "train", [1]))),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
    peft_config=build_lora_config(lora_r=4, lora_alpha=8, lora_dropout=0.0),
)
trainer.fast_normalized_update = fast
trainer.train()
model = trainer.accelerator.unwrap_model(trainer.model)
params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
flat = torch.cat([params[n].double().flatten() for n in sorted(params)])
gathered = [torch.zeros_like(flat) for _ in range(2)]
torch.distributed.all_gather(gathered, flat)
if trainer.accelerator.is_main_process:
    torch.save(params, output_dir + "/params.pt")
    print("RESULT " + json.dumps({"world": trainer.accelerator.num_processes, "path": trainer.normalized_update_path,
                                   "max_param_diff": float((gathered[0] - gathered[1]).abs().max())}), flush=True)
from align.cli import exit_without_teardown
trainer.accelerator.wait_for_everyone()
exit_without_teardown()
"""


@pytest.mark.distributed
def test_ddp_one_backward_update_equals_the_per_sequence_update(tiny_model_dir, tmp_path):
    """Two CPU processes (gloo), LoRA, 2 accumulation steps: DDP averages the one-backward update as the exact one."""
    import json
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_normalized.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    params = {}
    for path in ("fast", "exact"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        output_dir = tmp_path / path
        output_dir.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        proc = subprocess.run(
            [*command, str(script), tiny_model_dir, str(output_dir), path],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        expected_path = "one_backward" if path == "fast" else "per_sequence"
        assert result == {"world": 2, "path": expected_path, "max_param_diff": 0.0}
        params[path] = torch.load(output_dir / "params.pt")
    for name, value in params[
        "fast"
    ].items():  # tolerance: see test_one_backward_update_equals_the_per_sequence_update
        torch.testing.assert_close(value, params["exact"][name], rtol=1e-4, atol=1e-5)
