"""The DCO loss (align.losses.coverage) against closed forms, high-precision references and autograd."""

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.losses.coverage import (
    coverage,
    coverage_loss,
    coverage_weight,
    dco_estimated_loss,
    dco_loss,
    log1mexp,
    segment_log_probs,
    sequence_log_probs,
)


mpmath.mp.dps = 60

# methods.md §2.8: (N, p, F(N, p), ℓ_DCO), values rounded to 6 decimals.
CLOSED_FORM = [
    (1, 0.3, 1.000000, 1.203973),
    (2, 0.5, 0.666667, 0.287682),
    (4, 0.5, 0.266667, 0.064539),
    (8, 0.5, 0.031373, 0.003914),
    (4, 0.1, 0.847921, 1.067404),
    (16, 0.1, 0.404353, 0.204938),
    (256, 1 / 256, 0.582453, 0.457537),
    (256, 0.01, 0.213644, 0.079384),
]
BUDGETS = [1, 2, 16, 256, 1e6]
# s = log p̂ from -1e5 to -1e-12 (log-spaced), plus the switch region of the small-p̂ branch and s = 0.
S_GRID = sorted({-(10.0**e) for e in torch.linspace(-12, 5, 69).tolist()} | {-15.5, -15.6, -23.8, -24.0, 0.0})


def reference(s: float, n: float) -> tuple[float, float, float]:
    """(ℓ, F, C) of s = log p̂ in 60-digit arithmetic, straight from the definitions."""
    s, n = mpmath.mpf(s), mpmath.mpf(n)
    if s == 0:  # p̂ = 1: C = 1, and F = 1 for N = 1 (cross-entropy), 0 otherwise
        return 0.0, 1.0 if n == 1 else 0.0, 1.0
    p = mpmath.exp(s)
    # log(1 - p̂) without losing digits at either end (p̂ = e^-1e5 or p̂ = 1 - 1e-114)
    log_q = mpmath.log(-mpmath.expm1(s)) if s > -1 else mpmath.log1p(-p)
    c = -mpmath.expm1(n * log_q)
    # -log(c) loses every digit when c = 1 - 1e-300; -log1p(-(1 - p̂)^N) loses them when c = 1e-300.
    loss = -mpmath.log(c) if c < 0.5 else -mpmath.log1p(-mpmath.exp(n * log_q))
    weight = n * p * mpmath.exp((n - 1) * log_q) / c
    return float(loss), float(weight), float(c)


def assert_close(got: float, expected: float, rtol: float, atol: float, what: str):
    assert math.isfinite(got), f"{what}: got {got}"
    assert abs(got - expected) <= rtol * abs(expected) + atol, f"{what}: got {got!r}, expected {expected!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "p", "weight", "loss"), CLOSED_FORM)
def test_closed_form_table(n, p, weight, loss, dtype):
    s = torch.tensor(math.log(p), dtype=dtype)
    assert_close(coverage_weight(s, n).item(), weight, 0, 1e-6, f"F({n}, {p})")
    assert_close(coverage_loss(s, n).item(), loss, 0, 1e-6, f"ℓ({n}, {p})")
    assert_close(coverage(s, n).item(), math.exp(-loss), 0, 1e-6, f"C({n}, {p})")


def test_closed_form_tiny_weight_row():
    # N = 256, p = 0.1: F ≈ 5.50e-11 and ℓ ≈ 1.93e-12, checked relatively.
    s = torch.tensor(math.log(0.1))
    assert coverage_weight(s, 256).item() == pytest.approx(5.50e-11, rel=2e-3)
    assert coverage_loss(s, 256).item() == pytest.approx(1.93e-12, rel=2e-3)


def test_cross_entropy_is_n_equals_one():
    s = torch.tensor([-1e5, -30.0, -1.2, -1e-9, 0.0])
    assert torch.equal(coverage_loss(s, 1), -s)
    assert torch.equal(coverage_weight(s, 1), torch.ones_like(s))


def test_underflow_cases():
    # p̂ = e^-1000 underflows in every float format; the small-p̂ branch gives ℓ = -s - log N and F = 1.
    assert coverage_loss(torch.tensor(-1000.0), 256).item() == pytest.approx(994.454823, abs=1e-4)
    assert coverage_loss(torch.tensor(-1000.0, dtype=torch.float64), 256).item() == pytest.approx(994.454823, abs=1e-6)
    assert coverage_weight(torch.tensor(-1000.0), 256).item() == 1.0
    assert coverage_loss(torch.tensor(-50.0), 256).item() == pytest.approx(44.454823, abs=1e-5)
    assert coverage_loss(torch.tensor(-50.0, dtype=torch.float64), 256).item() == pytest.approx(44.454823, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_certain_case(dtype):
    # s = -1e-9, N = 4: 1 - p̂ ≈ 1e-9, so F ≈ 4 (1e-9)^3 = 4e-27 and ℓ ≈ (1e-9)^4 = 1e-36.
    s = torch.tensor(-1e-9, dtype=dtype)
    assert coverage_weight(s, 4).item() == pytest.approx(4.0e-27, rel=1e-5)
    assert coverage_loss(s, 4).item() == pytest.approx(1e-36, rel=1e-5)


def test_branches_agree_at_the_switch():
    # s + log N = -10 at s = -10 - log 256 ≈ -15.545: just either side, both forms give the reference value.
    for s in (-15.5, -15.6):
        expected_loss, expected_weight, _ = reference(s, 256)
        t = torch.tensor(s, dtype=torch.float64)
        assert_close(coverage_loss(t, 256).item(), expected_loss, 1e-12, 0, f"ℓ at s={s}")
        assert_close(coverage_weight(t, 256).item(), expected_weight, 1e-9, 0, f"F at s={s}")


@pytest.mark.parametrize("n", BUDGETS)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 2e-5), (torch.bfloat16, 2e-5)], ids=str
)
def test_grid_matches_high_precision_reference(n, dtype, rtol):
    s = torch.tensor(S_GRID, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    tiny = torch.finfo(compute).tiny
    losses, weights, covers = coverage_loss(s, n), coverage_weight(s, n), coverage(s, n)
    assert losses.dtype == weights.dtype == compute  # bf16 inputs are computed in fp32
    for i, value in enumerate(s.tolist()):  # the reference is taken at the (possibly bf16-rounded) input
        expected_loss, expected_weight, expected_cover = reference(value, n)
        where = f"N={n}, s={value}"
        assert_close(losses[i].item(), expected_loss, rtol, tiny, f"ℓ {where}")
        assert_close(weights[i].item(), expected_weight, rtol, tiny, f"F {where}")
        assert_close(covers[i].item(), expected_cover, rtol, tiny, f"C {where}")


@pytest.mark.parametrize("n", BUDGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_no_nan_or_inf_in_loss_or_gradient(n, dtype):
    s = torch.tensor(S_GRID, dtype=dtype, requires_grad=True)
    loss = coverage_loss(s, n)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    weight = coverage_weight(s, n)
    assert ((weight >= 0) & (weight <= 1)).all()


def test_gradient_is_minus_weight_by_finite_differences():
    # methods.md §2.8: N = 8, p = 0.2, a finite difference of ℓ in s gives -0.403188 = -F(8, 0.2).
    s0, h = math.log(0.2), 1e-6
    loss = lambda s: coverage_loss(torch.tensor(s, dtype=torch.float64), 8).item()  # noqa: E731
    finite_difference = (loss(s0 + h) - loss(s0 - h)) / (2 * h)
    assert finite_difference == pytest.approx(-0.403188, abs=1e-6)
    assert coverage_weight(torch.tensor(s0, dtype=torch.float64), 8).item() == pytest.approx(0.403188, abs=1e-6)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    coverage_loss(s, 8).backward()
    assert s.grad.item() == pytest.approx(finite_difference, abs=1e-8)


@pytest.mark.parametrize("n", [1, 2, 8, 256, 1e6])
def test_backward_matches_finite_differences_of_forward(n):
    # gradcheck compares the analytic backward (-F) with central differences of the forward on both branches.
    s = torch.tensor([-2e3, -60.0, -20.0, -5.0, -1.0, -0.3, -1e-2, -1e-4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: coverage_loss(x, n), (s,), eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 5, 16, 256])
def test_weight_equals_autograd_of_naive_formula(n):
    # Where the textbook formula is well conditioned, autograd through it gives -F independently of our backward.
    s = torch.linspace(-6.0, -0.05, 40, dtype=torch.float64, requires_grad=True)
    naive = -torch.log(1 - (1 - torch.exp(s)) ** n)
    (grad,) = torch.autograd.grad(naive.sum(), s)
    torch.testing.assert_close(-grad, coverage_weight(s, n), rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    s=st.floats(min_value=-1e5, max_value=0.0, allow_nan=False),
    n=st.floats(min_value=1.0, max_value=1e6, allow_nan=False),
)
def test_random_points_match_reference(s, n):
    expected_loss, expected_weight, _ = reference(s, n)
    t = torch.tensor(s, dtype=torch.float64)
    assert_close(coverage_loss(t, n).item(), expected_loss, 1e-9, 1e-300, f"ℓ(s={s}, N={n})")
    assert_close(coverage_weight(t, n).item(), expected_weight, 1e-8, 1e-300, f"F(s={s}, N={n})")


@settings(max_examples=100, deadline=None)
@given(
    s=st.lists(st.floats(min_value=-200.0, max_value=0.0), min_size=2, max_size=8),
    n=st.floats(min_value=1.0, max_value=1e4),
)
def test_weight_decreases_with_confidence_and_loss_with_budget(s, n):
    t = torch.tensor(sorted(s), dtype=torch.float64)  # increasing p̂
    weight = coverage_weight(t, n)
    assert (weight.diff() <= 1e-12).all()
    assert (coverage_loss(t, n + 1) <= coverage_loss(t, n) + 1e-12).all()


def test_log1mexp_matches_definition_and_ends():
    x = torch.tensor([-50.0, -3.0, -0.7, -0.69, -1e-3, -1e-10], dtype=torch.float64)
    expected = torch.tensor([float(mpmath.log(1 - mpmath.exp(v))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-13, atol=0)
    ends = log1mexp(torch.tensor([0.0, -math.inf]))
    assert ends[0].item() == -math.inf and ends[1].item() == 0.0


def test_per_example_budget_equals_scalar_budgets():
    s = torch.tensor([-40.0, -3.0, -0.5, -0.01])
    n = torch.tensor([1.0, 4.0, 16.0, 256.0])
    per_example = coverage_loss(s, n)
    one_by_one = torch.stack([coverage_loss(s[i], n[i].item()) for i in range(4)])
    torch.testing.assert_close(per_example, one_by_one, rtol=0, atol=0)
    torch.testing.assert_close(
        coverage_weight(s, n), torch.stack([coverage_weight(s[i], n[i].item()) for i in range(4)]), rtol=0, atol=0
    )


@pytest.mark.parametrize("n", [0, 0.5, -3, math.nan, math.inf, torch.tensor([2.0, 0.0])])
def test_invalid_budget_is_rejected(n):
    with pytest.raises(ValueError, match="N must be finite and >= 1"):
        coverage_loss(torch.tensor([-1.0, -2.0]), n)


def test_budget_shape_must_broadcast():
    with pytest.raises(ValueError, match="does not broadcast"):
        coverage_loss(torch.tensor([-1.0, -2.0]), torch.tensor([2.0, 3.0, 4.0]))


def test_filtering_drops_exactly_the_low_weight_sequences():
    # N = 16: confident sequences (p̂ near 1) have F far below ε = 0.05, hard ones F ≈ 1.
    s = torch.tensor([-0.01, -30.0, -0.2, -4.0, -1e-4, -2.5], dtype=torch.float64, requires_grad=True)
    weight = coverage_weight(s, 16)
    expected_kept = weight >= 0.05
    assert 0 < expected_kept.sum() < len(s)  # the batch really mixes both kinds
    out = dco_loss(s, 16, weight_threshold=0.05)
    assert torch.equal(out.kept[:, 0], expected_kept)
    kept_losses = coverage_loss(s.detach(), 16)[expected_kept]
    assert out.loss.item() == pytest.approx(kept_losses.mean().item(), rel=1e-12)
    out.loss.backward()
    expected_grad = torch.where(expected_kept, -weight / expected_kept.sum(), 0.0)
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-12, atol=0)


def test_all_dropped_batch_gives_zero_loss_and_zero_gradient():
    s = torch.tensor([-1e-6, -1e-5, -1e-3], requires_grad=True)
    out = dco_loss(s, 256, weight_threshold=0.5)
    assert not out.kept.any()
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_no_filtering_is_the_plain_mean():
    s = torch.tensor([-3.0, -0.5, -12.0, -1e-3], dtype=torch.float64)
    out = dco_loss(s, 8)
    assert out.kept.all()
    assert out.loss.item() == pytest.approx(coverage_loss(s, 8).mean().item(), rel=1e-12)
    assert out.seq_logp.tolist() == s.tolist()


def test_segment_log_probs_sums_per_segment():
    token_logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, 0.0], [-0.5, -0.5, -1.0, 0.0, 0.0]])
    segment_ids = torch.tensor([[-1, 0, 0, 1, -1], [0, 1, 2, -1, -1]])
    sums, mask = segment_log_probs(token_logp, segment_ids)
    torch.testing.assert_close(sums, torch.tensor([[-5.0, -4.0, 0.0], [-0.5, -0.5, -1.0]]))
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_sequence_log_probs_sums_label_tokens_only():
    token_logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -7.0, -9.0], [-4.0, -4.0, -4.0]], dtype=torch.bfloat16)
    label_mask = torch.tensor([[False, True, True], [True, False, False], [False, False, False]])
    sums, has_tokens = sequence_log_probs(token_logp, label_mask)
    assert sums.dtype == torch.float32 and sums.tolist() == [-5.0, -0.5, 0.0]
    assert has_tokens.tolist() == [True, True, False]


def test_segment_log_probs_sums_bf16_in_fp32():
    token_logp = torch.full((1, 512), -0.01, dtype=torch.bfloat16)
    sums, _ = segment_log_probs(token_logp, torch.zeros(1, 512, dtype=torch.long))
    assert sums.dtype == torch.float32
    assert sums.item() == pytest.approx(512 * torch.tensor(-0.01, dtype=torch.bfloat16).item(), rel=1e-6)


def test_step_loss_with_budget_one_is_per_sequence_cross_entropy():
    step_logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = dco_loss(step_logp, 1, unit_mask=mask)
    assert out.loss.item() == pytest.approx((3.0 + 4.75) / 2)
    out.loss.backward()
    torch.testing.assert_close(step_logp.grad, torch.where(mask, -0.5, 0.0))


def test_step_loss_weights_each_step_and_filters_steps():
    step_logp = torch.tensor([[-0.01, -9.0], [-0.02, -0.03]], dtype=torch.float64, requires_grad=True)
    out = dco_loss(step_logp, 8, weight_threshold=0.1)
    weight = coverage_weight(step_logp, 8)
    assert torch.equal(out.kept, weight >= 0.1)
    assert out.kept.tolist() == [[False, True], [False, False]]  # only the hard step of sequence 0 stays
    assert out.loss.item() == pytest.approx(coverage_loss(torch.tensor(-9.0, dtype=torch.float64), 8).item())
    out.loss.backward()
    assert step_logp.grad[0, 1].item() == pytest.approx(-weight[0, 1].item())
    assert step_logp.grad.flatten()[[0, 2, 3]].abs().sum().item() == 0.0


def test_estimated_loss_weights_cross_entropy_by_estimate():
    seq_logp = torch.tensor([-20.0, -35.0, -12.0, -50.0], dtype=torch.float64, requires_grad=True)
    p_hat = torch.tensor([0.0, 0.05, 0.5, 1.0], dtype=torch.float64)
    out = dco_estimated_loss(seq_logp, p_hat, 16, weight_threshold=1e-3)
    expected_weight = torch.tensor(
        [1.0] + [reference(math.log(p), 16)[1] for p in (0.05, 0.5)] + [0.0], dtype=torch.float64
    )
    torch.testing.assert_close(out.weight[:, 0], expected_weight, rtol=1e-9, atol=0)
    assert out.kept[:, 0].tolist() == [True, True, False, False]  # F(16, 0.5) ≈ 2.4e-4 < ε; p̂ = 1 gives F = 0
    kept_weight = expected_weight[:2]
    assert out.loss.item() == pytest.approx(
        (kept_weight * torch.tensor([20.0, 35.0], dtype=torch.float64)).mean().item()
    )
    out.loss.backward()
    torch.testing.assert_close(seq_logp.grad[:2], -kept_weight / 2)
    assert seq_logp.grad[2:].abs().sum().item() == 0.0
    assert out.coverage[:, 0].tolist()[0] == 0.0 and out.coverage[:, 0].tolist()[3] == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_estimated_loss_rejects_non_probabilities(bad):
    with pytest.raises(ValueError, match=r"p_hat must be a probability in \[0, 1\]"):
        dco_estimated_loss(torch.tensor([-3.0, -4.0]), torch.tensor([0.5, bad]), 4)
