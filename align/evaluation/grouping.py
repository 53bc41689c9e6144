"""Grading a run's records and grouping each problem's equivalent answers (the groups maj@k votes over).

A record is one problem with its samples (`align.evaluation.records`); `grade_records` fills in every sample's
`verdict` / `extracted`, the record's `num_correct`, and the samples' answer `group`s.
"""

from __future__ import annotations


def grade_records(records: list[dict], grader, progress: bool = False) -> None:
    """Fill in each sample's `verdict` / `extracted`, the record's `num_correct`, and the answer `group`s."""
    items = [(sample["completion"], record["answer"]) for record in records for sample in record["samples"]]
    results = iter(grader.grade_many(items, progress=progress))
    for record in records:
        for sample in record["samples"]:
            result = next(results)
            sample["verdict"], sample["extracted"] = result.verdict, result.extracted
        record["num_correct"] = sum(sample["verdict"] == "correct" for sample in record["samples"])
    assign_answer_groups(records, grader)


def assign_answer_groups(records: list[dict], grader) -> None:
    """Number each problem's distinct answers, equivalent answers sharing a number (for maj@k).

    Correct samples all equal the gold, so they form one group. Incorrect answers are compared pairwise with
    `grader.equivalent` (math-verify; identical strings need no check) and grouped into connected components, so
    the grouping does not depend on sample order. Samples without an answer, or whose grading timed out, get None.
    """
    plans, pairs = [], []
    for record in records:
        wrong = list(
            dict.fromkeys(
                sample["extracted"].strip()
                for sample in record["samples"]
                if sample["verdict"] == "incorrect" and sample.get("extracted") is not None
            )
        )
        plans.append((wrong, len(pairs)))
        pairs.extend((wrong[i], wrong[j]) for i in range(len(wrong)) for j in range(i + 1, len(wrong)))
    equivalent = grader.equivalent_many(pairs) if pairs else []
    for record, (wrong, start) in zip(records, plans):
        component = _components(len(wrong), equivalent[start:])
        index_of = {answer: i for i, answer in enumerate(wrong)}
        numbers: dict = {}
        for sample in record["samples"]:
            if sample["verdict"] == "correct":
                key = "correct"
            elif sample["verdict"] == "incorrect" and sample.get("extracted") is not None:
                key = component[index_of[sample["extracted"].strip()]]
            else:
                sample["group"] = None
                continue
            sample["group"] = numbers.setdefault(key, len(numbers))


def _components(size: int, equivalent) -> list[int]:
    """Connected components (as a representative index per item) of items 0..size-1, given the equivalence of
    every pair (i, j), i < j, in row-major order (only the first size*(size-1)/2 entries are read)."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = ((i, j) for i in range(size) for j in range(i + 1, size))
    for (i, j), same in zip(pairs, equivalent):
        if same:
            parent[root(j)] = root(i)
    return [root(i) for i in range(size)]
