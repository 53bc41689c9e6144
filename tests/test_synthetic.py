"""The offline synthetic task: deterministic, disjoint splits, correct reference solutions, plausible wrong ones."""

import random
from fractions import Fraction

import pytest

from align.data.synthetic import LEVELS, corrupt_solution, generate_problems, split_of


def test_deterministic_per_seed_and_different_across_seeds():
    first = generate_problems(30, "train", LEVELS, seed=0)
    assert first == generate_problems(30, "train", LEVELS, seed=0)
    assert [p.problem for p in first] != [p.problem for p in generate_problems(30, "train", LEVELS, seed=1)]


def test_train_and_test_are_disjoint_whatever_the_seed():
    train = {p.problem for seed in (0, 1) for p in generate_problems(400, "train", LEVELS, seed=seed)}
    test = {p.problem for seed in (0, 2) for p in generate_problems(150, "test", LEVELS, seed=seed)}
    assert not train & test
    assert all(split_of(text) == "test" for text in test)


def test_levels_cycle_and_are_validated():
    problems = generate_problems(10, "test", [2, 4])
    assert [p.level for p in problems] == [2, 4] * 5
    assert len({p.id for p in problems}) == 10
    with pytest.raises(ValueError, match="levels"):
        generate_problems(1, "train", [6])
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, "validation")


def _value(answer: str) -> Fraction:
    if answer.startswith(("\\frac", "-\\frac")):
        sign = -1 if answer.startswith("-") else 1
        numerator, denominator = answer.lstrip("-")[len("\\frac{") : -1].split("}{")
        return sign * Fraction(int(numerator), int(denominator))
    return Fraction(int(answer))


def test_reference_answers_are_right():
    """Recompute each level's answer from the problem text."""
    import re

    for problem in generate_problems(100, "train", LEVELS, seed=3):
        numbers = [int(x) for x in re.findall(r"-?\d+", problem.problem)]
        answer = _value(problem.answer)
        if problem.level == 1:
            a, b = numbers
            assert answer == (a + b if "+" in problem.problem else a - b)
        elif problem.level == 2:
            a, b, c = numbers
            assert answer == (a * b + c if "+" in problem.problem else a * b - c)
        elif problem.level == 3:
            a, b, c = numbers[0], numbers[1], numbers[2]
            b = b if "+" in problem.problem else -abs(b)
            assert a * answer + b == c
        elif problem.level == 4:
            p, q, r, s = numbers
            expected = Fraction(p, q) + Fraction(r, s) if "+" in problem.problem else Fraction(p, q) * Fraction(r, s)
            assert answer == expected
        else:
            start, bought, given, friends = numbers
            assert answer * friends == start + bought - given
        assert problem.solution.endswith(f"$\\boxed{{{problem.answer}}}$.")
        assert "\n\n" in problem.solution


def test_wrong_solutions_differ_from_their_first_wrong_step_on():
    rng = random.Random(0)
    for problem in generate_problems(60, "train", LEVELS, seed=5):
        wrong, wrong_answer, first_wrong = corrupt_solution(problem, rng)
        assert _value(wrong_answer) != _value(problem.answer)
        assert wrong.endswith(f"$\\boxed{{{wrong_answer}}}$.")
        right_steps, wrong_steps = problem.solution.split("\n\n"), wrong.split("\n\n")
        assert right_steps[:first_wrong] == wrong_steps[:first_wrong]
        assert right_steps[first_wrong] != wrong_steps[first_wrong]


def test_graded_by_the_harness_grader():
    from align.grading import Grader

    problems = generate_problems(10, "test", LEVELS, seed=0)
    rng = random.Random(1)
    with Grader(num_workers=1) as grader:
        for problem in problems:
            assert grader.grade(problem.solution, problem.answer).correct
            wrong, _, _ = corrupt_solution(problem, rng)
            assert not grader.grade(wrong, problem.answer).correct
