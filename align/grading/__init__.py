"""Grade model answers against gold answers with math-verify, in worker processes with hard per-item timeouts.

Model output is untrusted text. Grading it can take unbounded time or memory (`\\boxed{9^{9^{9^{9}}}}` asks sympy for
a number with more digits than atoms in the universe), and math-verify's own timeouts use `signal.alarm`, which only
works in a process's main thread and cannot interrupt a long computation inside C code. So every item is graded in a
pool of worker processes that this package owns:

- `verify`: what is graded (the completion's final answer against the gold, math-verify), in-process;
- `worker`: one grading process, with a soft timeout (an alarm) per item and a capped address space;
- `pool`: `Grader`, the parent side: hard deadlines, replacing dead or hung workers, results in input order;
- `options`: `GradingArguments`, the options shared by `align eval` / `align data` and the online trainers.

Verdicts: `correct`, `incorrect`, `no_answer` (nothing extractable), `timeout` (grading did not finish in time, or
the item crashed its worker twice); only `correct` counts as solved.
"""

from align.grading.options import GradingArguments, default_grader_workers
from align.grading.pool import Grader, GraderError
from align.grading.verify import VERDICTS, GradeResult, answers_equivalent, grade_answer


__all__ = [
    "VERDICTS",
    "GradeResult",
    "Grader",
    "GraderError",
    "GradingArguments",
    "answers_equivalent",
    "default_grader_workers",
    "grade_answer",
]
