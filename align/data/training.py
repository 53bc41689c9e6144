"""Turn problems into the dataset formats TRL trainers take.

| kind         | columns                                   | used by                          |
| ------------ | ----------------------------------------- | -------------------------------- |
| `sft`        | prompt, completion (+ p_hat if present)   | SFT, DCO                         |
| `preference` | prompt, chosen, rejected                  | margin losses, implicit PRM pairs |
| `outcome`    | prompt, completion, label                 | implicit PRM (ce objective)      |
| `prompts`    | prompt, answer                            | online pass@N (GRPO machinery)   |

Rows built from problems use the conversational format (`[{"role": ..., "content": ...}]`) with the `chat`
prompt style and plain strings with the `plain` style. Offline preference and outcome rows pair the reference
solution with wrong solutions made by `synthetic.corrupt_solution` (one arithmetic slip, propagated); data
sampled from a model and graded comes from `align data pairs|outcome` instead and is used as is.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from align.data.prompts import DEFAULT_INSTRUCTION, plain_prompt, prompt_messages
from align.data.schema import Problem
from align.data.synthetic import corrupt_solution


DATASET_KINDS = ("sft", "preference", "outcome", "prompts")
# Columns that mark a file as already being in a trainer's format (e.g. written by `align data ...`).
# Any one of these column sets marks rows as already in the trainer's format (TRL accepts language-modeling `text` /
# conversational `messages` for SFT, and preference pairs with the prompt left implicit in chosen/rejected).
_TRAINER_FORMAT_COLUMNS = {
    "sft": [{"prompt", "completion"}, {"messages"}, {"text"}],
    "preference": [{"prompt", "chosen", "rejected"}, {"chosen", "rejected"}],
    "outcome": [{"prompt", "completion", "label"}],
    "prompts": [{"prompt", "answer"}],
}


def _prompt(problem: Problem, instruction: str | None, style: str):
    return (
        prompt_messages(problem.problem, instruction)
        if style == "chat"
        else plain_prompt(problem.problem, instruction)
    )


def _completion(text: str, style: str):
    return [{"role": "assistant", "content": text}] if style == "chat" else " " + text


def completion_text(problem: Problem, target: str) -> str:
    if target == "solution":
        return problem.solution
    if target == "answer":
        return f"$\\boxed{{{problem.answer}}}$"
    raise ValueError(f"completion_target must be 'solution' or 'answer', got {target!r}")


def sft_rows(problems: Iterable[Problem], target="solution", instruction=DEFAULT_INSTRUCTION, style="chat"):
    return [
        {
            "id": p.id,
            "prompt": _prompt(p, instruction, style),
            "completion": _completion(completion_text(p, target), style),
            "answer": p.answer,
        }
        for p in problems
    ]


def preference_rows(problems: Iterable[Problem], negatives=1, seed=0, instruction=DEFAULT_INSTRUCTION, style="chat"):
    rng = random.Random(seed)
    rows = []
    for p in problems:
        for _ in range(negatives):
            wrong, _, _ = corrupt_solution(p, rng)
            rows.append(
                {
                    "id": p.id,
                    "prompt": _prompt(p, instruction, style),
                    "chosen": _completion(p.solution, style),
                    "rejected": _completion(wrong, style),
                }
            )
    return rows


def outcome_rows(problems: Iterable[Problem], negatives=1, seed=0, instruction=DEFAULT_INSTRUCTION, style="chat"):
    """One correct (label True) and `negatives` wrong (label False) completions per problem."""
    rng = random.Random(seed)
    rows = []
    for p in problems:
        rows.append(
            {
                "id": p.id,
                "prompt": _prompt(p, instruction, style),
                "completion": _completion(p.solution, style),
                "label": True,
            }
        )
        for _ in range(negatives):
            wrong, _, _ = corrupt_solution(p, rng)
            rows.append(
                {
                    "id": p.id,
                    "prompt": _prompt(p, instruction, style),
                    "completion": _completion(wrong, style),
                    "label": False,
                }
            )
    return rows


def prompt_rows(problems: Iterable[Problem], instruction=DEFAULT_INSTRUCTION, style="chat"):
    return [{"id": p.id, "prompt": _prompt(p, instruction, style), "answer": p.answer} for p in problems]


def is_trainer_format(columns: Iterable[str], kind: str) -> bool:
    return any(required <= set(columns) for required in _TRAINER_FORMAT_COLUMNS[kind])


def rows_for_kind(kind: str, problems: list[Problem], data_args, seed: int = 0) -> list[dict]:
    """Build `kind` rows from problems with the options of a `DataArguments`."""
    style, instruction = data_args.prompt_style, data_args.prompt_instruction
    if kind == "sft":
        return sft_rows(problems, data_args.completion_target, instruction, style)
    if kind == "preference":
        return preference_rows(problems, data_args.negatives_per_problem, seed, instruction, style)
    if kind == "outcome":
        return outcome_rows(problems, data_args.negatives_per_problem, seed, instruction, style)
    if kind == "prompts":
        return prompt_rows(problems, instruction, style)
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS}")
