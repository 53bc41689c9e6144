"""pass@k, pass^k, maj@k, bon@k and weighted maj@k against brute-force enumeration of every k-subset."""

import itertools
import math
import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.evaluation.estimators import (
    bon_at_k,
    ks_up_to,
    maj_at_k,
    majority_from_counts,
    pass_all_at_k,
    pass_at_k,
    weighted_maj_at_k,
)


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


def test_weighted_random_subsets_are_seeded_and_converge_to_the_exact_value():
    rng = random.Random(7)
    groups = [rng.choice([0, 1, 2, None]) for _ in range(14)]
    scores = [rng.uniform(-2.0, 2.0) for _ in range(14)]
    exact = weighted_maj_at_k(groups, scores, {1}, 7, num_subsets=10**6)  # C(14, 7) = 3432 <= 1e6: enumerated
    weights = [1 / (1 + math.exp(-s)) for s in scores]
    assert exact == pytest.approx(brute_vote(groups, weights, {1}, 7), abs=1e-12)
    sampled = weighted_maj_at_k(groups, scores, {1}, 7, seed=3, num_subsets=2000)  # 2000 < 3432: sampled
    assert sampled == weighted_maj_at_k(groups, scores, {1}, 7, seed=3, num_subsets=2000)  # same seed, same value
    assert sampled == pytest.approx(exact, abs=0.03)
    assert weighted_maj_at_k(groups, None, {1}, 7) == maj_at_k(groups, {1}, 7)  # no scores: plain maj@k, exact


def brute_vote_vectorized(groups, correct_groups, k) -> float:
    """brute_vote with unit weights over all k-subsets at once (numpy), for n up to ~20."""
    ids = sorted({g for g in groups if g is not None})
    onehot = np.array([[g == i for i in ids] for g in groups], dtype=float)  # (n, G); no answer: a zero row
    subsets = np.array(list(itertools.combinations(range(len(groups)), k)))
    votes = onehot[subsets].sum(axis=1)  # (S, G)
    best = votes.max(axis=1, keepdims=True)
    winners = (votes == best) & (best > 0)
    right = np.array([i in correct_groups for i in ids], dtype=float)
    return float(((winners * right).sum(axis=1) / np.maximum(winners.sum(axis=1), 1)).mean())


def test_maj_at_k_is_exact_where_subset_sampling_was_not():
    """C(18, 9) = 48620 subsets: the old estimate averaged 1,000 random ones (off by ~0.01); now exact."""
    rng = random.Random(11)
    for _trial in range(3):
        groups = [rng.choice([None, 0, 1, 1, 2, 3]) for _ in range(18)]
        for k in (5, 9, 13):
            assert maj_at_k(groups, {1}, k) == pytest.approx(brute_vote_vectorized(groups, {1}, k), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(st.one_of(st.none(), st.integers(0, 4)), min_size=1, max_size=10),
    correct=st.sets(st.integers(0, 4)),
    data=st.data(),
)
def test_maj_at_k_matches_enumeration_property(groups, correct, data):
    """Any mix of groups (ties, several correct groups, samples without an answer), any k."""
    k = data.draw(st.integers(1, len(groups)))
    assert maj_at_k(groups, correct, k) == pytest.approx(
        brute_vote(groups, [1.0] * len(groups), correct, k), abs=1e-12
    )


def test_maj_at_k_closed_forms_at_large_n():
    rng = random.Random(5)
    groups = [rng.choice([None, 0, 1, 1, 1, 2, 3, 4]) for _ in range(256)]
    c = sum(g == 1 for g in groups)
    assert maj_at_k(groups, {1}, 1) == pytest.approx(c / 256, abs=1e-12)  # one sample: its own correctness
    counts = [sum(g == i for g in groups) for i in range(5)]
    assert maj_at_k(groups, {1}, 256) == float(counts[1] == max(counts))  # every sample: a fixed vote
    assert maj_at_k(groups, set(), 64) == 0.0
    assert maj_at_k(groups, {0, 1, 2, 3, 4}, 64) == pytest.approx(1.0, abs=1e-12)  # some answer is always voted
    # two equal groups tie for the top in every draw of all samples, half credit; and symmetric, half credit at any k
    assert maj_at_k([0] * 100 + [1] * 100, {0}, 200) == 0.5
    assert maj_at_k([0] * 100 + [1] * 100, {0}, 37) == pytest.approx(0.5, abs=1e-12)
    # n where C(n, k) overflows a float: still a probability, and a clear majority still wins
    assert 0.99 < majority_from_counts([(1200, True), (400, False)], 0, 800) <= 1.0 + 1e-12


def test_maj_at_k_against_monte_carlo_at_n_64():
    """n = 64, k = 16 (where the sampled estimate was off by up to 0.028): exact vs 100,000 random draws."""
    rng = np.random.default_rng(0)
    groups = rng.choice([-1, 0, 1, 1, 2, 3], size=64)
    draws = np.argsort(rng.random((100_000, 64)), axis=1)[:, :16]
    votes = np.stack([(groups[draws] == g).sum(axis=1) for g in range(4)], axis=1)
    best = votes.max(axis=1, keepdims=True)
    winners = (votes == best) & (best > 0)
    estimate = (winners[:, 1] / np.maximum(winners.sum(axis=1), 1)).mean()  # standard error ~0.0015
    exact = maj_at_k([None if g < 0 else int(g) for g in groups], {1}, 16)
    assert exact == pytest.approx(estimate, abs=0.006)


def test_maj_at_k_is_fast_at_n_256_with_tens_of_groups():
    rng = random.Random(3)
    groups = [rng.choice([None, *range(30)]) for _ in range(256)]
    start = time.perf_counter()
    values = [maj_at_k(groups, {rng.randrange(30)}, k) for k in ks_up_to(256)]
    assert time.perf_counter() - start < 5.0  # ~0.1 s here; the sampled estimate took about as long
    assert all(0.0 <= value <= 1.0 for value in values)


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_all_at_k_matches_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            expected = sum(all(correct[i] for i in subset) for subset in subsets) / len(subsets)
            assert pass_all_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
            assert pass_all_at_k(n, c, k) == pytest.approx(math.comb(c, k) / math.comb(n, k), rel=1e-12)


def test_pass_all_at_k_known_values():
    assert pass_all_at_k(10, 10, 10) == 1.0 and pass_all_at_k(10, 9, 10) == 0.0
    assert pass_all_at_k(4, 2, 1) == pytest.approx(0.5) == pass_at_k(4, 2, 1)  # k = 1: both are mean accuracy
    exact = math.comb(900, 200) / math.comb(1000, 200)  # overflows floats as binomials, not as the product
    assert pass_all_at_k(1000, 900, 200) == pytest.approx(exact, rel=1e-10)
    with pytest.raises(ValueError, match="c must be in"):
        pass_all_at_k(4, 5, 1)


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
