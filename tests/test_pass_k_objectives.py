"""The pass@k objectives of align.losses.pass_k against brute force, the reference test vectors, exact unbiasedness,
invariances and their k = 1 limits.

Brute force enumerates every k-subset of a group with exact Fractions (/work/shared/reference/pass-k.md gives the
definitions); the float64 weights must match to 1e-12 for every K <= 10, every c and every valid k, and for
continuous rewards with ties and negative values.
"""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.losses.pass_k import (
    OBJECTIVES,
    PASS_K_OBJECTIVES,
    dco_advantages,
    grpo_advantages,
    max_k_loo_advantages,
    pass_k_advantages,
    passk_analytic_advantages,
    pkpo_advantages,
    risk_seeking_advantages,
)


TOL = 1e-12


def binary(K: int, c: int) -> list[Fraction]:
    return [Fraction(1)] * c + [Fraction(0)] * (K - c)


def as_tensor(*groups) -> torch.Tensor:
    return torch.tensor([[float(g) for g in group] for group in groups], dtype=torch.float64)


def subsets_with(n: int, k: int, i: int, among=None):
    pool = [j for j in (range(n) if among is None else among)]
    return [s for s in itertools.combinations(pool, k) if i in s]


def max_of(g, subset) -> Fraction:
    return max((g[j] for j in subset), default=Fraction(0))


# --- brute-force definitions -----------------------------------------------------------------------------------------


def brute_plain(g, k):
    """T_i = C(n, k)^-1 Σ_{|S|=k, S∋i} max_S g (PKPO Eq. 27)."""
    n = len(g)
    return [sum(max_of(g, s) for s in subsets_with(n, k, i)) / math.comb(n, k) for i in range(n)]


def brute_loo(g, k):
    """PKPO Eq. 29: s_i - (n-1)^-1 Σ_{j≠i} S(j, k, [n]∖i), S(j, k, A) = C(|A|, k)^-1 Σ_{Z⊆A, |Z|=k, Z∋j} max_Z g."""
    n = len(g)
    s = brute_plain(g, k)
    out = []
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        baseline = sum(sum(max_of(g, z) for z in subsets_with(n, k, j, rest)) / math.comb(n - 1, k) for j in rest) / (
            n - 1
        )
        out.append(s[i] - baseline)
    return out


def brute_loo_minus_one(g, k):
    """PKPO Eq. 33: C(n, k)^-1 Σ_{Z∋i} (max_Z g - max_{Z∖i} g); at k = 1, (g_i - mean_{j≠i} g_j) / n."""
    n = len(g)
    if k == 1:
        return [(g[i] - (sum(g) - g[i]) / (n - 1)) / n for i in range(n)]
    return [
        sum(max_of(g, z) - max_of(g, [j for j in z if j != i]) for z in subsets_with(n, k, i)) / math.comb(n, k)
        for i in range(n)
    ]


def brute_analytic(g, k):
    """Chen et al.: mean over the k-subsets Z ∋ i of (max_Z r - R̄)/σ, R̄ and σ² the mean and variance of max_Z r
    over all k-subsets; 0 where σ = 0."""
    n = len(g)
    values = [max_of(g, z) for z in itertools.combinations(range(n), k)]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    if variance == 0:
        return [0.0] * n
    sigma = math.sqrt(variance)
    return [
        float(sum(max_of(g, z) - mean for z in subsets_with(n, k, i)) / math.comb(n - 1, k - 1)) / sigma
        for i in range(n)
    ]


def brute_max_k_loo(g):
    """max_j g_j - max_{j≠i} g_j."""
    return [max(g) - max(g[j] for j in range(len(g)) if j != i) for i in range(len(g))]


def brute_risk_seeking(g, beta):
    mean = sum(math.exp(beta * float(x)) for x in g) / len(g)
    return [(math.exp(beta * float(x)) / mean - 1) / beta for x in g]


def assert_matches(actual: torch.Tensor, expected, tol=TOL):
    expected = [float(e) for e in expected]
    assert actual.dtype == torch.float64
    for a, e in zip(actual.tolist(), expected, strict=True):
        assert abs(a - e) <= tol * max(1.0, abs(e)), (actual.tolist(), expected)


def valid_ks(objective: str, estimator: str | None, K: int):
    if objective == "pkpo" and estimator == "loo":
        return range(1, K)
    if objective == "pkpo" and estimator == "loo-1" and K == 1:
        return range(0)
    return range(1, K + 1)


# --- brute force over every (K <= 10, c, k), binary rewards ----------------------------------------------------------


@pytest.mark.parametrize("K", range(1, 11))
def test_pkpo_matches_brute_force_for_every_c_and_k(K):
    for estimator, brute in (("plain", brute_plain), ("loo", brute_loo), ("loo-1", brute_loo_minus_one)):
        for k in valid_ks("pkpo", estimator, K):
            for c in range(K + 1):
                g = binary(K, c)
                assert_matches(pkpo_advantages(as_tensor(g), k, estimator)[0], brute(g, k))


@pytest.mark.parametrize("K", range(1, 11))
def test_passk_analytic_matches_brute_force_for_every_c_and_k(K):
    for k in range(1, K + 1):
        for c in range(K + 1):
            g = binary(K, c)
            assert_matches(passk_analytic_advantages(as_tensor(g), k)[0], brute_analytic(g, k))


@pytest.mark.parametrize("K", range(1, 11))
def test_max_k_loo_and_risk_seeking_match_their_definitions(K):
    for c in range(K + 1):
        g = binary(K, c)
        expected = brute_max_k_loo(g) if K >= 2 else [0]
        assert_matches(max_k_loo_advantages(as_tensor(g))[0], expected)
        if K >= 2:  # max_k_loo is PKPO's loo-1 at k = n
            assert_matches(max_k_loo_advantages(as_tensor(g))[0], brute_loo_minus_one(g, K))
        for beta in (0.5, 2.0, 5.0):
            expected = brute_risk_seeking(g, beta) if K >= 2 else [0]
            assert_matches(risk_seeking_advantages(as_tensor(g), beta)[0], expected)
            if 0 < c < K:  # binary closed form (r_i - p̂) J'(p̂)
                p = c / K
                slope = math.expm1(beta) / (beta * (1 + p * math.expm1(beta)))
                assert_matches(risk_seeking_advantages(as_tensor(g), beta)[0], [(float(r) - p) * slope for r in g])


def test_continuous_rewards_with_ties_and_negative_values():
    rng = random.Random(0)
    for _ in range(60):
        K = rng.randint(2, 8)
        g = [Fraction(rng.randint(-4, 4), rng.choice([1, 2, 3])) for _ in range(K)]  # many ties
        rewards = as_tensor(g)
        for k in range(1, K + 1):
            assert_matches(pkpo_advantages(rewards, k, "plain")[0], brute_plain(g, k))
            assert_matches(pkpo_advantages(rewards, k, "loo-1")[0], brute_loo_minus_one(g, k))
            if k < K:
                assert_matches(pkpo_advantages(rewards, k, "loo")[0], brute_loo(g, k))
        assert_matches(max_k_loo_advantages(rewards)[0], brute_max_k_loo(g))
        assert_matches(risk_seeking_advantages(rewards, 2.0)[0], brute_risk_seeking(g, 2.0))
        assert_matches(grpo_advantages(rewards)[0], [x - sum(g) / K for x in g])


# --- the reference's test vectors (pass-k-test-vectors.md) -----------------------------------------------------------

F = Fraction
# (K, k, c): (s+, s-, sloo+, sloo-, sloo1+, chen+, chen-); None where the weight does not exist
VECTORS = {
    (4, 1, 1): (F(1, 4), 0, F(1, 4), F(-1, 9), None, 1.73205, -0.57735),
    (4, 1, 3): (F(1, 4), 0, F(1, 36), F(-1, 3), None, 0.57735, -1.73205),
    (4, 2, 1): (F(1, 2), F(1, 6), F(1, 2), F(-5, 18), F(1, 2), 1, -0.333333),
    (4, 2, 2): (F(1, 2), F(1, 3), F(1, 18), F(-1, 3), F(1, 3), 0.447214, -0.447214),
    (4, 2, 3): (F(1, 2), F(1, 2), F(-1, 6), F(-1, 6), F(1, 6), 0, 0),
    (4, 4, 1): (1, 1, None, None, 1, 0, 0),
    (8, 2, 3): (F(1, 4), F(3, 28), F(59, 588), F(-19, 196), F(5, 28), 0.745356, -0.447214),
    (8, 2, 6): (F(1, 4), F(3, 14), F(-13, 588), F(-1, 14), F(1, 14), 0.19245, -0.57735),
    (8, 4, 2): (F(1, 2), F(5, 14), F(17, 98), F(-13, 98), F(2, 7), 0.522233, -0.174078),
    (8, 4, 4): (F(1, 2), F(17, 35), F(-27, 490), F(-3, 35), F(2, 35), 0.120386, -0.120386),
    (8, 4, 5): (F(1, 2), F(1, 2), F(-1, 14), F(-1, 14), F(1, 70), 0, 0),
    (8, 8, 1): (1, 1, None, None, 1, 0, 0),
}


@pytest.mark.parametrize(("K", "k", "c"), sorted(VECTORS))
def test_reference_vectors(K, k, c):
    s_pos, s_neg, loo_pos, loo_neg, loo1_pos, chen_pos, chen_neg = VECTORS[(K, k, c)]
    rewards = as_tensor(binary(K, c))

    def check(weights, positive, negative, tol):
        assert weights[0, 0].item() == pytest.approx(float(positive), abs=tol)
        assert weights[0, -1].item() == pytest.approx(float(negative), abs=tol)

    check(pkpo_advantages(rewards, k, "plain"), s_pos, s_neg, 1e-15)
    if loo_pos is not None:
        check(pkpo_advantages(rewards, k, "loo"), loo_pos, loo_neg, 1e-15)
    if loo1_pos is not None:
        check(pkpo_advantages(rewards, k, "loo-1"), loo1_pos, 0, 1e-15)
    check(passk_analytic_advantages(rewards, k), chen_pos, chen_neg, 1e-5)


def test_reference_vectors_k_free_and_dco():
    # RS-GRPO beta = 2, K = 8: c = 1 -> (1.55408, -0.222011), c = 4 -> (0.380797, -0.380797)
    for c, (positive, negative) in {1: (1.55408, -0.222011), 4: (0.380797, -0.380797)}.items():
        weights = risk_seeking_advantages(as_tensor(binary(8, c)))  # the default beta is the paper's 2
        assert (weights[0, 0].item(), weights[0, -1].item()) == pytest.approx((positive, negative), abs=1e-5)
    # verl grpo_passk without std: the single correct sample gets 1 when c = 1, nothing otherwise
    assert max_k_loo_advantages(as_tensor(binary(8, 1))).tolist() == [[1.0] + [0.0] * 7]
    assert max_k_loo_advantages(as_tensor(binary(8, 2))).abs().sum() == 0
    # DCO, K = 8, N = 4: the weight per correct sample for c = 2 is 54/175
    assert dco_advantages(as_tensor(binary(8, 2)), 4)[0, 0].item() == pytest.approx(54 / 175, rel=1e-12)
    assert dco_advantages(as_tensor(binary(4, 2)), 2)[0, 0].item() == pytest.approx(1 / 3, rel=1e-12)


# --- exact unbiasedness under a Bernoulli(p) policy ------------------------------------------------------------------


def bernoulli_expected_gradient(weights_fn, n: int, p: Fraction) -> float:
    """E[Σ_i w_i d/dp log π(y_i)] over every {0,1}^n group, with d/dp log π(y) = (y - p) / (p (1 - p))."""
    total = 0.0
    for outcome in itertools.product((0, 1), repeat=n):
        probability = float(p ** sum(outcome) * (1 - p) ** (n - sum(outcome)))
        weights = weights_fn(as_tensor(outcome))[0].tolist()
        total += probability * sum(w * float((y - p) / (p * (1 - p))) for w, y in zip(weights, outcome))
    return total


@pytest.mark.parametrize("n", [4, 6])
@pytest.mark.parametrize("p", [Fraction(1, 3), Fraction(1, 10)])
def test_pkpo_and_max_k_loo_are_unbiased_for_the_pass_at_k_gradient(n, p):
    for k in range(1, n + 1):
        target = k * float(1 - p) ** (k - 1)  # d/dp (1 - (1 - p)^k)
        for estimator in ("plain", "loo", "loo-1"):
            if estimator == "loo" and k == n:
                continue
            estimate = bernoulli_expected_gradient(lambda r, k=k, e=estimator: pkpo_advantages(r, k, e), n, p)
            assert estimate == pytest.approx(target, rel=1e-12), (k, estimator)
    estimate = bernoulli_expected_gradient(max_k_loo_advantages, n, p)
    assert estimate == pytest.approx(n * float(1 - p) ** (n - 1), rel=1e-12)


def test_passk_analytic_is_the_centred_rescaled_pkpo_estimator():
    """σ A = (n/k) s - R̄ (Chen's advantage is PKPO's plain s, centred by its group mean and divided by σ)."""
    for K in (4, 7, 10):
        for k in range(1, K):
            for c in range(1, K):
                rewards = as_tensor(binary(K, c))
                mean = 1 - math.comb(K - c, k) / math.comb(K, k)
                if mean in (0.0, 1.0):
                    continue
                sigma = math.sqrt(mean * (1 - mean))
                expected = (K / k) * pkpo_advantages(rewards, k, "plain") - mean
                torch.testing.assert_close(sigma * passk_analytic_advantages(rewards, k), expected, rtol=0, atol=1e-13)


# --- invariances (hypothesis) ----------------------------------------------------------------------------------------

rewards_lists = st.lists(st.integers(-3, 3).map(lambda x: x / 2), min_size=2, max_size=9)
binary_lists = st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=9)


def every_objective(values: list[float], k: int):
    """name -> advantages of one group, for every objective and estimator that accepts these rewards and k."""
    rewards = torch.tensor([values], dtype=torch.float64)
    out = {
        "pkpo-plain": pkpo_advantages(rewards, k, "plain"),
        "pkpo-loo-1": pkpo_advantages(rewards, k, "loo-1"),
        "max_k_loo": max_k_loo_advantages(rewards),
        "risk_seeking": risk_seeking_advantages(rewards, 2.0),
        "grpo": grpo_advantages(rewards),
    }
    if k < len(values):
        out["pkpo-loo"] = pkpo_advantages(rewards, k, "loo")
    if set(values) <= {0.0, 1.0}:
        out["passk_analytic"] = passk_analytic_advantages(rewards, k)
        out["dco-plain"] = dco_advantages(rewards, k)
        if len(values) >= 2:
            out["dco-loo"] = dco_advantages(rewards, k, "loo")
    return out


@settings(max_examples=80, deadline=None)
@given(st.one_of(rewards_lists, binary_lists), st.data())
def test_permuting_a_group_permutes_its_advantages(values, data):
    k = data.draw(st.integers(1, len(values)))
    permutation = data.draw(st.permutations(range(len(values))))
    original = every_objective(values, k)
    permuted = every_objective([values[i] for i in permutation], k)
    for name, weights in original.items():
        torch.testing.assert_close(permuted[name][0], weights[0][list(permutation)], rtol=0, atol=1e-14, msg=name)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.data())
def test_all_wrong_and_all_correct_groups(K, data):
    k = data.draw(st.integers(1, K))
    for name, weights in every_objective([0.0] * K, k).items():
        assert weights.abs().max().item() == 0.0, name  # nothing to learn from an unsolved group
    correct = every_objective([1.0] * K, k)
    zero = {"pkpo-loo-1", "max_k_loo", "risk_seeking", "grpo", "passk_analytic"} | ({"dco-loo"} if K >= 2 else set())
    if k >= 2:
        zero |= {"dco-plain"}  # F(N, 1) = 0 for N >= 2; N = 1 is cross-entropy: 1/c
    for name in zero:
        assert correct[name].abs().max().item() <= 1e-15, name
    # PKPO without the loo-1 baseline still pushes a solved group: s = k/n, s^(loo) = -k/(n(n-1)) (reference A.4)
    torch.testing.assert_close(correct["pkpo-plain"], torch.full((1, K), k / K, dtype=torch.float64))
    if k < K:
        torch.testing.assert_close(correct["pkpo-loo"], torch.full((1, K), -k / (K * (K - 1)), dtype=torch.float64))


@settings(max_examples=80, deadline=None)
@given(rewards_lists, st.data(), st.floats(-5, 5), st.floats(0.25, 4))
def test_loo_minus_one_is_non_negative_shift_invariant_and_scale_equivariant(values, data, shift, scale):
    k = data.draw(st.integers(2, len(values)))
    rewards = torch.tensor([values], dtype=torch.float64)
    weights = pkpo_advantages(rewards, k)  # loo-1 is the default
    assert weights.min().item() >= 0.0
    torch.testing.assert_close(pkpo_advantages(rewards + shift, k), weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(pkpo_advantages(rewards * scale, k), weights * scale, rtol=1e-12, atol=1e-14)
    # Σ_i s_i = k ρ^g(n, k) for the plain estimator, ρ^g = C(n,k)^-1 Σ_r C(r-1, k-1) g_(r)
    g = sorted(values)
    rho = sum(math.comb(r, k - 1) * g[r] for r in range(len(g))) / math.comb(len(g), k)
    assert pkpo_advantages(rewards, k, "plain").sum().item() == pytest.approx(k * rho, abs=1e-12)
    assert risk_seeking_advantages(rewards).sum().item() == pytest.approx(0.0, abs=1e-12)


# --- k = 1 limits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[1, 0, 0, 1, 0], [0.5, -1, 2, 2, 0, 3], [1, 0]])
def test_k_equals_one_limits(values):
    rewards = torch.tensor([values], dtype=torch.float64)
    n = len(values)
    grpo = grpo_advantages(rewards)
    torch.testing.assert_close(pkpo_advantages(rewards, 1, "plain"), rewards / n)  # REINFORCE g_i / n
    torch.testing.assert_close(pkpo_advantages(rewards, 1, "loo-1"), grpo / (n - 1))  # RLOO / n (Eq. 26)
    torch.testing.assert_close(risk_seeking_advantages(rewards, 1e-7), grpo, rtol=0, atol=1e-6)  # β -> 0
    if set(values) <= {0, 1}:
        # Chen et al. at k = 1: GRPO's (r - p̂)/std with the population std
        torch.testing.assert_close(passk_analytic_advantages(rewards, 1), grpo / rewards.std(correction=0))
        c = sum(values)
        torch.testing.assert_close(dco_advantages(rewards, 1), rewards / c)  # N = 1: cross-entropy, ∇log p


def test_group_of_two_gets_the_gap():
    assert max_k_loo_advantages(torch.tensor([[0.25, 1.0]])).tolist() == [[0.0, 0.75]]


# --- numerics, unscored samples, errors ------------------------------------------------------------------------------


def test_large_groups_are_exact():
    rng = random.Random(1)
    g = [Fraction(rng.randint(0, 20), 10) for _ in range(64)]
    k = 32
    weights = pkpo_advantages(as_tensor(g), k)[0].tolist()
    order = sorted(range(64), key=lambda i: g[i])
    ranked = [g[i] for i in order]
    # simplest form s_(r) = C(n,k)^-1 Σ_{j<r} C(j-1, k-2)(g_(r) - g_(j)), exact
    for r, i in enumerate(order):
        exact = sum(math.comb(j, k - 2) * (ranked[r] - ranked[j]) for j in range(r)) / math.comb(64, k)
        assert weights[i] == pytest.approx(float(exact), rel=1e-12, abs=1e-300)
    for estimator in ("plain", "loo", "loo-1"):
        big = pkpo_advantages(torch.rand(3, 1000, generator=torch.Generator().manual_seed(0)), 500, estimator)
        assert torch.isfinite(big).all()
    assert torch.isfinite(passk_analytic_advantages((torch.rand(2, 1000) < 0.01).double(), 500)).all()


def test_unscored_samples_are_left_out_of_their_group():
    rewards = torch.tensor([[1.0, math.nan, 0.0, 0.0, 1.0], [math.nan, math.nan, math.nan, 1.0, 0.0]])
    for name in PASS_K_OBJECTIVES:
        weights = pass_k_advantages(name, rewards, k=2)
        alone = pass_k_advantages(name, torch.tensor([[1.0, 0.0, 0.0, 1.0]]), k=2)
        torch.testing.assert_close(weights[0, [0, 2, 3, 4]], alone[0], msg=name)
        assert weights[0, 1] == 0 and (weights[1, :3] == 0).all(), name
        pair = pass_k_advantages(name, torch.tensor([[1.0, 0.0]]), k=2)
        torch.testing.assert_close(weights[1, 3:], pair[0], msg=name)
    # too few scored samples for k: nothing
    assert pkpo_advantages(torch.tensor([[1.0, math.nan, math.nan, 0.0]]), 3).abs().sum() == 0


def test_float32_input_and_output_dtype():
    weights = pkpo_advantages(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float32), 2)
    assert weights.dtype == torch.float64


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: pkpo_advantages(r, 5), r"k must be an integer in \[1, 4\]"),
        (lambda r: pkpo_advantages(r, 0), "k must be an integer"),
        (lambda r: pkpo_advantages(r, 1.5), "k must be an integer"),
        (lambda r: pkpo_advantages(r, 4, "loo"), r"pkpo \(loo\): k must be an integer in \[1, 3\]"),
        (lambda r: pkpo_advantages(r, 2, "rloo"), "pkpo estimator must be one of"),
        (lambda r: passk_analytic_advantages(r, 5), "passk_analytic: k must be"),
        (lambda r: passk_analytic_advantages(r * 0.5, 2), "passk_analytic advantages need a binary"),
        (lambda r: risk_seeking_advantages(r, 0.0), "beta must be a finite number > 0"),
        (lambda r: risk_seeking_advantages(r, math.inf), "beta must be a finite number > 0"),
        (lambda r: pass_k_advantages("pass@k", r), "pass@k objective must be one of"),
        (lambda r: grpo_advantages(r[0]), "rewards must be"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert "\n" not in str(error.value)


def test_the_table_dispatches_each_objectives_parameters():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert set(OBJECTIVES) == {"dco", "pkpo", "passk_analytic", "max_k_loo", "risk_seeking", "grpo"}
    torch.testing.assert_close(pass_k_advantages("pkpo", rewards, k=2), pkpo_advantages(rewards, 2, "loo-1"))
    torch.testing.assert_close(
        pass_k_advantages("pkpo", rewards, k=2, estimator="plain"), pkpo_advantages(rewards, 2, "plain")
    )
    torch.testing.assert_close(
        pass_k_advantages("dco", rewards, k=16, estimator="loo"), dco_advantages(rewards, 16, "loo")
    )
    torch.testing.assert_close(
        pass_k_advantages("risk_seeking", rewards, k=3, beta=1.0), risk_seeking_advantages(rewards, 1.0)
    )
    torch.testing.assert_close(pass_k_advantages("max_k_loo", rewards, k=3), max_k_loo_advantages(rewards))
    for name, entry in OBJECTIVES.items():
        assert entry.paper.startswith("arXiv"), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rewards = (torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) < 0.4).double()
    rewards[3, 2] = math.nan  # a group with an unscored sample
    continuous = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in PASS_K_OBJECTIVES:
        for values in (rewards, continuous) if not OBJECTIVES[name].binary_only else (rewards,):
            on_gpu = pass_k_advantages(name, values.cuda(), k=3)
            assert on_gpu.device.type == "cuda", name
            torch.testing.assert_close(on_gpu.cpu(), pass_k_advantages(name, values, k=3), rtol=1e-12, atol=1e-14)
