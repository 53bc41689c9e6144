"""An offline, seeded generator of MATH-format problems with step-by-step solutions.

It is the default task of every CPU recipe, the demo and the tests, so it is sized for small models: level 1
(two-number addition/subtraction) is within reach of SmolLM2-135M-Instruct after light fine-tuning, and each level
above adds one kind of reasoning:

| level | subject        | kind of problem                                              |
| ----- | -------------- | ------------------------------------------------------------ |
| 1     | Arithmetic     | a + b, a - b with two-digit numbers                          |
| 2     | Arithmetic     | a * b + c, a * b - c                                         |
| 3     | Algebra        | solve a*x + b = c for an integer x                           |
| 4     | Fractions      | p/q + r/s or p/q * r/s, answer in lowest terms               |
| 5     | Word problems  | a three-step story problem (buy, give away, share equally)   |

Solutions are steps separated by blank lines ending in `The answer is \\boxed{...}.`, like MATH. The train and
test splits are disjoint by construction: a problem's split is decided by a hash of its canonical text, so no
seed or size can put the same problem in both. `corrupt_solution` produces a plausible wrong solution (one
arithmetic slip, propagated to the answer) for offline preference pairs and outcome labels.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from fractions import Fraction

from align.data.schema import Problem


LEVELS = (1, 2, 3, 4, 5)
TEST_FRACTION = 0.2
_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas")
_ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards")


def split_of(problem_text: str) -> str:
    """'test' for about TEST_FRACTION of all problems, 'train' otherwise, decided by the text alone."""
    digest = hashlib.sha256(problem_text.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def _latex_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _finish(steps: list[str], answer: str) -> str:
    return "\n\n".join([*steps, f"The answer is $\\boxed{{{answer}}}$."])


def _level1(rng: random.Random):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        text = f"What is ${a} + {b}$?"
        steps = [f"We add {a} and {b}.", f"${a} + {b} = {a + b}$."]
        return text, steps, str(a + b)
    a, b = max(a, b), min(a, b)
    text = f"What is ${a} - {b}$?"
    steps = [f"We subtract {b} from {a}.", f"${a} - {b} = {a - b}$."]
    return text, steps, str(a - b)


def _level2(rng: random.Random):
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 40)
    product = a * b
    if rng.random() < 0.5:
        text = f"Compute ${a} \\times {b} + {c}$."
        steps = [f"First multiply: ${a} \\times {b} = {product}$.", f"Then add: ${product} + {c} = {product + c}$."]
        return text, steps, str(product + c)
    text = f"Compute ${a} \\times {b} - {c}$."
    steps = [f"First multiply: ${a} \\times {b} = {product}$.", f"Then subtract: ${product} - {c} = {product - c}$."]
    return text, steps, str(product - c)


def _level3(rng: random.Random):
    a, x, b = rng.randint(2, 9), rng.randint(-12, 15), rng.randint(-30, 30)
    c = a * x + b
    b_text = f"+ {b}" if b >= 0 else f"- {-b}"
    text = f"Solve for $x$: ${a}x {b_text} = {c}$."
    move = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
    steps = [f"{move}: ${a}x = {c - b}$.", f"Divide both sides by {a}: $x = {x}$."]
    return text, steps, str(x)


def _level4(rng: random.Random):
    q, s = rng.randint(2, 9), rng.randint(2, 9)
    p, r = rng.randint(1, q - 1), rng.randint(1, s - 1)
    first, second = Fraction(p, q), Fraction(r, s)
    if rng.random() < 0.5:
        common = q * s
        text = f"Compute $\\frac{{{p}}}{{{q}}} + \\frac{{{r}}}{{{s}}}$. Express your answer in lowest terms."
        total = first + second
        steps = [
            f"Write both fractions over the denominator {common}: "
            f"$\\frac{{{p * s}}}{{{common}}} + \\frac{{{r * q}}}{{{common}}}$.",
            f"Add the numerators: $\\frac{{{p * s + r * q}}}{{{common}}}$.",
            f"Reduce to lowest terms: ${_latex_fraction(total)}$.",
        ]
        return text, steps, _latex_fraction(total)
    text = f"Compute $\\frac{{{p}}}{{{q}}} \\times \\frac{{{r}}}{{{s}}}$. Express your answer in lowest terms."
    product = first * second
    steps = [
        f"Multiply numerators and denominators: $\\frac{{{p * r}}}{{{q * s}}}$.",
        f"Reduce to lowest terms: ${_latex_fraction(product)}$.",
    ]
    return text, steps, _latex_fraction(product)


def _level5(rng: random.Random):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends = rng.randint(2, 6)
    share = rng.randint(2, 9)
    kept = friends * share
    given = rng.randint(1, 20)
    start = rng.randint(1, kept + given - 1)
    bought = kept + given - start
    text = (
        f"{name} has {start} {item}. {name} buys {bought} more, gives {given} to a neighbor, and then shares the "
        f"rest equally among {friends} friends. How many {item} does each friend get?"
    )
    steps = [
        f"After buying, {name} has ${start} + {bought} = {start + bought}$ {item}.",
        f"After giving some away, {name} has ${start + bought} - {given} = {kept}$ {item}.",
        f"Each friend gets ${kept} \\div {friends} = {share}$ {item}.",
    ]
    return text, steps, str(share)


_GENERATORS: dict[int, tuple[str, Callable[[random.Random], tuple[str, list[str], str]]]] = {
    1: ("Arithmetic", _level1),
    2: ("Arithmetic", _level2),
    3: ("Algebra", _level3),
    4: ("Fractions", _level4),
    5: ("Word problems", _level5),
}


def iter_problems(split: str, levels=LEVELS, seed: int = 0) -> Iterator[Problem]:
    """Yield distinct problems of `split` ('train' or 'test'), cycling through `levels`, deterministically."""
    if split not in {"train", "test"}:
        raise ValueError(f"synthetic split must be 'train' or 'test', got {split!r}")
    levels = tuple(int(level) for level in levels)
    unknown = [level for level in levels if level not in _GENERATORS]
    if unknown or not levels:
        raise ValueError(f"synthetic levels must be a non-empty subset of {LEVELS}, got {levels}")
    rng = random.Random(f"align-synthetic-{seed}")
    seen: set[str] = set()
    index = 0
    while True:
        level = levels[index % len(levels)]
        subject, generate = _GENERATORS[level]
        for _ in range(1000):
            text, steps, answer = generate(rng)
            if text not in seen and split_of(text) == split:
                break
        else:  # the level's problem space is exhausted for this split
            raise RuntimeError(f"synthetic level {level} has no more distinct {split} problems")
        seen.add(text)
        yield Problem(
            id=f"synthetic-{split}-{index}",
            problem=text,
            solution=_finish(steps, answer),
            answer=answer,
            level=level,
            subject=subject,
        )
        index += 1


def generate_problems(num: int, split: str = "train", levels=LEVELS, seed: int = 0) -> list[Problem]:
    """The first `num` problems of `iter_problems(split, levels, seed)`."""
    iterator = iter_problems(split, levels, seed)
    return [next(iterator) for _ in range(num)]


def corrupt_solution(problem: Problem, rng: random.Random) -> tuple[str, str, int]:
    """A wrong solution with one arithmetic slip: returns (solution, wrong_answer, index_of_first_wrong_step).

    The slip is made in the last computed step and carried into the final answer, the way a careless
    solver errs, so the wrong solution differs from the right one only from that step on. Works for any problem
    whose answer is an integer or a fraction and whose solution ends in a step stating `\\boxed{answer}` (the
    synthetic task, most of GSM8K); other problems need sampled negatives (`align data pairs|outcome`).
    """
    wrong = problem.answer
    for _ in range(100):
        wrong = _shift_answer(problem, rng.choice([-10, -2, -1, 1, 2, 10]))
        if wrong != problem.answer:
            break
    *work, _ = problem.solution.split("\n\n") if problem.solution.strip() else [""]
    if not work:  # a one-step solution: only the stated answer changes
        return _finish([], wrong), wrong, 0
    # Replace the correct result where it is written last in the final working step ("= 68$." -> "= 69$.").
    last = len(work) - 1
    marker = f"= {problem.answer}$" if "\\frac" not in problem.answer else problem.answer
    head, sep, tail = work[last].rpartition(marker)
    if sep:
        work[last] = head + sep.replace(problem.answer, wrong) + tail
    else:
        work[last] = f"{work[last]} So the result is ${wrong}$."
    return _finish(work, wrong), wrong, last


def _shift_answer(problem: Problem, offset: int) -> str:
    answer = problem.answer.strip()
    if answer.lstrip("-").isdigit():
        return str(int(answer) + offset)
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if match is None:
        raise ValueError(
            f"Problem {problem.id!r}: cannot make an offline wrong solution for the answer {problem.answer!r} (only "
            "integers and \\frac{n}{d} can be shifted). Build sampled negatives with `align data pairs` or "
            "`align data outcome` and train on their output file instead."
        )
    sign, numerator, denominator = match.groups()
    value = Fraction((-1 if sign else 1) * int(numerator) + offset, int(denominator))
    return _latex_fraction(value)
