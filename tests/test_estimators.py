"""pass@k, maj@k, bon@k and weighted maj@k against brute-force enumeration of every k-subset."""

import itertools
import math
import random

import numpy as np
import pytest

from align.evaluation.estimators import bon_at_k, ks_up_to, maj_at_k, pass_at_k, weighted_maj_at_k


def brute_pass(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


def brute_vote(groups, weights, correct_groups, k) -> float:
    """Average over all k-subsets of: the fraction of the top-voted (tied) groups that are correct."""
    total, subsets = 0.0, list(itertools.combinations(range(len(groups)), k))
    for subset in subsets:
        votes = {}
        for i in subset:
            if groups[i] is not None:
                votes[groups[i]] = votes.get(groups[i], 0.0) + weights[i]
        if not votes:
            continue
        best = max(votes.values())
        winners = [g for g, v in votes.items() if math.isclose(v, best, rel_tol=1e-12, abs_tol=1e-12)]
        total += sum(g in correct_groups for g in winners) / len(winners)
    return total / len(subsets)


def brute_bon(scores, correct, k) -> float:
    total, subsets = 0.0, list(itertools.combinations(range(len(scores)), k))
    for subset in subsets:
        best = max(scores[i] for i in subset)
        tied = [i for i in subset if scores[i] == best]
        total += sum(correct[i] for i in tied) / len(tied)
    return total / len(subsets)


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration_for_every_c_and_k(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass(correct, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_stability():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    # n = 1000, where C(n, k) overflows floats: the product form stays finite and agrees with exact integers
    exact = 1 - math.comb(1000 - 7, 200) / math.comb(1000, 200)
    assert pass_at_k(1000, 7, 200) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n", range(1, 11))
def test_maj_at_k_matches_enumeration(n):
    rng = random.Random(n)
    for _trial in range(30):
        num_groups = rng.randint(1, 4)
        groups = [rng.choice([None, *range(num_groups)]) for _ in range(n)]
        correct_groups = {g for g in range(num_groups) if rng.random() < 0.4}
        for k in range(1, n + 1):
            expected = brute_vote(groups, [1.0] * n, correct_groups, k)
            assert maj_at_k(groups, correct_groups, k) == pytest.approx(expected, abs=1e-12), (groups, k)


def test_maj_at_k_accepts_per_sample_correctness():
    groups = [0, 0, 1, 1, 1, None]
    per_sample = [True, True, False, False, False, False]
    for k in range(1, 7):
        assert maj_at_k(groups, per_sample, k) == pytest.approx(maj_at_k(groups, {0}, k))


def test_maj_at_n_is_exact_and_ties_split_credit():
    # one subset (k = n): 2 votes for the correct answer vs 2 for a wrong one -> tie -> half credit
    assert maj_at_k([0, 0, 1, 1], {0}, 4) == 0.5
    assert maj_at_k([0, 0, 0, 1], {0}, 4) == 1.0
    assert maj_at_k([None, None], {0}, 2) == 0.0  # nobody answered


@pytest.mark.parametrize("n", range(1, 9))
def test_weighted_maj_at_k_matches_enumeration(n):
    rng = random.Random(100 + n)
    for _trial in range(20):
        groups = [rng.choice([None, 0, 1, 2]) for _ in range(n)]
        scores = [rng.choice([-2.0, -0.5, 0.0, 1.0, 3.0]) for _ in range(n)]
        weights = [1 / (1 + math.exp(-s)) for s in scores]
        for k in range(1, n + 1):
            expected = brute_vote(groups, weights, {1}, k)
            assert weighted_maj_at_k(groups, scores, {1}, k) == pytest.approx(expected, abs=1e-12)


def test_weighted_vote_can_overturn_the_plain_majority():
    groups, correct = [0, 1, 1], {0}
    assert maj_at_k(groups, correct, 3) == 0.0
    assert weighted_maj_at_k(groups, [8.0, -8.0, -8.0], correct, 3) == 1.0


@pytest.mark.parametrize("n", range(1, 10))
def test_bon_at_k_matches_enumeration_including_ties(n):
    rng = random.Random(200 + n)
    for _trial in range(30):
        scores = [float(rng.randint(0, 3)) for _ in range(n)]  # many ties
        correct = [rng.random() < 0.5 for _ in range(n)]
        for k in range(1, n + 1):
            assert bon_at_k(scores, correct, k) == pytest.approx(brute_bon(scores, correct, k), abs=1e-12)


def test_bon_at_k_with_an_oracle_and_an_adversary():
    correct = [False, True, False, False]
    assert bon_at_k([0, 1, 0, 0], correct, 1) == pytest.approx(0.25)  # k=1: one random sample
    assert bon_at_k([0, 1, 0, 0], correct, 4) == 1.0  # the oracle picks the correct one
    assert bon_at_k([1, 0, 1, 1], correct, 4) == 0.0  # the adversary never does
    assert bon_at_k([0.0] * 4, correct, 2) == pytest.approx(0.25)  # constant scores = random choice


def test_random_subsets_are_seeded_and_converge_to_the_exact_value():
    rng = random.Random(7)
    groups = [rng.choice([0, 1, 2, None]) for _ in range(14)]
    exact = maj_at_k(groups, {1}, 7, num_subsets=10**6)  # C(14, 7) = 3432 <= 1e6: enumerated
    sampled = maj_at_k(groups, {1}, 7, seed=3, num_subsets=2000)  # 2000 < 3432: sampled
    assert sampled == maj_at_k(groups, {1}, 7, seed=3, num_subsets=2000)  # same seed, same value
    assert sampled == pytest.approx(exact, abs=0.03)


def test_invalid_arguments_are_rejected_with_the_bad_value():
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must be in"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="same length"):
        bon_at_k([0.0, 1.0], [True], 1)
    with pytest.raises(ValueError, match="NaN"):
        bon_at_k([float("nan"), 1.0], [True, False], 1)
    with pytest.raises(ValueError, match="one entry per sample"):
        maj_at_k([0, 1], [True], 1)


def test_reported_ks():
    assert ks_up_to(1) == [1]
    assert ks_up_to(8) == [1, 2, 4, 8]
    assert ks_up_to(12) == [1, 2, 4, 8, 12]
    assert np.all(np.diff(ks_up_to(64)) > 0)
