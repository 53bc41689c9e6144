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
`build_datasets` makes the train/eval datasets of `align train` from its `DataArguments`: a file (or Hub dataset)
whose rows are already in the trainer's format is used as it is, any other source is loaded as problems.
Preference pairs from either are checked (`preference_pair_error`): a pair whose sides are identical or one side
empty prefers nothing (identical sides train to a zero gradient, loss log 2 throughout), so it raises
`InvalidRowError`, or with `skip_invalid` is skipped and counted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from align.data.loaders import is_problem_source, load_problems_as_configured, read_source
from align.data.prompts import DEFAULT_INSTRUCTION, plain_prompt, prompt_messages
from align.data.schema import InvalidRowError, Problem
from align.data.synthetic import corrupt_solution


logger = logging.getLogger("align.data")


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


# `plain_prompt` ends in "Solution:". A reference solution is written on its own, so it continues the prompt after one
# space, as a model's generation does; a sampled completion is used as generated (see `completion_column`).
PLAIN_REFERENCE_SEPARATOR = " "


def prompt_column(problem: str, instruction: str | None, style: str):
    """The `prompt` of a training row: one user turn (`chat`) or the plain template's text (`plain`)."""
    return prompt_messages(problem, instruction) if style == "chat" else plain_prompt(problem, instruction)


def completion_column(continuation: str, style: str):
    """The `completion` (or `chosen`/`rejected`) of a training row for `continuation`, the text after the prompt.

    A chat completion is an assistant turn, which the chat template places. A plain completion is `continuation`
    exactly: TRL joins plain prompts and completions as the string `prompt + completion` before tokenizing
    (SFTTrainer and DPOTrainer alike), so any separator must be part of the completion. A sample generated after
    the prompt already starts with whatever whitespace the model produced; adding one would train on a double space.
    """
    return [{"role": "assistant", "content": continuation}] if style == "chat" else continuation


def reference_completion(text: str, style: str):
    """The completion for a reference (or corrupted reference) solution: joined to a plain prompt by one space."""
    return completion_column(text if style == "chat" else PLAIN_REFERENCE_SEPARATOR + text, style)


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
            "prompt": prompt_column(p.problem, instruction, style),
            "completion": reference_completion(completion_text(p, target), style),
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
                    "prompt": prompt_column(p.problem, instruction, style),
                    "chosen": reference_completion(p.solution, style),
                    "rejected": reference_completion(wrong, style),
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
                "prompt": prompt_column(p.problem, instruction, style),
                "completion": reference_completion(p.solution, style),
                "label": True,
            }
        )
        for _ in range(negatives):
            wrong, _, _ = corrupt_solution(p, rng)
            rows.append(
                {
                    "id": p.id,
                    "prompt": prompt_column(p.problem, instruction, style),
                    "completion": reference_completion(wrong, style),
                    "label": False,
                }
            )
    return rows


def prompt_rows(problems: Iterable[Problem], instruction=DEFAULT_INSTRUCTION, style="chat"):
    return [{"id": p.id, "prompt": prompt_column(p.problem, instruction, style), "answer": p.answer} for p in problems]


def is_trainer_format(columns: Iterable[str], kind: str) -> bool:
    return any(required <= set(columns) for required in _TRAINER_FORMAT_COLUMNS[kind])


def is_blank(value) -> bool:
    """No text to train on: None, a whitespace-only string, or messages (or content parts) that are all blank."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return is_blank(value.get("content", value.get("text")))
    if isinstance(value, list):
        return all(is_blank(item) for item in value)
    return False


def preference_pair_error(row: dict) -> tuple[str, object, str] | None:
    """(field, value, reason) of what makes a preference row unusable, or None for a usable pair.

    Unusable: a side that is not a string or a list of messages, an empty side, chosen == rejected, and, where the
    prompt is implicit (no `prompt` column: TRL takes the longest shared prefix as the prompt), a side that is a
    prefix of the other, whose completion after that prompt is empty.
    """
    if not isinstance(row, dict):
        return "<row>", row, f"expected a JSON object, got {type(row).__name__}"
    for field in ("chosen", "rejected"):
        value = row.get(field)  # a file's missing value reads as None
        if value is not None and not isinstance(value, (str, list)):
            return field, value, f"expected a string or a list of messages, got {type(value).__name__}"
        if is_blank(value):
            return field, value, "is empty, so the pair has nothing to prefer"
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected:
        return "rejected", rejected, "is identical to 'chosen', so the pair prefers nothing (a zero gradient)"
    if "prompt" not in row:
        for field, side, other in (("chosen", chosen, rejected), ("rejected", rejected, chosen)):
            if type(side) is type(other) and other[: len(side)] == side:
                return field, side, "is a prefix of the other side, so its completion after the shared prompt is empty"
    return None


_PAIR_HINT = "Fix or drop the row, or pass --skip_invalid to skip and count such pairs."
_BUILT_PAIR_HINT = (
    "Pairs built from problems take the problem's solution as 'chosen': give the problems worked solutions, build "
    "pairs from sampled solutions with `align data pairs`, or pass --skip_invalid to skip and count such pairs."
)


def checked_preference_rows(
    rows: list[dict], source: str, skip_invalid: bool = False, limit: int | None = None, hint: str = _PAIR_HINT
) -> list[dict]:
    """The first `limit` (all if None) usable pairs of `rows`; an unusable one (`preference_pair_error`) raises
    `InvalidRowError` naming its row index, or with `skip_invalid` is skipped, counted and logged once."""
    kept, skipped = [], []
    for index, row in enumerate(rows):
        if limit is not None and len(kept) >= limit:
            break
        problem = preference_pair_error(row)
        if problem is None:
            kept.append(row)
            continue
        field, value, reason = problem
        if isinstance(row, dict) and row.get("id") not in (None, ""):
            reason += f" (pair id {row['id']!r})"
        error = InvalidRowError(source, index, field, value, reason, hint)
        if not skip_invalid:
            raise error
        skipped.append(str(error))
    if skipped:
        logger.warning("skipped %d invalid preference pairs of %s (first: %s)", len(skipped), source, skipped[0])
    return kept


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


def _split_rows(kind: str, data_args, split: str, limit: int | None, seed: int) -> list[dict]:
    """Rows of one split: a file's or Hub dataset's rows as they are when already in `kind`'s format, otherwise
    `kind` rows built from its problems."""
    name, skip_invalid = data_args.dataset_name, data_args.skip_invalid
    if not is_problem_source(name):
        read = read_source(name, split, data_args.dataset_config)
        if read.rows and is_trainer_format(read.rows[0].keys(), kind):
            if kind == "preference":
                return checked_preference_rows(read.rows, read.source, skip_invalid, limit)
            return read.rows[:limit] if limit is not None else read.rows
    if name == "synthetic" and limit is None:
        limit = (
            data_args.synthetic_num_train if split == data_args.dataset_train_split else data_args.synthetic_num_eval
        )
    loaded = load_problems_as_configured(data_args, name=name, split=split, limit=limit)
    rows = rows_for_kind(kind, loaded.problems, data_args, seed=seed)
    if kind == "preference":
        source = f"preference pairs built from {loaded.source}"
        return checked_preference_rows(rows, source, skip_invalid, hint=_BUILT_PAIR_HINT)
    return rows


def build_datasets(kind: str, data_args, seed: int):
    """Train (and, with a `dataset_test_split`, eval) `datasets.Dataset` in the trainer's format for `kind`, from
    the options of a `DataArguments`."""
    from datasets import Dataset

    train_rows = _split_rows(kind, data_args, data_args.dataset_train_split, data_args.max_train_samples, seed)
    if not train_rows:
        raise ValueError(f"The training set {data_args.dataset_name!r} is empty after loading; nothing to train on.")
    eval_dataset = None
    if data_args.dataset_test_split:
        eval_rows = _split_rows(kind, data_args, data_args.dataset_test_split, data_args.max_eval_samples, seed)
        eval_dataset = Dataset.from_list(eval_rows)
    return Dataset.from_list(train_rows), eval_dataset
