"""What is graded, in-process and without a timeout: a completion's final answer against a gold answer (math-verify).

These functions run inside the pool's worker processes (`align.grading.worker`), which add the timeouts and the
memory cap that untrusted model output needs. Trusted code (benchmarks, tests) may call them directly.

- the prediction is the completion's final answer (`align.data.answers.final_answer`): its last non-empty
  `\\boxed{...}`, else the math right after its last "answer is" / "answer:". A completion with neither has
  verdict `no_answer`. This is stricter than math-verify's own extraction, which also takes any math within 50
  characters after the word "answer": on small models that turns a restated question ("the answer to $80 - 18$
  is ...") into a correct verdict for "What is $80 - 18$?". Bare numbers in prose are not answers either: the
  prompt asks for `\\boxed{}`;
- the gold is the dataset's `answer` field. Both are parsed by math-verify's LaTeX path as `\\boxed{...}` (its
  plain-expression path goes through sympy's `parse_expr`, an `eval`, and is never run on model output);
- equivalence is `math_verify.verify(gold, prediction)`: string match, numeric match (6 decimals), symbolic
  simplification, sets, intervals, tuples and matrices, after math-verify's normalization of units, `^\\circ`,
  `\\%`, `\\text{}`, `\\left`/`\\right`, `\\frac12`, ... Injection strings such as
  `\\boxed{__import__('os').system('...')}` are LaTeX to the parser: a product of symbols, never code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


VERDICTS = ("correct", "incorrect", "no_answer", "timeout")


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one completion, and the answer extracted from it (None when nothing was extracted)."""

    verdict: str  # one of VERDICTS
    extracted: str | None

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


@lru_cache(maxsize=1)
def extraction_config():
    """math-verify's LaTeX extraction with every normalization on and `\\boxed{}` matched first."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    normalization = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all")
    return [LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0)]


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    """An answer (gold or extracted) parsed as `\\boxed{answer}`; cached because n samples share a gold."""
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", extraction_config(), parsing_timeout=None))


def grade_answer(completion: str, gold: str) -> tuple[str, str | None]:
    """(verdict, extracted answer) of one completion. No timeout of its own: run it through `Grader`."""
    from math_verify import verify

    from align.data.answers import final_answer

    extracted = final_answer(completion)
    if extracted is None:
        return "no_answer", None
    predicted, reference = _parse_answer(extracted), _parse_answer(gold)
    if not predicted or not reference:
        return "incorrect", extracted
    correct = verify(list(reference), list(predicted), timeout_seconds=None)
    return ("correct" if correct else "incorrect"), extracted


def answers_equivalent(a: str, b: str) -> bool:
    """Whether two extracted answers are the same mathematical object (math-verify, `a` taken as the gold)."""
    from math_verify import verify

    if a.strip() == b.strip():
        return True
    first, second = _parse_answer(a), _parse_answer(b)
    return bool(first and second) and verify(list(first), list(second), timeout_seconds=None)


# The operations a worker serves, by name, and what an item of each counts as when grading it runs out of time or
# fails (a crash or a bug inside math-verify): never `correct`.
OPERATIONS = {"grade": grade_answer, "equivalent": answers_equivalent}
TIMED_OUT = {"grade": ("timeout", None), "equivalent": False}
FAILED = {"grade": ("incorrect", None), "equivalent": False}
