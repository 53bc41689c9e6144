"""Per-problem estimators of sampling metrics from n graded samples: pass@k, pass^k, maj@k, bon@k, weighted maj@k.

Every function scores ONE problem from its n samples; a benchmark score is the mean over problems. All are pure
(numpy and the standard library) and deterministic for a given seed; all but weighted maj@k are exact expectations
over the C(n, k) draws of k samples without replacement.

- pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", the Codex paper): the probability
  that at least one of k samples drawn without replacement from the n is correct, 1 - C(n-c, k) / C(n, k), computed
  as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a large binomial.
- pass^k (Yao et al. 2024, "tau-bench", their pass^k): the probability that ALL k drawn samples are correct,
  C(c, k) / C(n, k) = prod_{i=0}^{k-1} (c-i)/(n-i); a consistency measure that falls with k where pass@k rises.
- bon@k (best-of-k): draw k of the n samples, keep the one with the highest score, count whether it is correct.
  The expectation over all C(n, k) draws is computed exactly (see `bon_at_k`).
- maj@k (majority vote, "self-consistency", Wang et al. 2023): draw k samples, take the answer given most often,
  count whether it is correct. Exact for any n and k from the answer-group counts (see `maj_at_k`).
- weighted maj@k (Yuan et al. 2024, "Free Process Rewards without Process Labels", their "w/ sc"): the same vote
  with each sample weighted by sigmoid(score). A draw's vote depends on WHICH samples it holds, not only on how
  many of each group, so no count-based formula applies: it is averaged over all C(n, k) subsets when there are at
  most `num_subsets`, else over `num_subsets` subsets drawn uniformly with `numpy.random.default_rng(seed)`; so
  weighted maj@n (one subset) is always exact.

Ties: when several answers (or best scores) tie, the draw's credit is the fraction of the tied candidates that are
correct, i.e. a uniformly random tie-break, in expectation. Samples without an answer (group None) do not vote; a
draw where nobody votes counts 0.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


DEFAULT_NUM_SUBSETS = 1000


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")


def _check_c(n: int, c: int) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n] = [0, {n}], got c={c}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Why not `align.losses.pass_at_n.unbiased_pass_at_k` (torch, vectorized over the training step's groups): it
    takes differences of log-gamma values, which lose relative precision as n grows (1e-7 at n = 10^4, 2e-4 at
    n = 10^6 for c = 1), harmless for groups of K <= a few hundred samples but not for reports over many; this
    product of c factors stays within 1e-10 there, and checks its input instead of returning NaN.
    """
    _check_k(n, k)
    _check_c(n, c)
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_all_at_k(n: int, c: int, k: int) -> float:
    """pass^k: the probability that all k samples drawn without replacement are correct, C(c, k) / C(n, k).

    Computed as the product prod_{i=0}^{k-1} (c-i)/(n-i) of k factors in [0, 1] (no large binomial); 0 if c < k.
    """
    _check_k(n, k)
    _check_c(n, c)
    if c < k:
        return 0.0
    return float(np.prod((c - np.arange(k)) / (n - np.arange(k))))


def bon_at_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Best-of-k accuracy: expected correctness of the highest-scored of k samples drawn without replacement.

    Exact: with the samples sorted by score, a block of t samples tied at one score with r samples scored higher
    holds the best of the draw iff the draw avoids all r and includes one of the t, which has probability
    (C(n-r, k) - C(n-r-t, k)) / C(n, k); the credit is then the block's correct fraction (a random tie-break).
    """
    n = len(scores)
    if len(correct) != n:
        raise ValueError(f"scores and correct must have the same length, got {n} and {len(correct)}")
    _check_k(n, k)
    if any(math.isnan(score) for score in scores):
        raise ValueError("scores contain NaN; a scorer must return a number for every sample")
    blocks: dict[float, list[bool]] = {}
    for score, is_correct in zip(scores, correct):
        blocks.setdefault(float(score), []).append(bool(is_correct))
    total, higher, value = math.comb(n, k), 0, 0.0
    for score in sorted(blocks, reverse=True):
        block = blocks[score]
        tied = len(block)
        p_best = (math.comb(n - higher, k) - math.comb(n - higher - tied, k)) / total
        value += p_best * sum(block) / tied
        higher += tied
    return value


def maj_at_k(answer_groups: Sequence[int | None], correct_groups: set[int] | Sequence[bool], k: int) -> float:
    """Majority-vote accuracy: its exact expectation over all C(n, k) draws, from the answer-group counts.

    `answer_groups[i]` is the id of the equivalence class of sample i's extracted answer (None: no answer);
    `correct_groups` is the set of ids whose answer is correct, or a per-sample list of correctness from which the
    correct groups are read off. The formula is derived in `majority_from_counts`.
    """
    n = len(answer_groups)
    _check_k(n, k)
    correct_set = _correct_group_set(answer_groups, correct_groups)
    counts = Counter(group for group in answer_groups if group is not None)
    groups = [(size, group in correct_set) for group, size in counts.items()]
    return majority_from_counts(groups, n - sum(counts.values()), k)


def majority_from_counts(groups: Sequence[tuple[int, bool]], abstained: int, k: int) -> float:
    """Exact maj@k of a problem whose voting samples form `groups` = [(size a_g, correct?)] plus `abstained`
    samples without an answer, for draws of k of the n = abstained + sum a_g samples without replacement.

    A draw takes x_g samples from group g; its credit is |W ∩ correct| / |W| with W = {g : x_g = M}, M = max_g x_g,
    and 0 when M = 0. Derivation:

    1. Thinning. Keep every sample independently with probability θ = k/n: then x_g ~ Binomial(a_g, θ)
       independently, the kept total S ~ Binomial(n, θ), and given S = k the kept set is a uniform k-subset. So
       maj@k = E[credit · 1{S = k}] / P(S = k). (Any θ in (0, 1] gives the same value; θ = k/n puts S = k at the
       mode, so no term under- or overflows where C(n, k) would exceed a float.)
    2. Ties as an integral. 1/|W| = ∫_0^1 u^(|W|-1) du, and credit = Σ_{h correct} 1{x_h = M} / |W|. Sum over the
       winning count m = 1..k: with, per group, L_g(z) = Σ_{x<m} P(x_g = x) z^x (below m) and
       E_g(z) = P(x_g = m) z^m (at m), the generating function of the draws where h ties at the top with j others
       is E_h Π_{g≠h} (L_g + u E_g) (u counts the others at m), so
       E[credit · 1{S = k}] = Σ_m ∫_0^1 [z^k] Σ_{h correct} E_h Π_{g≠h} (L_g + u E_g) du,
       and ∫_0^1 u^j du = 1/(j+1) turns the coefficient of u^j into its share of the credit.
    3. A group with a_g < m never reaches m: its factor is its whole Binomial(a_g, θ), and together with the
       abstainers these form one Binomial(rest, θ) factor in closed form. Only the groups with a_g >= m (at most
       n/m of them) enter the product, which is built one group at a time with the product rule: A = Π (L + uE),
       D = Σ_h E_h Π_{g≠h} (L + uE) (h over the correct groups so far), truncated at degree k in z and k/m in u.

    Cost: for each m up to the largest correct group, one polynomial product per group of size >= m, about
    n·k²·ln k multiply-adds in all: here ~10 ms for every reported k of one problem at n = 64, ~50 ms at n = 256
    with 30 answer groups.
    """
    n = abstained + sum(size for size, _ in groups)
    _check_k(n, k)
    top = max((size for size, correct in groups if correct), default=0)  # credit needs a correct group at M
    theta = k / n
    value = 0.0
    for m in range(1, min(k, top) + 1):
        reaching = [(size, correct) for size, correct in groups if size >= m]
        rest = n - sum(size for size, _ in reaching)
        width = min(len(reaching), k // m) + 1  # powers of u that can still meet z^k
        state = np.zeros((2, width, k + 1))  # state[0] = A, state[1] = D; [., j, s]: coefficient of u^j z^s
        state[0, 0, 0] = 1.0
        for size, correct in reaching:
            pmf = _binomial_pmf(size, theta)
            updated = _times_factor(state, pmf[:m], pmf[m], m)
            if correct:  # product rule: D gains E_h · A (A before this group's factor)
                updated[1, :, m:] += pmf[m] * state[0, :, : k + 1 - m]
            state = updated
        shares = (1.0 / np.arange(1, width + 1)) @ state[1]  # ∫ u^j du, per z-degree s
        # [z^k] of (the product) × Binomial(rest, θ): the other k - s kept samples are among the `rest`
        low = max(0, k - rest)
        value += float(shares[low:] @ _binomial_pmf(rest, theta)[k - low :: -1])
    return value / float(_binomial_pmf(n, theta)[k])


@functools.lru_cache(maxsize=4096)  # a benchmark's problems share n and k, so the same (size, θ) recur
def _binomial_pmf(size: int, theta: float) -> np.ndarray:
    """P(X = x) for x = 0..size, X ~ Binomial(size, θ), as exp(log C(size, x) + x log θ + (size-x) log(1-θ)).

    log C(size, x) is the log of the exact integer (built up as C(size, x+1) = C(size, x)·(size-x)/(x+1)): no float
    overflow where C(size, x) > 1e308, and 1e-14 relative accuracy where a log-gamma difference loses 1e-12.
    Read-only, as the cache hands out the same array every time.
    """
    x = np.arange(size + 1)
    if theta >= 1.0:
        pmf = (x == size).astype(float)
    else:
        log_binomial, binomial = np.empty(size + 1), 1
        for i in range(size + 1):
            log_binomial[i] = math.log(binomial)
            binomial = binomial * (size - i) // (i + 1)
        pmf = np.exp(log_binomial + x * math.log(theta) + (size - x) * math.log1p(-theta))
    pmf.flags.writeable = False
    return pmf


def _times_factor(polys: np.ndarray, below: np.ndarray, at: float, m: int) -> np.ndarray:
    """Each polys[i](u, z) · (L(z) + u·at·z^m) with L(z) = Σ_x below[x] z^x, truncated to polys' shape
    (polynomials, u-rows, z-columns).

    The z-convolution of every row is one `np.convolve` of the rows laid end to end, each padded with len(below)-1
    zeros so that no row's product runs into the next one.
    """
    *rows, columns = polys.shape
    padded = np.zeros((*rows, columns + len(below) - 1))
    padded[..., :columns] = polys
    out = np.convolve(padded.ravel(), below)[: padded.size].reshape(padded.shape)[..., :columns]
    out[:, 1:, m:] += at * polys[:, :-1, : columns - m]
    return out


def weighted_maj_at_k(
    answer_groups: Sequence[int | None],
    scores: Sequence[float] | None,
    correct_groups: set[int] | Sequence[bool],
    k: int,
    seed: int = 0,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
) -> float:
    """Weighted majority vote over k-subsets: each sample votes for its answer with weight sigmoid(score).

    Averaged over all k-subsets if there are at most `num_subsets`, else over `num_subsets` random ones (seeded);
    with `scores=None` every weight is 1, which is plain maj@k, computed exactly by `maj_at_k`.
    """
    if scores is None:
        return maj_at_k(answer_groups, correct_groups, k)
    n = len(answer_groups)
    _check_k(n, k)
    correct_set = _correct_group_set(answer_groups, correct_groups)
    voters = [i for i, group in enumerate(answer_groups) if group is not None]
    if not voters:
        return 0.0
    # Dense group ids 0..G-1 for the voting samples; non-voters get weight 0 on a dummy group.
    ids = {group: index for index, group in enumerate(dict.fromkeys(answer_groups[i] for i in voters))}
    group_of = np.array([ids.get(group, 0) for group in answer_groups])
    weights = np.zeros(n)
    if len(scores) != n:
        raise ValueError(f"scores must have one entry per sample ({n}), got {len(scores)}")
    values = np.asarray(scores, dtype=float)
    if np.isnan(values[voters]).any():
        raise ValueError("scores contain NaN; a scorer must return a number for every sample")
    weights[voters] = 1.0 / (1.0 + np.exp(-values[voters]))
    is_correct_group = np.array([group in correct_set for group in ids], dtype=float)

    subsets = _subsets(n, k, seed, num_subsets)  # (S, k) sample indices
    votes = np.zeros((len(subsets), len(ids)))
    rows = np.repeat(np.arange(len(subsets)), k)
    np.add.at(votes, (rows, group_of[subsets].ravel()), weights[subsets].ravel())
    best = votes.max(axis=1, keepdims=True)
    # Winners: groups within float noise of the top vote (a tie), among draws where someone voted at all.
    winners = (votes >= best - 1e-12 * np.maximum(best, 1.0)) & (best > 0)
    credit = (winners * is_correct_group).sum(axis=1) / np.maximum(winners.sum(axis=1), 1)
    return float(credit.mean())


def _correct_group_set(answer_groups, correct_groups) -> set:
    if isinstance(correct_groups, set | frozenset):
        return set(correct_groups)
    if len(correct_groups) != len(answer_groups):
        raise ValueError(
            f"correct_groups as a per-sample list must have one entry per sample ({len(answer_groups)}), "
            f"got {len(correct_groups)}"
        )
    return {group for group, ok in zip(answer_groups, correct_groups) if ok and group is not None}


def _subsets(n: int, k: int, seed: int, num_subsets: int) -> np.ndarray:
    """All k-subsets of range(n) if there are at most `num_subsets`, else `num_subsets` uniform random ones."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if math.comb(n, k) <= num_subsets:
        return np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    rng = np.random.default_rng(seed)
    # argsort of uniform keys = a uniform random permutation per row; its first k entries = a uniform k-subset
    return np.argsort(rng.random((num_subsets, n)), axis=1)[:, :k]


def ks_up_to(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, plus n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]
