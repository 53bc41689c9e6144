"""Implicit-reward losses and process rewards against the closed forms of methods.md §3.5 and autograd."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.losses.implicit_reward import (
    aggregate_step_rewards,
    balanced_subset,
    cumulative_q,
    implicit_ce_loss,
    implicit_dpo_loss,
    implicit_nca_loss,
    process_rewards,
    token_rewards,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- objectives: closed forms (methods.md §3.5)


def test_ce_loss_closed_form():
    logratio = torch.tensor([2.0, 2.0], dtype=torch.float64)
    losses = implicit_ce_loss(logratio, torch.tensor([True, False]), beta=0.05)
    assert losses.tolist() == pytest.approx([0.644397, 0.744397], abs=1e-6)


def test_dpo_loss_closed_form():
    loss = implicit_dpo_loss(torch.tensor([2.0]), torch.tensor([-2.0]), beta=0.05)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_nca_loss_closed_form():
    loss = implicit_nca_loss(torch.tensor([2.0]), torch.tensor([-2.0]), beta=0.05)
    assert loss.item() == pytest.approx(1.338793, abs=1e-6)


def test_losses_at_initialization():
    zero = torch.zeros(3)
    assert implicit_ce_loss(zero, torch.tensor([1, 0, 1]), 0.05) == pytest.approx([math.log(2)] * 3)
    assert implicit_dpo_loss(zero, zero, 0.05) == pytest.approx([math.log(2)] * 3)
    assert implicit_nca_loss(zero, zero, 0.05) == pytest.approx([2 * math.log(2)] * 3)


def test_ce_loss_is_finite_for_extreme_rewards():
    logratio = torch.tensor([1e5, -1e5], requires_grad=True)
    losses = implicit_ce_loss(logratio, torch.tensor([False, True]), beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and losses.tolist() == pytest.approx([1e5, 1e5])
    assert torch.isfinite(logratio.grad).all()


def test_ce_class_weights_scale_each_term():
    logratio = torch.tensor([2.0, 2.0])
    plain = implicit_ce_loss(logratio, torch.tensor([True, False]), 0.05)
    weighted = implicit_ce_loss(logratio, torch.tensor([True, False]), 0.05, weights=torch.tensor([2.0, 0.5]))
    assert weighted.tolist() == pytest.approx([2 * plain[0].item(), 0.5 * plain[1].item()])


# ---------------------------------------------------------------- objectives: gradients


def test_ce_gradient_matches_closed_form():
    beta = 0.05
    logratio = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    implicit_ce_loss(logratio, labels, beta).sum().backward()
    # d/dx BCE(σ(βx), l) = β (σ(βx) − l)
    expected = [beta * (_sigmoid(beta * x) - y) for x, y in zip(logratio.tolist(), labels.tolist())]
    assert logratio.grad.tolist() == pytest.approx(expected, rel=1e-10)


def test_dpo_gradient_matches_closed_form():
    beta = 0.05
    chosen = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    implicit_dpo_loss(chosen, rejected, beta).sum().backward()
    # d/dx_w −log σ(β(x_w − x_l)) = −β σ(−β(x_w − x_l)); the rejected gradient is its negative
    grad = -beta * _sigmoid(-beta * 4.0)
    assert chosen.grad.item() == pytest.approx(grad, rel=1e-10)
    assert rejected.grad.item() == pytest.approx(-grad, rel=1e-10)


def test_nca_gradient_matches_closed_form():
    beta = 0.05
    chosen = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    implicit_nca_loss(chosen, rejected, beta).sum().backward()
    r_w, r_l = beta * 2.0, beta * -2.0
    # d/dr −log σ(r) = −σ(−r); d/dr −½ log σ(−r) = ½ σ(r)
    assert chosen.grad.item() == pytest.approx(beta * (-_sigmoid(-r_w) + 0.5 * _sigmoid(r_w)), rel=1e-10)
    assert rejected.grad.item() == pytest.approx(beta * 0.5 * _sigmoid(r_l), rel=1e-10)


@pytest.mark.parametrize("loss_fn", [implicit_dpo_loss, implicit_nca_loss])
def test_pair_losses_pass_gradcheck(loss_fn):
    chosen = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: loss_fn(c, r, 0.3), (chosen, rejected))


def test_ce_loss_passes_gradcheck():
    logratio = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 1, 0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: implicit_ce_loss(x, labels, 0.7), (logratio,))


# ---------------------------------------------------------------- process rewards (methods.md §3.5)

POLICY = [-0.5, -1.0, -0.2, -2.0, -0.1, -0.3]
REFERENCE = [-0.7, -0.8, -0.6, -1.0, -0.4, -0.3]


def test_step_rewards_closed_form():
    rewards = token_rewards(torch.tensor(POLICY), torch.tensor(REFERENCE), torch.ones(6), beta=1.0)
    assert cumulative_q(rewards).tolist() == pytest.approx([0.2, 0.0, 0.4, -0.6, -0.3, -0.3], abs=1e-6)
    # step ends at token indices [1, 3, 5] (inclusive) are the exclusive boundaries [2, 4, 6]
    q, r = process_rewards(rewards, torch.tensor([2, 4, 6]))
    assert q.tolist() == pytest.approx([0.0, -0.6, -0.3], abs=1e-6)
    assert r.tolist() == pytest.approx([0.0, -0.6, 0.3], abs=1e-6)
    mask = torch.ones(3, dtype=torch.bool)
    assert aggregate_step_rewards(r, mask, "min").item() == pytest.approx(-0.6, abs=1e-6)
    assert aggregate_step_rewards(r, mask, "sum").item() == pytest.approx(-0.3, abs=1e-6)
    assert aggregate_step_rewards(r, mask, "sum").item() == pytest.approx(rewards.sum().item(), abs=1e-6)
    assert aggregate_step_rewards(r, mask, "mean").item() == pytest.approx(-0.1, abs=1e-6)
    assert aggregate_step_rewards(r, mask, "last").item() == pytest.approx(0.3, abs=1e-6)


def test_token_rewards_mask_prompt_and_padding_and_scale_with_beta():
    policy, reference = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-5.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1]])
    assert token_rewards(policy, reference, mask, 0.5).tolist() == [[0.0, -0.5, -1.0]]
    # reference-free: β·log π_θ
    assert token_rewards(policy, None, mask, 0.5).tolist() == [[0.0, -1.0, -1.5]]


def test_process_rewards_batched_with_padding_and_empty_steps():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    # row 0: three steps, the middle one without tokens; row 1: two steps and one padded step
    step_ends = torch.tensor([[1, 1, 3], [1, 2, 0]])
    step_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    q, r = process_rewards(rewards, step_ends, step_mask)
    assert q.tolist() == [[1.0, 1.0, 6.0], [0.5, -0.5, 0.0]]
    assert r.tolist() == [[1.0, 0.0, 5.0], [0.5, -1.0, 0.0]]
    assert aggregate_step_rewards(r, step_mask, "min").tolist() == [0.0, -1.0]
    assert aggregate_step_rewards(r, step_mask, "last").tolist() == [5.0, -1.0]
    assert aggregate_step_rewards(r, step_mask, "mean").tolist() == pytest.approx([2.0, -0.25])
    assert aggregate_step_rewards(r, step_mask, "sum").tolist() == [6.0, -0.5]


def test_aggregate_of_a_row_without_steps_is_zero_and_unknown_aggregate_is_rejected():
    empty = torch.zeros(1, 2)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    for how in ("min", "mean", "last", "sum"):
        assert aggregate_step_rewards(empty, mask, how).tolist() == [0.0]
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate_step_rewards(empty, mask, "max")


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5), min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 20), max_size=6),
)
def test_step_rewards_always_sum_to_the_outcome_reward(values, cuts):
    rewards = torch.tensor(values, dtype=torch.float64)
    ends = sorted({min(c, len(values)) for c in cuts} | {len(values)})
    q, r = process_rewards(rewards, torch.tensor(ends))
    assert r.sum().item() == pytest.approx(rewards.sum().item(), abs=1e-9)
    assert q[-1].item() == pytest.approx(rewards.sum().item(), abs=1e-9)


# ---------------------------------------------------------------- Proposition 3.1 by enumeration


def test_proposition_3_1_q_is_the_exponential_average_of_the_outcome_reward():
    """On a tiny autoregressive model (vocab 3, length 3) enumerate every continuation: for every prefix y_≤t,
    q^t = β log Σ_{y_>t} π_ref(y_>t | y_≤t) exp(r(y)/β), with q^t from cumulative token log-ratios."""
    vocab, length, beta = 3, 3, 0.7
    generator = torch.Generator().manual_seed(0)

    def random_policy():
        # next-token distribution for every prefix (a table keyed by the prefix tuple)
        return {
            prefix: torch.log_softmax(torch.randn(vocab, generator=generator, dtype=torch.float64), -1)
            for t in range(length)
            for prefix in itertools.product(range(vocab), repeat=t)
        }

    policy, reference = random_policy(), random_policy()

    def logps(table, sequence):
        return torch.stack([table[tuple(sequence[:t])][token] for t, token in enumerate(sequence)])

    sequences = list(itertools.product(range(vocab), repeat=length))
    outcome = {
        y: token_rewards(logps(policy, y), logps(reference, y), torch.ones(length), beta).sum().item()
        for y in sequences
    }
    for y in sequences:
        q = cumulative_q(token_rewards(logps(policy, y), logps(reference, y), torch.ones(length), beta))
        for t in range(1, length + 1):
            continuations = [z for z in sequences if z[:t] == y[:t]]
            expectation = sum(
                math.exp(logps(reference, z)[t:].sum().item()) * math.exp(outcome[z] / beta) for z in continuations
            )
            assert q[t - 1].item() == pytest.approx(beta * math.log(expectation), abs=1e-10)


# ---------------------------------------------------------------- class balancing


def test_dataset_balancing_subsamples_the_majority_class():
    labels = [True] * 7 + [False] * 3
    kept = balanced_subset(labels, mode="dataset", seed=1)
    assert sorted(kept) == kept and len(kept) == 6
    assert sum(labels[i] for i in kept) == 3
    assert kept == balanced_subset(labels, mode="dataset", seed=1)  # seeded


def test_instruction_balancing_balances_each_prompt_and_drops_one_class_prompts():
    labels = [True, True, False, True, True, False, False, False]
    groups = ["a", "a", "a", "b", "b", "c", "c", "c"]
    kept = balanced_subset(labels, groups, mode="instruction")
    by_group = {g: [labels[i] for i in kept if groups[i] == g] for g in "abc"}
    assert sorted(by_group["a"]) == [False, True] and by_group["b"] == [] and by_group["c"] == []


def test_balancing_modes_and_errors():
    assert balanced_subset([True, False, True], mode="none") == [0, 1, 2]
    with pytest.raises(ValueError, match="class balance mode"):
        balanced_subset([True], mode="prompt")
    with pytest.raises(ValueError, match="group key"):
        balanced_subset([True, False], mode="instruction")
