"""Reward functions for TRL's online trainers (GRPOTrainer and subclasses), backed by align's grader.

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **columns)`, where `columns`
holds every other dataset column (one value per completion) plus `trainer_state`, `log_extra` and `log_metric`,
and expects one float per completion. `VerifierReward` grades each completion's final answer against the row's
`answer` column with `align.grading.Grader` (math-verify in worker processes with hard timeouts, so a pathological
answer cannot hang or exhaust the training process) and returns 1.0 for `correct`, 0.0 otherwise: a binary
verifier reward, as pass@N needs, and the same verdicts `align eval` reports.
"""

from __future__ import annotations

from align.grading import Grader


ANSWER_COLUMN = "answer"


def completion_text(completion) -> str:
    """The text of a completion: a string (standard format) or the last message's content (conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal-style content parts: keep the text ones
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(
        f"A completion must be a string or a list of chat messages with string content, got {completion!r:.120}."
    )


class VerifierReward:
    """1.0 when the completion's final answer is equivalent to the row's gold `answer` (math-verify), else 0.0.

    Holds one `Grader` (a pool of worker processes started on first use) until `close()`; a call after `close()`
    starts a fresh pool. Logs each completion's verdict and extracted answer to TRL's completions table.

    Args:
        num_workers: grading processes (default: `align.grading.default_grader_workers()`, this process's CPUs
            divided by the processes on this machine).
        timeout_s: seconds allowed to grade one completion; a completion that takes longer scores 0.
        name: the name TRL logs the reward under (`rewards/<name>/mean`).
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0, name: str = "accuracy"):
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (or None for automatic), got {num_workers}.")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}.")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.__name__ = name  # TRL names the reward's metrics after `__name__`
        self._grader: Grader | None = None

    @property
    def grader(self) -> Grader:
        if self._grader is None:
            self._grader = Grader(num_workers=self.num_workers, timeout_s=self.timeout_s)
        return self._grader

    def __call__(self, prompts=None, completions=None, answer=None, log_extra=None, **kwargs) -> list[float]:
        if completions is None:
            raise TypeError("VerifierReward needs `completions` (TRL passes them by keyword).")
        if answer is None:
            raise ValueError(
                f"VerifierReward grades against the dataset's `{ANSWER_COLUMN}` column, which this batch lacks "
                f"(columns: {sorted(kwargs)}). Train on rows with `prompt` and `{ANSWER_COLUMN}` (dataset kind "
                "`prompts`), and keep `remove_unused_columns: false`."
            )
        if len(answer) != len(completions):
            raise ValueError(f"Got {len(completions)} completions but {len(answer)} answers; they must pair up.")
        items = []
        for index, (completion, gold) in enumerate(zip(completions, answer)):
            if gold is None or (isinstance(gold, str) and not gold.strip()):
                raise ValueError(
                    f"Batch row {index} has an empty `{ANSWER_COLUMN}` ({gold!r}); every prompt needs a gold answer. "
                    "Drop or fix that dataset row."
                )
            items.append((completion_text(completion), str(gold)))
        results = self.grader.grade_many(items)
        if log_extra is not None:
            log_extra("verdict", [result.verdict for result in results])
            log_extra("extracted_answer", [result.extracted for result in results])
        return [1.0 if result.correct else 0.0 for result in results]

    def close(self) -> None:
        """Stop the grading processes (a later call starts new ones)."""
        if self._grader is not None:
            self._grader.close()
            self._grader = None

    def __enter__(self) -> VerifierReward:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self):
        # A pool of processes cannot be pickled (e.g. by a deepcopy of the trainer); the copy starts its own.
        return {**self.__dict__, "_grader": None}
