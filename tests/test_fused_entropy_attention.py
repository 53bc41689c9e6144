"""`entropy_fused` attention: the LSE identity, equal to `entropy_eager` (values and gradients), no T x T tensor."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.masking_utils import causal_mask_function, eager_mask

import align.attention.fused as fused
from align.attention.fused import ATTENTION_IMPLEMENTATION, KERNELS, entropy_fused_attention, fused_mask
from align.attention.kernel import entropy_eager_attention
from align.attention.parameters import PARAMETERS_ATTRIBUTE, AttentionEntropyParameters
from align.attention.recorder import AttentionEntropyRecorder
from align.losses.attention_entropy import attention_entropy_penalty, row_entropy
from align.trainers.entropy_config import ATTENTION_ENTROPY_KERNELS


def padding(batch: int, length: int, kind: str) -> torch.Tensor | None:
    """2-D attention masks: none, left or right padding of varying length, and one fully padded sequence."""
    if kind == "none":
        return None
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row in range(batch):
        pads = (row + 1) * length // (batch + 1)
        if kind == "left":
            mask[row, :pads] = False
        elif kind == "right":
            mask[row, length - pads :] = False
    if kind == "full_row":
        mask[-1] = False
    return mask


def module_with_parameters(heads: int, temperature: bool, seed: int = 0):
    """A stand-in attention module (layer 0) with learnable thresholds and, optionally, temperatures attached."""
    module = SimpleNamespace(layer_idx=0, is_causal=True, training=True)
    parameters = AttentionEntropyParameters(1, heads, threshold_init=0.4, learn_temperature=temperature).double()
    if temperature:
        with torch.no_grad():
            parameters.log_temperature.copy_(
                0.5 * torch.randn(1, heads, generator=torch.Generator().manual_seed(seed))
            )
    setattr(module, PARAMETERS_ATTRIBUTE, parameters)
    return module, parameters


def run(implementation, module, parameters, q, k, v, mask2d, convention="paper", normalization="context"):
    """Output (valid rows), recorded entropies and the gradients of a penalty + output loss, in the inputs' dtype."""
    batch, _, length, _ = q.shape
    arguments = dict(batch_size=batch, q_length=length, kv_length=length, mask_function=causal_mask_function)
    if implementation is entropy_fused_attention:
        mask = fused_mask(**arguments, attention_mask=mask2d, dtype=q.dtype)
    else:
        mask = eager_mask(**arguments, attention_mask=mask2d, dtype=q.dtype)
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    recorder = AttentionEntropyRecorder()
    with recorder:
        output, _ = implementation(module, *inputs, mask)
    (record,) = recorder.layer_records()
    valid = record.valid_rows
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(3), dtype=output.dtype)
    penalty = attention_entropy_penalty([record], parameters.thresholds(), 0.05, convention, normalization)
    loss = penalty + (torch.where(valid[:, :, None, None], output, 0) * weights).sum()
    leaves = [*inputs, *parameters.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    entropy = torch.where(valid[:, None], record.entropy, 0).detach()
    return {
        "output": torch.where(valid[:, :, None, None], output, 0).detach(),
        "entropy": entropy,
        "penalty": penalty.detach(),
        "grads": grads,
        "valid": valid,
        "visible": record.visible_keys,
        "max_logit": record.max_logit,
    }


def assert_same(fused_run, eager_run, atol=1e-5, rtol=1e-5):
    for name in ("output", "entropy", "penalty", "max_logit"):
        torch.testing.assert_close(fused_run[name].double(), eager_run[name].double(), atol=atol, rtol=rtol)
    assert torch.equal(fused_run["valid"], eager_run["valid"])
    assert torch.equal(fused_run["visible"].long(), eager_run["visible"].long())
    for got, expected in zip(fused_run["grads"], eager_run["grads"], strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got.double(), expected.double(), atol=atol, rtol=rtol)


def random_qkv(batch, heads, kv_heads, length, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64) * 2
    k = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --- the identity, in float64 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "left", "right"])
def test_identity_gives_the_entropy_and_its_gradient_in_float64(kind):
    """H = LSE - scale q.(sum p k), stop-gradients, vs -sum p log p of an explicit softmax: 1e-12, value and grad."""
    batch, heads, kv_heads, length, dim = 2, 6, 2, 9, 8
    q, k, v = random_qkv(batch, heads, kv_heads, length, dim, torch.float64)
    mask2d = padding(batch, length, kind)
    module, parameters = module_with_parameters(heads, temperature=True)
    temperature = parameters.log_temperature[0].exp().detach()
    scale = dim**-0.5
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if mask2d is not None:
        visible = visible & mask2d[:, None, None, :]
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    scores = (
        (qr @ kr.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * scale / temperature.view(1, -1, 1, 1)
    )
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
    real = visible.any(-1)[:, 0]  # rows that see at least one key
    expected = torch.where(real[:, None], row_entropy(torch.nan_to_num(probs)), 0)
    weights = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (qr, kr))

    mask = fused_mask(batch, length, length, attention_mask=mask2d, dtype=torch.float64)
    qf, kf = q.clone().requires_grad_(), k.clone().requires_grad_()
    recorder = AttentionEntropyRecorder()
    with recorder:
        entropy_fused_attention(module, qf, kf, v, mask)
    entropy = torch.where(real[:, None], recorder.records[0].entropy, 0)
    grads = torch.autograd.grad((entropy * weights).sum(), (qf, kf))
    torch.testing.assert_close(entropy, expected, atol=1e-12, rtol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


# --- equal to the eager reference, fp32: values and gradients (q, k, v, thresholds, temperature) -----------------


CASES = [
    # batch, heads, kv_heads, length, dim, padding
    (2, 4, 2, 13, 8, "none"),
    (3, 4, 2, 13, 8, "left"),
    (3, 6, 3, 11, 16, "right"),
    (3, 3, 1, 10, 8, "full_row"),  # odd head count, GQA 3:1, one fully padded sequence
    (2, 5, 5, 7, 4, "left"),  # odd head count, no GQA
    (2, 4, 2, 1, 8, "none"),  # T = 1
    (2, 4, 2, 1, 8, "full_row"),  # T = 1, one sequence padded away
]


@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_equals_eager_fp32(case, temperature):
    batch, heads, kv_heads, length, dim, kind = case
    q, k, v = random_qkv(batch, heads, kv_heads, length, dim)
    mask2d = padding(batch, length, kind)
    runs = {}
    for implementation in (entropy_fused_attention, entropy_eager_attention):
        module, parameters = module_with_parameters(heads, temperature)
        parameters.float()
        runs[implementation] = run(implementation, module, parameters, q, k, v, mask2d)
    assert_same(runs[entropy_fused_attention], runs[entropy_eager_attention])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    length=st.integers(1, 12),
    dim=st.sampled_from([4, 8]),
    kind=st.sampled_from(["none", "left", "right", "full_row"]),
    convention=st.sampled_from(["paper", "code"]),
    normalization=st.sampled_from(["context", "visible"]),
    temperature=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_penalty_and_gradients_match_eager_on_random_shapes(
    batch, kv_heads, groups, length, dim, kind, convention, normalization, temperature, seed
):
    heads = kv_heads * groups
    q, k, v = random_qkv(batch, heads, kv_heads, length, dim, seed=seed)
    mask2d = padding(batch, length, kind)
    runs = []
    for implementation in (entropy_fused_attention, entropy_eager_attention):
        module, parameters = module_with_parameters(heads, temperature, seed)
        parameters.float()
        runs.append(run(implementation, module, parameters, q, k, v, mask2d, convention, normalization))
    assert_same(*runs)


def test_bf16_within_bf16_tolerance_of_the_fp32_reference():
    """bf16 inputs: the fused entropies are as close to the fp32 reference as eager's own bf16 entropies (or 0.05)."""
    batch, heads, kv_heads, length, dim = 2, 6, 2, 64, 32
    q, k, v = random_qkv(batch, heads, kv_heads, length, dim, torch.bfloat16)
    mask2d = padding(batch, length, "right")
    results = {}
    for name, implementation, dtype in (
        ("fused", entropy_fused_attention, torch.bfloat16),
        ("eager", entropy_eager_attention, torch.bfloat16),
        ("reference", entropy_eager_attention, torch.float32),
    ):
        module, parameters = module_with_parameters(heads, temperature=False)
        parameters.to(dtype)
        results[name] = run(implementation, module, parameters, q.to(dtype), k.to(dtype), v.to(dtype), mask2d)
    reference = results["reference"]
    for name in ("entropy", "output"):
        fused_error = (results["fused"][name].float() - reference[name]).abs().max()
        eager_error = (results["eager"][name].float() - reference[name]).abs().max()
        assert fused_error <= max(2 * eager_error, 0.05), (name, fused_error, eager_error)
    for got, want in zip(results["fused"]["grads"][:3], reference["grads"][:3], strict=True):
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= 0.05 * scale


# --- max logit, fallbacks, registration --------------------------------------------------------------------------


def test_max_logit_is_skipped_unless_the_recorder_asks_for_it():
    q, k, v = random_qkv(2, 4, 2, 9, 8)
    module, _ = module_with_parameters(4, temperature=False)
    for wanted in (True, False):
        recorder = AttentionEntropyRecorder(record_max_logit=wanted)
        with recorder:
            entropy_fused_attention(module, q, k, v, None)
        value = recorder.records[0].max_logit
        assert torch.isfinite(value) if wanted else value.item() == -math.inf


@pytest.mark.parametrize("block", [1, 4, 64])
def test_blockwise_stats_equal_the_full_scores(block):
    q, k, _ = random_qkv(2, 4, 2, 11, 8, torch.float64)
    mask = fused_mask(2, 11, 11, attention_mask=padding(2, 11, "left"), dtype=torch.float64)
    for attn_mask, causal in ((None, True), (mask, False), (None, False)):
        lse, best = fused.blockwise_score_stats(q, k, attn_mask, causal, 0.3, block=block)
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
        if attn_mask is not None:
            scores = scores + attn_mask
        elif causal:
            scores = scores.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), -math.inf)
        expected = torch.logsumexp(scores, -1)
        torch.testing.assert_close(lse.double(), expected.nan_to_num(neginf=0.0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(best.double(), scores.amax().double())


def test_softcap_falls_back_to_eager_with_one_log_line(caplog):
    q, k, v = random_qkv(2, 4, 2, 9, 8)
    module, _ = module_with_parameters(4, temperature=False)
    fused._fallbacks_logged.clear()
    mask = fused_mask(2, 9, 9, attention_mask=padding(2, 9, "right"), dtype=torch.float32)
    reference = eager_mask(2, 9, 9, attention_mask=padding(2, 9, "right"), dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="align.attention.fused"):
        outputs = [entropy_fused_attention(module, q, k, v, mask, softcap=5.0)[0] for _ in range(3)]
        outputs.append(entropy_fused_attention(module, q, k, v, None, softcap=5.0)[0])
    assert len([r for r in caplog.records if "soft-capping" in r.message]) == 1
    expected = entropy_eager_attention(module, q, k, v, reference, softcap=5.0)[0]
    torch.testing.assert_close(outputs[0], expected)
    no_padding = entropy_eager_attention(module, q, k, v, eager_mask(2, 9, 9, dtype=torch.float32), softcap=5.0)[0]
    torch.testing.assert_close(outputs[-1], no_padding)


def test_dropout_in_training_falls_back_and_sinks_are_refused():
    q, k, v = random_qkv(1, 4, 2, 5, 8)
    module, _ = module_with_parameters(4, temperature=False)
    torch.manual_seed(0)
    dropped = entropy_fused_attention(module, q, k, v, None, dropout=0.5)[0]
    torch.manual_seed(0)
    expected = entropy_eager_attention(module, q, k, v, eager_mask(1, 5, 5, dtype=torch.float32), dropout=0.5)[0]
    torch.testing.assert_close(dropped, expected)
    with pytest.raises(NotImplementedError, match="s_aux"):
        entropy_fused_attention(module, q, k, v, None, s_aux=torch.zeros(4))


def test_kernel_names_and_mask_registration():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert set(KERNELS) == set(ATTENTION_ENTROPY_KERNELS)
    assert AttentionInterface._global_mapping[ATTENTION_IMPLEMENTATION] is entropy_fused_attention
    assert AttentionMaskInterface._global_mapping[ATTENTION_IMPLEMENTATION] is fused_mask
    assert fused_mask(2, 7, 7, attention_mask=torch.ones(2, 7, dtype=torch.bool)) is None  # causal alone suffices
    padded = fused_mask(2, 7, 7, attention_mask=padding(2, 7, "left"), dtype=torch.bfloat16)
    assert padded.shape == (2, 1, 7, 7) and padded.dtype == torch.bfloat16  # additive, once per forward


# --- on a real (tiny) model -------------------------------------------------------------------------------------


def load(path, implementation):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation)


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_model_logits_and_records_equal_eager(tiny_model_dir, side):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = side
    texts = ["What is 12 + 7? First add the tens.", "Solve for x: 3x + 5 = 20."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    results = {}
    for implementation in KERNELS.values():
        recorder = AttentionEntropyRecorder(include_no_grad=True)
        with recorder, torch.no_grad():
            logits = load(tiny_model_dir, implementation)(**batch).logits[real]
        results[implementation] = (logits, recorder.layer_records())
    (fused_logits, fused_records), (eager_logits, eager_records) = results.values()
    assert (fused_logits - eager_logits).abs().max() <= 1e-5
    for got, want in zip(fused_records, eager_records, strict=True):
        assert torch.equal(got.valid_rows, want.valid_rows) and torch.equal(got.visible_keys, want.visible_keys)
        rows = got.valid_rows[:, None].expand_as(got.entropy)
        torch.testing.assert_close(got.entropy[rows], want.entropy[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.max_logit, want.max_logit, atol=1e-5, rtol=1e-6)


LENGTH = 37  # distinct from every other dimension of the tiny model and batch


class NoSquareTensors(TorchDispatchMode):
    """Fails on any op output with two dimensions of size LENGTH, except (when `allowed` > 0) tensors of at most
    `allowed` elements: the one (batch, 1, T, T) padding mask and reductions of it, never heads x T x T."""

    def __init__(self, allowed: int = 0):
        super().__init__()
        self.allowed, self.seen = allowed, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else (result,):
            if isinstance(tensor, torch.Tensor) and _square(tensor, self.allowed):
                self.seen.append((str(func), tuple(tensor.shape)))
        return result


def _square(tensor: torch.Tensor, allowed: int) -> bool:
    return list(tensor.shape).count(LENGTH) >= 2 and tensor.numel() > allowed


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_no_heads_by_T_by_T_tensor_in_forward_or_saved_for_backward(tiny_model_dir, monkeypatch, side):
    from transformers import AutoTokenizer

    monkeypatch.setattr(fused, "QUERY_BLOCK", 8)  # blocks of 8 < T query rows in the max-logit pass
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (2, LENGTH), generator=generator)
    attention = torch.ones_like(ids)
    if side == "right":
        attention[1, -9:] = 0
    elif side == "left":
        attention[1, :9] = 0
    labels = ids.masked_fill(attention == 0, -100)
    model = load(tiny_model_dir, ATTENTION_IMPLEMENTATION)
    model.train()
    batch = ids.shape[0]
    allowed = 0 if side == "none" else batch * LENGTH * LENGTH  # the padding mask: batch x 1 x T x T at most
    saved = []

    def pack(tensor):
        if _square(tensor, allowed):
            saved.append(tuple(tensor.shape))
        return tensor

    recorder = AttentionEntropyRecorder(record_max_logit=True)
    mode = NoSquareTensors(allowed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), mode:
        with recorder:
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        thresholds = torch.full((2, 4), 0.9)
        penalty = attention_entropy_penalty(recorder.layer_records(), thresholds, 0.05)
        (loss + penalty).backward()
    assert len(recorder.records) == 2 and torch.isfinite(recorder.records[0].max_logit)
    assert penalty > 0 and model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert mode.seen == [], mode.seen[:5]
    assert saved == [], saved[:5]


def test_diagnose_attention_packs_texts_and_both_kernels_agree(tiny_model_dir, tmp_path, capsys):
    import json

    from align.cli import main

    reports = {}
    for kernel in ("fused", "eager"):
        out = tmp_path / kernel
        arguments = ["diagnose", "attention", "--model", tiny_model_dir, "--dataset", "synthetic", "--limit", "20"]
        arguments += ["--pack-length", "96", "--num-sequences", "3", "--batch-size", "2", "--kernel", kernel]
        assert main([*arguments, "--output-dir", str(out), "--device", "cpu"]) == 0
        reports[kernel] = json.loads((out / "attention_entropy.json").read_text())
        assert (out / "attention_entropy.png").read_bytes()[:4] == b"\x89PNG"
    fused_report, eager_report = reports["fused"], reports["eager"]
    assert fused_report["read"] == "3 x 96 packed tokens" and fused_report["kernel"] == "fused"
    for key in ("entropy_nats", "entropy_normalized_visible"):
        torch.testing.assert_close(torch.tensor(fused_report[key]), torch.tensor(eager_report[key]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(fused_report["summary"]["layer_max_logit"]),
        torch.tensor(eager_report["summary"]["layer_max_logit"]),
        atol=1e-5,
        rtol=1e-6,
    )
    too_many = ["diagnose", "attention", "--model", tiny_model_dir, "--dataset", "synthetic", "--limit", "2"]
    too_many += ["--pack-length", "4096", "--output-dir", str(tmp_path / "x"), "--device", "cpu"]
    assert main(too_many) != 0
    assert "not enough for 1 packed sequences of 4096 tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_fused_equals_eager_with_left_padding(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.padding_side = "left"
    texts = ["Compute 3 + 4 and explain each step of the addition carefully.", "Hello!"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    results = {}
    for implementation in KERNELS.values():
        recorder = AttentionEntropyRecorder(include_no_grad=True)
        with recorder, torch.no_grad():
            logits = load(smollm2_path, implementation)(**batch).logits[real]
        results[implementation] = (logits, recorder.layer_records())
    (fused_logits, fused_records), (eager_logits, eager_records) = results.values()
    scale = eager_logits.abs().max()  # logits reach ~35: fp32 summation order moves them by ~1e-5 relative
    assert (fused_logits - eager_logits).abs().max() <= 1e-5 * scale
    assert len(fused_records) == 30
    for got, want in zip(fused_records, eager_records, strict=True):
        rows = got.valid_rows[:, None].expand_as(got.entropy)
        torch.testing.assert_close(got.entropy[rows], want.entropy[rows], atol=1e-4, rtol=0)
        torch.testing.assert_close(got.max_logit, want.max_logit, atol=1e-4, rtol=1e-5)


def test_under_bf16_autocast_the_layers_share_one_converted_mask(tiny_model_dir):
    """The mask is made in the embeddings' dtype (fp32); bf16 queries need a bf16 copy: one for all layers."""
    model = load(tiny_model_dir, ATTENTION_IMPLEMENTATION)
    model.train()
    ids = torch.randint(3, 100, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, :9] = 0
    masks = set()

    def pack(tensor):
        if list(tensor.shape) == [2, 1, LENGTH, LENGTH]:
            masks.add((tensor.untyped_storage().data_ptr(), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=attention, labels=ids).loss
    loss.backward()
    assert len(masks) == 1, masks
    assert next(iter(masks))[1] == torch.bfloat16
