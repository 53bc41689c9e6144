"""Per-problem estimators of sampling metrics from n graded samples: pass@k, maj@k, bon@k, weighted maj@k.

Every function scores ONE problem from its n samples; a benchmark score is the mean over problems. All are pure
(numpy and the standard library), deterministic for a given seed, and exact whenever exactness is affordable.

- pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", the Codex paper): the probability
  that at least one of k samples drawn without replacement from the n is correct, 1 - C(n-c, k) / C(n, k), computed
  as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a large binomial.
- bon@k (best-of-k): draw k of the n samples, keep the one with the highest score, count whether it is correct.
  The expectation over all C(n, k) draws is computed exactly (see `bon_at_k`).
- maj@k (majority vote, "self-consistency", Wang et al. 2023): draw k samples, take the answer given most often,
  count whether it is correct. weighted maj@k (Yuan et al. 2024, "Free Process Rewards without Process Labels",
  their "w/ sc"): the same vote with each sample weighted by sigmoid(score). Both are averaged over k-subsets: all
  C(n, k) of them when there are at most `num_subsets`, else `num_subsets` subsets drawn uniformly with
  `numpy.random.default_rng(seed)`; so maj@n (one subset) is always exact.

Ties: when several answers (or best scores) tie, the draw's credit is the fraction of the tied candidates that are
correct, i.e. a uniformly random tie-break, in expectation. Samples without an answer (group None) do not vote; a
draw where nobody votes counts 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


DEFAULT_NUM_SUBSETS = 1000


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Why not `align.losses.pass_at_n.unbiased_pass_at_k` (torch, vectorized over the training step's groups): it
    takes differences of log-gamma values, which lose relative precision as n grows (1e-7 at n = 10^4, 2e-4 at
    n = 10^6 for c = 1), harmless for groups of K <= a few hundred samples but not for reports over many; this
    product of c factors stays within 1e-10 there, and checks its input instead of returning NaN.
    """
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n] = [0, {n}], got c={c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


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


def maj_at_k(
    answer_groups: Sequence[int | None],
    correct_groups: set[int] | Sequence[bool],
    k: int,
    seed: int = 0,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
) -> float:
    """Majority-vote accuracy over k-subsets of the n samples.

    `answer_groups[i]` is the id of the equivalence class of sample i's extracted answer (None: no answer);
    `correct_groups` is the set of ids whose answer is correct, or a per-sample list of correctness from which the
    correct groups are read off.
    """
    return weighted_maj_at_k(answer_groups, None, correct_groups, k, seed, num_subsets)


def weighted_maj_at_k(
    answer_groups: Sequence[int | None],
    scores: Sequence[float] | None,
    correct_groups: set[int] | Sequence[bool],
    k: int,
    seed: int = 0,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
) -> float:
    """Weighted majority vote over k-subsets: each sample votes for its answer with weight sigmoid(score).

    With `scores=None` every weight is 1 (plain `maj_at_k`).
    """
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
    if scores is None:
        weights[voters] = 1.0
    else:
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
