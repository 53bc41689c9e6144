"""Training rows built from a model's own graded samples (the harness's samples.jsonl records).

These are what `align data coverage|pairs|outcome` write, in the columns `align.data.training.is_trainer_format`
recognizes, so `align train <method>` with `dataset_name: OUT/<file>.jsonl` trains on them as they are:

| builder    | one row per                            | columns                               | trains                |
| ---------- | -------------------------------------- | ------------------------------------- | --------------------- |
| `coverage` | correct sampled trace                  | id, prompt, completion, p_hat, answer | DCO                   |
| `pairs`    | (correct, incorrect) traces, a problem | id, prompt, chosen, rejected          | margin, PRM (dpo/nca) |
| `outcome`  | graded trace                           | id, prompt, completion, label         | PRM (ce)              |

`p_hat` = c/k, the fraction of the k samples of that problem that are correct: DCO's estimate of the model's
probability of solving it. Samples whose grading timed out are left out of pairs and outcome labels (their label is
unknown). With the `chat` prompt style, prompts and completions are conversational (lists of messages); with
`plain`, strings: a sampled completion exactly as it was generated after the prompt, a reference solution joined to
the prompt by one space (`completion_column` in align.data.training says why).
"""

from __future__ import annotations

from collections import Counter

from align.data.prompts import DEFAULT_INSTRUCTION
from align.data.training import completion_column, prompt_column, reference_completion


def _split(record: dict) -> tuple[list[str], list[str], int]:
    """(correct traces, incorrect traces, number of samples with unknown label) of one record."""
    correct = [s["completion"] for s in record["samples"] if s["verdict"] == "correct"]
    wrong = [s["completion"] for s in record["samples"] if s["verdict"] in ("incorrect", "no_answer")]
    return correct, wrong, len(record["samples"]) - len(correct) - len(wrong)


def coverage_rows(
    records: list[dict],
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    style: str = "chat",
    references: dict[str, str] | None = None,
) -> tuple[list[dict], dict]:
    """One row per correct trace with p_hat = c/k; `references` (id -> reference solution) adds a p_hat = 0 row
    with the reference solution for problems the model never solved (else they are only counted)."""
    rows, counts = [], Counter()
    for record in records:
        correct, _, _ = _split(record)
        k = len(record["samples"])
        counts["problems"] += 1
        if not correct:
            counts["no_correct_sample"] += 1
            reference = (references or {}).get(record["id"], "")
            if references is not None and not reference.strip():
                counts["no_reference_solution"] += 1
                continue
            if references is None:
                continue
            completions, p_hat = [reference_completion(reference, style)], 0.0
            counts["reference_rows"] += 1
        else:
            completions, p_hat = [completion_column(trace, style) for trace in correct], len(correct) / k
        for completion in completions:
            rows.append(
                {
                    "id": record["id"],
                    "prompt": prompt_column(record["problem"], instruction, style),
                    "completion": completion,
                    "p_hat": p_hat,
                    "answer": record["answer"],
                }
            )
    counts["rows"] = len(rows)
    return rows, dict(counts)


def pair_rows(
    records: list[dict], *, instruction: str | None = DEFAULT_INSTRUCTION, style: str = "chat"
) -> tuple[list[dict], dict]:
    """Each correct trace paired with an incorrect trace of the same problem, zipped to min(c, wrong) pairs.

    Only usable traces are paired (the skip counts are over them): an empty or whitespace-only trace (a pair with it
    has nothing to prefer; counted as `empty_completions_not_paired`) is left out, and so is an incorrect trace whose
    text is also among the correct ones (a pair of identical sides trains to a zero gradient; counted as
    `identical_completions_not_paired`), so every row passes `align.data.training.preference_pair_error`.
    """
    rows, counts = [], Counter()
    for record in records:
        correct, wrong, unknown = _split(record)
        counts["problems"] += 1
        counts["samples_with_unknown_label"] += unknown
        usable_correct = [trace for trace in correct if trace.strip()]
        usable_wrong = [trace for trace in wrong if trace.strip()]
        correct_texts = set(usable_correct)
        distinct_wrong = [trace for trace in usable_wrong if trace not in correct_texts]
        left_out = {
            "empty_completions_not_paired": len(correct) + len(wrong) - len(usable_correct) - len(usable_wrong),
            "identical_completions_not_paired": len(usable_wrong) - len(distinct_wrong),
        }
        counts.update({name: n for name, n in left_out.items() if n})  # the printed counts name what happened
        correct, wrong = usable_correct, distinct_wrong
        if not wrong:
            counts["skipped_all_correct" if correct else "skipped_no_labelled_sample"] += 1
            continue
        if not correct:
            counts["skipped_all_wrong"] += 1
            continue
        for chosen, rejected in zip(correct, wrong):
            rows.append(
                {
                    "id": record["id"],
                    "prompt": prompt_column(record["problem"], instruction, style),
                    "chosen": completion_column(chosen, style),
                    "rejected": completion_column(rejected, style),
                }
            )
    counts["rows"] = len(rows)
    return rows, dict(counts)


def outcome_label_rows(
    records: list[dict], *, instruction: str | None = DEFAULT_INSTRUCTION, style: str = "chat"
) -> tuple[list[dict], dict]:
    """One row per graded trace with its outcome label (True = correct)."""
    rows, counts = [], Counter()
    for record in records:
        counts["problems"] += 1
        for sample in record["samples"]:
            if sample["verdict"] not in ("correct", "incorrect", "no_answer"):
                counts["samples_with_unknown_label"] += 1
                continue
            label = sample["verdict"] == "correct"
            counts["positive" if label else "negative"] += 1
            rows.append(
                {
                    "id": record["id"],
                    "prompt": prompt_column(record["problem"], instruction, style),
                    "completion": completion_column(sample["completion"], style),
                    "label": label,
                }
            )
    counts["rows"] = len(rows)
    return rows, dict(counts)
