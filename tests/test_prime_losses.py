"""PRIME's advantages and prompt filter (`align.losses.prime`) against the worked example of the reference note
(K = 4, computed by hand from Eq. 5 and from the code's formula), brute force, padding and invariances."""

import random

import pytest
import torch

from align.losses.prime import (
    accuracy_band,
    batch_norm_process_rewards,
    leave_one_out_mean,
    masked_whiten,
    prime_advantages,
    reverse_returns,
    rloo_advantages,
)


REWARDS = [[0.1, 0.2, 0.3], [-0.2, -0.1], [0.0, 0.4, -0.1, 0.1], [0.1, -0.3, -0.1]]
OUTCOME = [1.0, 0.0, 1.0, 0.0]
PAPER = [[1.416667, 1.266667, 1.016667], [-1.1, -0.833333], [1.133333, 1.116667, 0.7, 0.783333],
         [-1.116667, -1.166667, -0.816667]]  # fmt: skip
VERL = [[1.416667, 1.3, 1.05], [-1.1, -0.816667], [1.133333, 1.15, 0.633333, 0.783333],
        [-1.116667, -1.233333, -0.816667]]  # fmt: skip
VERL_WHITENED = [[1.1094, 1.0032, 0.7755], [-1.1828, -0.9247], [0.8514, 0.8665, 0.3960, 0.5326],
                 [-1.1980, -1.3042, -0.9247]]  # fmt: skip


def padded(rows, width=None, left=0):
    width = width or max(map(len, rows))
    values = torch.zeros(len(rows), width + left, dtype=torch.float64)
    mask = torch.zeros(len(rows), width + left, dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, left : left + len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, left : left + len(row)] = True
    return values, mask


def unpad(values, mask):
    return [values[i][mask[i]].tolist() for i in range(len(values))]


@pytest.mark.parametrize(("mode", "expected"), [("paper", PAPER), ("verl", VERL)])
def test_the_worked_example(mode, expected):
    rewards, mask = padded(REWARDS)
    advantages = prime_advantages(rewards, mask, torch.tensor(OUTCOME), 4, mode=mode, whiten=False)
    for got, want in zip(unpad(advantages, mask), expected):
        assert got == pytest.approx(want, abs=1e-6)
    assert (advantages[~mask] == 0).all()


def test_whitening_of_the_worked_example():
    rewards, mask = padded(REWARDS)
    advantages = prime_advantages(rewards, mask, torch.tensor(OUTCOME), 4, mode="verl")
    for got, want in zip(unpad(advantages, mask), VERL_WHITENED):
        assert got == pytest.approx(want, abs=1e-4)
    valid = advantages[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    raw = prime_advantages(rewards, mask, torch.tensor(OUTCOME), 4, mode="verl", whiten=False)[mask]
    assert raw.mean().item() == pytest.approx(0.198611, abs=1e-6)
    assert raw.std(unbiased=True).item() == pytest.approx(1.097919, abs=1e-6)


def eq5_brute_force(rows, outcome, k, gamma):
    """Eq. 5 term by term, in plain Python loops."""
    out = []
    for i, row in enumerate(rows):
        group = range(i - i % k, i - i % k + k)
        others = [j for j in group if j != i]
        baseline = sum(sum(rows[j]) / len(rows[j]) for j in others) / (k - 1)
        outcome_term = outcome[i] - sum(outcome[j] for j in others) / (k - 1)
        out.append(
            [
                sum(gamma ** (s - t) * (row[s] - baseline) for s in range(t, len(row))) + outcome_term
                for t in range(len(row))
            ]
        )
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_paper_mode_equals_eq5_by_brute_force_and_agrees_with_verl_at_the_first_token(gamma):
    rng = random.Random(0)
    k = 4
    rows = [[rng.gauss(0, 1) for _ in range(rng.randint(1, 7))] for _ in range(3 * k)]
    outcome = [float(rng.random() < 0.5) for _ in rows]
    rewards, mask = padded(rows)
    paper = prime_advantages(rewards, mask, torch.tensor(outcome), k, gamma=gamma, whiten=False)
    for got, want in zip(unpad(paper, mask), eq5_brute_force(rows, outcome, k, gamma)):
        assert got == pytest.approx(want, abs=1e-9)
    verl = prime_advantages(rewards, mask, torch.tensor(outcome), k, mode="verl", whiten=False)
    if gamma == 1.0:  # the two modes coincide at t = 0 (and differ later by (1/(K-1)) sum_{s>=t} (r_s - m_i))
        assert verl[:, 0].tolist() == pytest.approx(paper[:, 0].tolist(), abs=1e-9)
        means = [sum(row) / len(row) for row in rows]
        for i, (p, v) in enumerate(zip(unpad(paper, mask), unpad(verl, mask))):
            gap = [sum(rows[i][s] - means[i] for s in range(t, len(rows[i]))) / (k - 1) for t in range(len(rows[i]))]
            assert [b - a for a, b in zip(p, v)] == pytest.approx(gap, abs=1e-9)


def test_padding_anywhere_changes_nothing_and_constant_scaling_whitens_away():
    rewards, mask = padded(REWARDS)
    wide, wide_mask = padded(REWARDS, width=9, left=2)
    outcome = torch.tensor(OUTCOME)
    for mode in ("paper", "verl"):
        a = prime_advantages(rewards, mask, outcome, 4, mode=mode)
        b = prime_advantages(wide, wide_mask, outcome, 4, mode=mode)
        assert unpad(a, mask) == [pytest.approx(row, abs=1e-12) for row in unpad(b, wide_mask)]
        scaled = prime_advantages(5 * rewards, mask, 5 * outcome, 4, mode=mode)  # PRIME's coefficient 5
        assert torch.allclose(scaled, a, atol=1e-6)


def test_outcome_only_is_rloo_constant_over_tokens():
    rewards, mask = padded([[0.0] * n for n in (3, 2, 4, 3)])
    for mode in ("paper", "verl"):
        advantages = prime_advantages(rewards, mask, torch.tensor(OUTCOME), 4, mode=mode, whiten=False)
        for row, value in zip(unpad(advantages, mask), [2 / 3, -2 / 3, 2 / 3, -2 / 3]):
            assert row == pytest.approx([value] * len(row))
    assert rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4).tolist() == pytest.approx(
        [1, -1 / 3, -1 / 3, -1 / 3]
    )


def test_building_blocks():
    assert leave_one_out_mean(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), 3).tolist() == [2.5, 2, 1.5, 25, 20, 15]
    values, mask = padded([[1.0, 2.0, 3.0], [4.0]])
    assert reverse_returns(values, mask).tolist() == [[6, 5, 3], [4, 0, 0]]
    assert reverse_returns(values, mask, gamma=0.5).tolist() == [[1 + 0.5 * (2 + 0.5 * 3), 2 + 1.5, 3], [4, 0, 0]]
    whitened = masked_whiten(values, mask)
    assert whitened[~mask].tolist() == [0.0, 0.0] and whitened[mask].mean().abs() < 1e-12
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        masked_whiten(values[:1, :1], mask[:1, :1])
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        prime_advantages(values, mask, torch.zeros(2), 2, mode="ppo")


def test_accuracy_band_keeps_mixed_groups_and_pins_the_bounds():
    outcome = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0])
    assert accuracy_band(outcome, 4).tolist() == [False, False, True, True]
    five = torch.tensor([1.0, 0, 0, 0, 0])  # accuracy exactly 0.2: the bound decides
    assert accuracy_band(five, 5).tolist() == [True]
    assert accuracy_band(five, 5, inclusive=False).tolist() == [False]
    with pytest.raises(ValueError, match="low <= high"):
        accuracy_band(outcome, 4, low=0.9, high=0.1)


def test_batch_norm_divides_by_the_largest_process_return():
    rewards, mask = padded(REWARDS)
    normed = batch_norm_process_rewards(rewards, mask)
    nonzero = mask & (rewards != 0)
    assert (rewards[nonzero] / normed[nonzero]).tolist() == pytest.approx([0.600001] * int(nonzero.sum()), abs=1e-9)
    whitened = prime_advantages(normed, mask, torch.tensor(OUTCOME), 4, mode="verl")
    assert whitened[0, :3].tolist() == pytest.approx([1.1974, 1.0572, 0.7565], abs=1e-4)
    # The largest |return| may be negative, and padding never counts.
    padded_rewards = rewards.clone()
    padded_rewards[~mask] = 100.0
    assert batch_norm_process_rewards(-padded_rewards * mask, mask)[mask].tolist() == pytest.approx(
        (-normed)[mask].tolist()
    )
