"""Online pass@N group weights (align.losses.pass_at_n.pass_at_n_group_weights): closed forms and expectations.

The estimator's claims are checked three ways on a tabular softmax policy (π = softmax(θ) over V outcomes, some of
them correct, so ∇log π(y) = e_y - π and p = Σ_correct π): exactly, by enumerating every group of K samples; by
Monte Carlo over many sampled groups with a fixed seed; and against the exact gradient of log(1 - (1 - p)^N)
from autograd.
"""

import itertools
import math

import pytest
import torch

from align.evaluation.estimators import pass_at_k
from align.losses.pass_at_n import PASS_AT_N_ESTIMATORS, pass_at_n_group_weights, unbiased_pass_at_k


def textbook_f(n: float, p: float) -> float:
    """F(N, p) = N p (1 - p)^(N-1) / (1 - (1 - p)^N), straight from the definition (fine for moderate p)."""
    return n * p * (1 - p) ** (n - 1) / (1 - (1 - p) ** n)


def rewards(*groups) -> torch.Tensor:
    return torch.tensor(groups, dtype=torch.float64)


# --- closed forms ----------------------------------------------------------------------------------------------------


def test_k8_two_correct_n16_plain():
    """The issue's example: K = 8 with 2 correct, N = 16: p̂ = 0.25, F(16, 0.25) / 2 on each correct sample."""
    out = pass_at_n_group_weights(rewards([1, 0, 0, 1, 0, 0, 0, 0]), 16)
    f = 0.05399501424129965  # textbook_f(16, 0.25)
    assert f == pytest.approx(textbook_f(16, 0.25), rel=1e-14)
    expected = torch.tensor([[f / 2, 0, 0, f / 2, 0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(out.weights, expected, rtol=1e-12, atol=0)
    assert out.p_hat.tolist() == [0.25]
    assert out.num_correct.tolist() == [2] and out.num_scored.tolist() == [8]
    assert out.coverage_weight.item() == pytest.approx(f, rel=1e-12)
    assert out.pass_at_n_plugin.item() == pytest.approx(1 - 0.75**16, rel=1e-12)
    assert math.isnan(out.pass_at_n_unbiased.item())  # N = 16 > K = 8: no unbiased estimate


def test_k8_two_correct_n16_leave_one_out():
    out = pass_at_n_group_weights(rewards([1, 0, 0, 1, 0, 0, 0, 0]), 16, estimator="loo")
    f = textbook_f(16, 0.25)
    correct, wrong = f * 6 / (2 * 7), -f / 7  # F (K - c) / (c (K - 1)) and -F / (K - 1)
    expected = torch.tensor([[correct, wrong, wrong, correct, wrong, wrong, wrong, wrong]], dtype=torch.float64)
    torch.testing.assert_close(out.weights, expected, rtol=1e-12, atol=0)
    assert out.weights.sum().item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_n1_gives_one_over_c(c):
    """N = 1: the normalized rejection-sampling gradient, 1/c on each correct sample."""
    row = [1] * c + [0] * (6 - c)
    out = pass_at_n_group_weights(rewards(row), 1)
    assert out.weights[0].tolist() == pytest.approx([1 / c] * c + [0.0] * (6 - c), rel=1e-15)
    assert out.coverage_weight.item() == 1.0


def test_groups_without_a_correct_sample_contribute_nothing_and_are_counted():
    out = pass_at_n_group_weights(rewards([0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]), 3)
    for estimator in PASS_AT_N_ESTIMATORS:
        weights = pass_at_n_group_weights(rewards([0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]), 3, estimator).weights
        assert weights[0].abs().sum() == 0 and weights[2].abs().sum() == 0
        assert weights[1].abs().sum() > 0
    assert out.p_hat.tolist() == [0.0, 0.25, 0.0]
    assert (out.p_hat == 0).sum().item() == 2
    assert out.pass_at_n_plugin[0].item() == 0.0 and out.pass_at_n_unbiased[0].item() == 0.0


def test_all_correct_groups():
    """p̂ = 1: F(N > 1, 1) = 0, so nothing to push; N = 1 keeps 1/K (plain); leave-one-out has r - b = 0."""
    row = rewards([1, 1, 1, 1])
    assert pass_at_n_group_weights(row, 4).weights.abs().sum().item() == 0.0
    assert pass_at_n_group_weights(row, 1).weights[0].tolist() == [0.25] * 4
    assert pass_at_n_group_weights(row, 1, "loo").weights.abs().sum().item() == 0.0
    out = pass_at_n_group_weights(row, 4)
    assert out.pass_at_n_plugin.item() == 1.0 and out.pass_at_n_unbiased.item() == 1.0


def test_plain_group_total_is_the_coverage_weight():
    """Σ_i w_i over a solved group = F(N, p̂): each solved prompt gets DCO's weight, shared by its correct samples."""
    batch = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 0]]).double()
    out = pass_at_n_group_weights(batch, 6.5)  # fractional N is allowed, as in DCO
    for g, c in enumerate([4, 1, 7]):
        assert out.weights[g].sum().item() == pytest.approx(textbook_f(6.5, c / 8), rel=1e-12)


def test_unscored_samples_leave_their_group():
    nan = math.nan
    out = pass_at_n_group_weights(rewards([1, nan, 0, 0], [nan, nan, nan, nan]), 2)
    assert out.num_scored.tolist() == [3, 0]
    assert out.p_hat[0].item() == pytest.approx(1 / 3)
    assert out.weights[0].tolist() == pytest.approx([textbook_f(2, 1 / 3), 0, 0, 0], rel=1e-12)
    assert out.weights[1].tolist() == [0, 0, 0, 0]
    assert math.isnan(out.p_hat[1].item()) and math.isnan(out.pass_at_n_plugin[1].item())
    assert out.pass_at_n_unbiased[0].item() == pytest.approx(pass_at_k(3, 1, 2), rel=1e-12)
    loo = pass_at_n_group_weights(rewards([1, nan, 0, 0], [1, nan, nan, nan]), 2, "loo").weights
    f = textbook_f(2, 1 / 3)
    assert loo[0].tolist() == pytest.approx([f * 2 / 2, 0, -f / 2, -f / 2], rel=1e-12)
    assert loo[1].tolist() == [0, 0, 0, 0]  # one scored sample: no leave-one-out baseline


def test_invalid_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"group 1, sample 2 has reward 0\.5"):
        pass_at_n_group_weights(rewards([1, 0, 0], [0, 1, 0.5]), 4)
    with pytest.raises(ValueError, match="estimator must be one of"):
        pass_at_n_group_weights(rewards([1, 0]), 4, estimator="rloo")
    with pytest.raises(ValueError, match="N must be finite and >= 1"):
        pass_at_n_group_weights(rewards([1, 0]), 0.5)
    with pytest.raises(ValueError, match=r"\(groups, samples per group\)"):
        pass_at_n_group_weights(torch.tensor([1.0, 0.0]), 4)


def test_unbiased_pass_at_k_matches_the_harness_estimator():
    assert unbiased_pass_at_k(torch.tensor([10]), torch.tensor([2]), 5).item() == pytest.approx(0.777778, abs=1e-6)
    n = torch.tensor([n for n in range(1, 40) for _ in range(n + 1)])
    c = torch.tensor([c for n in range(1, 40) for c in range(n + 1)])
    for k in (1, 2, 5, 16):
        got = unbiased_pass_at_k(n, c, k)
        for i in range(len(n)):
            if k <= n[i]:
                assert got[i].item() == pytest.approx(pass_at_k(int(n[i]), int(c[i]), k), rel=1e-9, abs=1e-12)
            else:
                assert math.isnan(got[i].item())
    assert math.isnan(unbiased_pass_at_k(torch.tensor([8]), torch.tensor([2]), 2.5).item())


# --- expectations on a tabular softmax policy ------------------------------------------------------------------------


def expected_scale(estimator: str, p: float, k: int, n: float) -> float:
    """s such that E[Σ_i w_i ∇log π(y_i)] = s · ∇p / p, from the Binomial(K, p) law of c (see the docstring)."""
    total = 0.0
    for c in range(1, k + 1):
        law = math.comb(k, c) * p**c * (1 - p) ** (k - c)
        f = 1.0 if n == 1 else (0.0 if c == k else textbook_f(n, c / k))
        total += law * (f if estimator == "plain" else f * (k - c) / (k - 1))
    return total if estimator == "plain" else total / (1 - p)


def tabular_policy(vocab: int, correct: list[int], seed: int):
    torch.manual_seed(seed)
    theta = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    p = pi[correct].sum()
    return theta, pi, p


def exact_gradients(theta, p, n):
    """(∇ log(1 - (1 - p)^N), ∇p) by autograd."""
    objective = torch.log(-torch.expm1(n * torch.log1p(-p)))
    (grad_objective,) = torch.autograd.grad(objective, theta, retain_graph=True)
    (grad_p,) = torch.autograd.grad(p, theta, retain_graph=True)
    return grad_objective, grad_p


def group_updates(samples: torch.Tensor, weights: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i ∇log π(y_i) = Σ_i w_i (e_{y_i} - π) for each group: (M, V)."""
    hits = torch.zeros(samples.shape[0], pi.numel(), dtype=torch.float64).scatter_add_(1, samples, weights)
    return hits - weights.sum(1, keepdim=True) * pi


@pytest.mark.parametrize("estimator", PASS_AT_N_ESTIMATORS)
@pytest.mark.parametrize("n", [1, 3, 16])
def test_expectation_by_enumeration_is_exactly_parallel_to_the_true_gradient(estimator, n):
    """E over all V^K groups (exact): s(p) · ∇p / p, with s from the Binomial law; cosine with ∇J is 1."""
    vocab, k, correct = 4, 4, [0, 2]
    theta, pi, p = tabular_policy(vocab, correct, seed=0)
    grad_objective, grad_p = exact_gradients(theta, p, n)
    pi = pi.detach()
    groups = torch.tensor(list(itertools.product(range(vocab), repeat=k)))
    probability = pi[groups].prod(1)
    is_correct = torch.isin(groups, torch.tensor(correct)).double()
    weights = pass_at_n_group_weights(is_correct, n, estimator).weights
    expectation = (probability[:, None] * group_updates(groups, weights, pi)).sum(0)
    predicted = expected_scale(estimator, p.item(), k, n) * grad_p / p.item()
    torch.testing.assert_close(expectation, predicted, rtol=1e-12, atol=1e-15)
    assert torch.nn.functional.cosine_similarity(expectation, grad_objective, 0).item() == pytest.approx(1, abs=1e-12)


def test_n1_plain_is_exactly_unbiased_given_a_solved_group():
    """N = 1: averaged over the groups with c >= 1, the update is ∇log p exactly (enumeration, no sampling error)."""
    vocab, k, correct = 5, 3, [1, 4]
    theta, pi, p = tabular_policy(vocab, correct, seed=3)
    grad_log_p, _ = exact_gradients(theta, p, 1)
    pi = pi.detach()
    groups = torch.tensor(list(itertools.product(range(vocab), repeat=k)))
    is_correct = torch.isin(groups, torch.tensor(correct)).double()
    solved = is_correct.sum(1) > 0
    probability = pi[groups].prod(1)
    weights = pass_at_n_group_weights(is_correct, 1).weights
    updates = group_updates(groups, weights, pi)
    conditional = (probability[solved, None] * updates[solved]).sum(0) / probability[solved].sum()
    torch.testing.assert_close(conditional, grad_log_p, rtol=1e-12, atol=1e-15)
    assert probability[solved].sum().item() == pytest.approx(1 - (1 - p.item()) ** k, rel=1e-12)


@pytest.mark.parametrize("estimator", PASS_AT_N_ESTIMATORS)
def test_monte_carlo_matches_the_exact_gradient_of_log_pass_at_n(estimator):
    """200k sampled groups (fixed seed): the mean update has the true gradient's direction and the predicted scale."""
    vocab, k, n, num_groups = 6, 8, 4, 200_000
    theta, pi, p = tabular_policy(vocab, [0, 3], seed=1)
    grad_objective, grad_p = exact_gradients(theta, p, n)
    pi = pi.detach()
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(pi, num_groups * k, replacement=True, generator=generator).view(num_groups, k)
    is_correct = ((samples == 0) | (samples == 3)).double()
    updates = group_updates(samples, pass_at_n_group_weights(is_correct, n, estimator).weights, pi)
    mean = updates.mean(0)
    standard_error = updates.std(0) / math.sqrt(num_groups)
    predicted = expected_scale(estimator, p.item(), k, n) * grad_p / p.item()
    assert ((mean - predicted).abs() <= 5 * standard_error).all(), (mean, predicted, standard_error)
    assert torch.nn.functional.cosine_similarity(mean, grad_objective, 0).item() > 0.999
    # The scale, measured by projecting on ∇J's direction, against the Binomial prediction (relative 1 %).
    unit = grad_objective / grad_objective.norm()
    measured_scale = (mean @ unit) / (grad_p / p.item() @ unit)
    assert measured_scale.item() == pytest.approx(expected_scale(estimator, p.item(), k, n), rel=0.01)
