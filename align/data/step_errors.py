"""Step-error localization data (ProcessBench's row format) from the synthetic generator, errors at known steps.

ProcessBench (Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical Reasoning",
arXiv 2412.06559) gives a model a solution split into steps and asks for the index of the earliest wrong step, or
−1 when every step is right. Its rows are

    {"id": ..., "generator": ..., "problem": ..., "steps": ["...", ...], "final_answer_correct": bool, "label": int}

and so are the rows here: `step_error_rows` writes, for each synthetic problem, either its correct step-by-step
solution (label −1) or a copy with one error injected at a chosen step, after which every later step computes
consistently from the wrong value, as a real solver's later steps do. So the final answer is wrong and only the
steps say where it went wrong. Three kinds of error:

- `slip`: the step's own arithmetic result is off by a small amount (23 + 45 = 69);
- `operand`: the step computes correctly from a wrong operand (a number of the problem miscopied);
- `copied`: the step takes a wrong value from the previous step (its result is written down wrong when reused).

Which kinds a step admits depends on what it does (a step that only restates the problem can only miscopy an
operand). Error positions are balanced: the i-th erroneous problem of a level, with `num_steps` computation steps,
gets its error at step i mod num_steps (within a level, rows alternate correct / erroneous when `error_fraction` is
0.5), so every position is equally represented in each level. The final "The answer is $\\boxed{...}$." sentence is
the last step; it is never the first error (it restates the previous step's value).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from align.data.schema import Problem
from align.data.synthetic import _latex_fraction, generate_problems


ERROR_KINDS = ("slip", "operand", "copied")
_OFFSETS = (-3, -2, -1, 1, 2, 3)


@dataclass(frozen=True)
class Chain:
    """A solution written from its inputs: `render(inputs, over)` -> steps, answer and values, where `over`
    overrides any intermediate result (what an error changes) and every later step is recomputed from it."""

    inputs: dict
    render: Callable[[dict, dict], tuple[list[str], str, dict]]  # -> steps, answer, every computed value by name
    # step index -> (name of the value it computes, error kinds it admits, name of the operand it can miscopy)
    steps: dict[int, tuple[str | None, tuple[str, ...], str | None]]


def _ints(text: str) -> list[int]:
    return [int(value) for value in re.findall(r"-?\d+", text)]


def _level1(problem: Problem) -> Chain:
    a, b = _ints(problem.problem)
    sign = "+" if "+" in problem.problem else "-"

    def render(inputs, over):
        a, b = inputs["a"], inputs["b"]
        value = over.get("result", a + b if sign == "+" else a - b)
        verb = f"We add {a} and {b}." if sign == "+" else f"We subtract {b} from {a}."
        return [verb, f"${a} {sign} {b} = {value}$."], str(value), {"result": value}

    return Chain({"a": a, "b": b}, render, {0: (None, ("operand",), "b"), 1: ("result", ("slip",), None)})


def _level2(problem: Problem) -> Chain:
    a, b, c = _ints(problem.problem)
    sign = "+" if "+" in problem.problem else "-"

    def render(inputs, over):
        a, b, c = inputs["a"], inputs["b"], inputs["c"]
        product = over.get("product", a * b)
        result = over.get("result", product + c if sign == "+" else product - c)
        verb = "add" if sign == "+" else "subtract"
        return (
            [
                f"First multiply: ${a} \\times {b} = {product}$.",
                f"Then {verb}: ${product} {sign} {c} = {result}$.",
            ],
            str(result),
            {"product": product, "result": result},
        )

    return Chain(
        {"a": a, "b": b, "c": c},
        render,
        {0: ("product", ("slip", "operand"), "b"), 1: ("result", ("slip", "operand"), "c")},
    )


def _level3(problem: Problem) -> Chain:
    match = re.search(r"\$(\d+)x ([+-]) (\d+) = (-?\d+)\$", problem.problem)
    a, sign, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    b = b if sign == "+" else -b

    def render(inputs, over):
        a, b, c = inputs["a"], inputs["b"], inputs["c"]
        rhs = over.get("rhs", c - b)
        x = over.get("x", Fraction(rhs, a))
        move = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
        shown = _latex_fraction(Fraction(x))
        return [f"{move}: ${a}x = {rhs}$.", f"Divide both sides by {a}: $x = {shown}$."], shown, {"rhs": rhs, "x": x}

    return Chain({"a": a, "b": b, "c": c}, render, {0: ("rhs", ("slip", "operand"), "c"), 1: ("x", ("slip",), None)})


def _level4(problem: Problem) -> Chain:
    p, q, r, s = _ints(problem.problem)[:4]
    adding = "+" in problem.problem

    if adding:

        def render(inputs, over):
            p, q, r, s = inputs["p"], inputs["q"], inputs["r"], inputs["s"]
            common = q * s
            first = over.get("first", p * s)
            numerator = over.get("numerator", first + r * q)
            reduced = over.get("reduced", Fraction(numerator, common))
            return (
                [
                    f"Write both fractions over the denominator {common}: "
                    f"$\\frac{{{first}}}{{{common}}} + \\frac{{{r * q}}}{{{common}}}$.",
                    f"Add the numerators: $\\frac{{{numerator}}}{{{common}}}$.",
                    f"Reduce to lowest terms: ${_latex_fraction(reduced)}$.",
                ],
                _latex_fraction(reduced),
                {"first": first, "numerator": numerator, "reduced": reduced},
            )

        steps = {0: ("first", ("slip",), None), 1: ("numerator", ("slip", "copied"), None), 2: ("reduced", (), None)}
        return Chain({"p": p, "q": q, "r": r, "s": s}, render, steps)

    def render(inputs, over):
        p, q, r, s = inputs["p"], inputs["q"], inputs["r"], inputs["s"]
        numerator = over.get("numerator", p * r)
        reduced = over.get("reduced", Fraction(numerator, q * s))
        return (
            [
                f"Multiply numerators and denominators: $\\frac{{{numerator}}}{{{q * s}}}$.",
                f"Reduce to lowest terms: ${_latex_fraction(reduced)}$.",
            ],
            _latex_fraction(reduced),
            {"numerator": numerator, "reduced": reduced},
        )

    return Chain(
        {"p": p, "q": q, "r": r, "s": s}, render, {0: ("numerator", ("slip",), None), 1: ("reduced", (), None)}
    )


def _level5(problem: Problem) -> Chain:
    start, bought, given, friends = _ints(problem.problem)[:4]
    name, item = problem.problem.split(" has ")[0], problem.problem.split()[3].rstrip(".")

    def render(inputs, over):
        start, bought, given, friends = inputs["start"], inputs["bought"], inputs["given"], inputs["friends"]
        total = over.get("total", start + bought)
        kept = over.get("kept", total - given)
        share = over.get("share", Fraction(kept, friends))
        shown = _latex_fraction(Fraction(share))
        return (
            [
                f"After buying, {name} has ${start} + {bought} = {total}$ {item}.",
                f"After giving some away, {name} has ${total} - {given} = {kept}$ {item}.",
                f"Each friend gets ${kept} \\div {friends} = {shown}$ {item}.",
            ],
            shown,
            {"total": total, "kept": kept, "share": share},
        )

    steps = {
        0: ("total", ("slip", "operand"), "bought"),
        1: ("kept", ("slip", "operand", "copied"), "given"),
        2: ("share", ("slip",), None),
    }
    return Chain({"start": start, "bought": bought, "given": given, "friends": friends}, render, steps)


_CHAINS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def _finish(steps: list[str], answer: str) -> list[str]:
    return [*steps, f"The answer is $\\boxed{{{answer}}}$."]


def correct_steps(problem: Problem) -> list[str]:
    """The problem's reference solution as a list of steps (the generator's own solution, split on blank lines)."""
    return problem.solution.split("\n\n")


def computation_steps(problem: Problem) -> int:
    """How many steps of the solution can hold the first error (every step but the final answer sentence)."""
    return len(_CHAINS[problem.level](problem).steps)


def inject_error(problem: Problem, position: int, rng: random.Random) -> tuple[list[str], str, str]:
    """(steps, wrong final answer, error kind) of `problem`'s solution with its first error at step `position`.

    Steps before `position` are the reference solution's, unchanged; step `position` is wrong (a kind it admits,
    drawn from `rng`); later steps follow from the wrong value. Raises ValueError for a position the chain has not.
    """
    if problem.level not in _CHAINS:
        raise ValueError(f"problem {problem.id!r}: level {problem.level} has no step-error chain (levels 1-5)")
    chain = _CHAINS[problem.level](problem)
    if position not in chain.steps:
        raise ValueError(
            f"problem {problem.id!r}: error position {position} out of range; it has {len(chain.steps)} "
            "computation steps (positions from 0)"
        )
    value_name, kinds, operand = chain.steps[position]
    correct, answer, _ = chain.render(chain.inputs, {})
    if not kinds and position > 0:  # a step that only restates: its error is a wrong value copied from the last one
        kinds = ("copied",)
    for _ in range(100):
        kind = rng.choice(kinds)
        offset = rng.choice(_OFFSETS)
        inputs, over = dict(chain.inputs), {}
        if kind == "operand":
            inputs[operand] = inputs[operand] + offset
        elif kind == "slip":
            over[value_name] = _correct_value(chain, position) + offset
        else:  # copied: the previous step's value is reused wrongly, so this step is the first wrong one
            over[chain.steps[position - 1][0]] = _correct_value(chain, position - 1) + offset
        steps, wrong, _ = chain.render(inputs, over)
        if kind == "copied":  # the earlier step still shows its correct value; only the reuse is wrong
            steps[position - 1] = correct[position - 1]
        if wrong != answer and steps[:position] == correct[:position] and steps[position] != correct[position]:
            return _finish(steps, wrong), wrong, kind
    raise ValueError(f"problem {problem.id!r}: could not inject an error at step {position}")


def _correct_value(chain: Chain, position: int):
    """The correct value step `position` computes."""
    return chain.render(chain.inputs, {})[2][chain.steps[position][0]]


def step_error_rows(
    num: int,
    *,
    split: str = "test",
    levels=(1, 2, 3, 5),
    seed: int = 0,
    error_fraction: float = 0.5,
) -> list[dict]:
    """`num` ProcessBench-format rows from synthetic problems of `split` (seeded, reproducible).

    The i-th row of a level is erroneous when floor((i + 1)·error_fraction) > floor(i·error_fraction) (so that share
    of every level, spread evenly); the j-th erroneous row of a level puts its error at step j mod (its computation
    steps). Every row keeps
    the problem's gold `answer` and `level`, and the erroneous ones their `error_kind`.
    """
    if not 0.0 <= error_fraction <= 1.0:
        raise ValueError(f"error_fraction must be in [0, 1], got {error_fraction}")
    rng = random.Random(f"align-step-errors-{seed}")
    rows, seen_per_level, erroneous_per_level = [], {}, {}
    for problem in generate_problems(num, split, levels, seed):
        index = seen_per_level.get(problem.level, 0)  # within its level, so every level gets its share of errors
        seen_per_level[problem.level] = index + 1
        erroneous = int((index + 1) * error_fraction) > int(index * error_fraction)
        row = {
            "id": f"{problem.id}-steps",
            "generator": "align-synthetic",
            "problem": problem.problem,
            "answer": problem.answer,
            "level": problem.level,
        }
        if erroneous:
            count = erroneous_per_level.get(problem.level, 0)
            erroneous_per_level[problem.level] = count + 1
            position = count % computation_steps(problem)
            steps, wrong, kind = inject_error(problem, position, rng)
            row.update(steps=steps, final_answer_correct=False, label=position, error_kind=kind, final_answer=wrong)
        else:
            row.update(steps=correct_steps(problem), final_answer_correct=True, label=-1, final_answer=problem.answer)
        rows.append(row)
    return rows
