"""Grade model answers against gold answers with math-verify, in worker processes with hard per-item timeouts.

Model output is untrusted text. Grading it can take unbounded time or memory (`\\boxed{9^{9^{9^{9}}}}` asks sympy for
a number with more digits than atoms in the universe), and math-verify's own timeouts use `signal.alarm`, which only
works in a process's main thread and cannot interrupt a long computation inside C code. So every item is graded in a
pool of worker processes that this module owns:

- each worker grades one item at a time in its main thread under a `setitimer` alarm of `timeout_s` (the soft
  timeout: an exception that unwinds sympy and leaves the worker usable);
- the parent gives every item a hard deadline of `timeout_s + 0.5 s` from the moment its worker reaches it; a
  worker that has not answered by then is killed and replaced, the item gets the verdict `timeout`, and the items
  queued behind it go to other workers. A worker that dies (crash, out-of-memory kill) is replaced too, and its
  item is retried once on a fresh worker;
- each worker's address space is capped (`memory_limit_mb`), so a runaway answer fails inside its worker instead of
  exhausting the machine.

What is graded:

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

Verdicts: `correct`, `incorrect`, `no_answer` (nothing extractable), `timeout` (grading did not finish in time, or
the item crashed its worker twice); only `correct` counts as solved.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


logger = logging.getLogger(__name__)

VERDICTS = ("correct", "incorrect", "no_answer", "timeout")
HARD_TIMEOUT_GRACE_S = 0.5
DEFAULT_MEMORY_LIMIT_MB = 4096
_STARTUP_FAILURES_BEFORE_GIVING_UP = 3
_MAX_BATCH = 8


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one completion, and the answer extracted from it (None when nothing was extracted)."""

    verdict: str  # one of VERDICTS
    extracted: str | None

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


# ---------------------------------------------------------------------------------------------------------------------
# What runs inside a worker process (also callable in-process by trusted code, e.g. benchmarks; it has no timeout).


class _SoftTimeout(BaseException):
    """Raised by the worker's alarm. A BaseException, so math-verify's and sympy's `except Exception` let it pass."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


@lru_cache(maxsize=1)
def _extraction_config():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    normalization = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all")
    return [LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0)]


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    """An answer (gold or extracted) parsed as `\\boxed{answer}`; cached because n samples share a gold."""
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", _extraction_config(), parsing_timeout=None))


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


_OPERATIONS = {"grade": grade_answer, "equivalent": answers_equivalent}
_TIMED_OUT = {"grade": ("timeout", None), "equivalent": False}


def _limit_memory(limit_mb: int | None) -> None:
    if not limit_mb:
        return
    import resource

    limit = limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn_in, conn_out, soft_timeout_s: float, memory_limit_mb: int | None) -> None:
    """Serve batches of (task_id, operation, a, b) items until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it shuts the pool down
    logging.disable(logging.CRITICAL)  # math-verify logs a warning for every unparsable answer
    try:
        _limit_memory(memory_limit_mb)
        _extraction_config()
        grade_answer("$\\boxed{1}$", "1")  # import everything grading touches before the first timed item
        signal.signal(signal.SIGALRM, _raise_soft_timeout)
    except BaseException:
        conn_out.send(("failed", traceback.format_exc()))
        return
    conn_out.send(("ready", os.getpid()))
    while True:
        try:
            message = conn_in.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        for task_id, operation, a, b in message:  # a batch; each item gets its own alarm and its own reply
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
                try:
                    result = ("ok", _OPERATIONS[operation](a, b))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                result = ("timeout", _TIMED_OUT[operation])
            except Exception as error:  # a bug or resource exhaustion inside the grader: report, keep serving
                result = ("error", f"{type(error).__name__}: {error}")
            conn_out.send((task_id, result))


def _worker_entry() -> None:
    """Entry point of `python -c` worker processes: argv = read fd, write fd, soft timeout, memory limit (MiB)."""
    from multiprocessing.connection import Connection

    read_fd, write_fd, soft_timeout_s, memory_limit_mb = sys.argv[1:5]
    conn_in = Connection(int(read_fd), writable=False)
    conn_out = Connection(int(write_fd), readable=False)
    _worker_main(conn_in, conn_out, float(soft_timeout_s), int(memory_limit_mb) or None)


# ---------------------------------------------------------------------------------------------------------------------
# The pool, in the parent process.


class _Worker:
    """One grading process: a fresh `python -c` interpreter (not a fork of this process, which may hold torch and
    CUDA state, and not multiprocessing's spawn, which re-imports the caller's main script), talking over two pipes.
    """

    def __init__(self, soft_timeout_s: float, memory_limit_mb: int | None):
        from multiprocessing.connection import Connection

        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", "from align.grading import _worker_entry; _worker_entry()"]
        args = [str(child_read), str(child_write), repr(soft_timeout_s), str(memory_limit_mb or 0)]
        try:
            # A session of its own: a Ctrl-C in the terminal goes to the parent, which then stops the pool.
            self.process = subprocess.Popen(
                command + args,
                pass_fds=(child_read, child_write),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self.sender = Connection(parent_write, readable=False)
        self.conn = Connection(parent_read, writable=False)
        self.ready = False
        self.tasks: deque = deque()  # (task_id, task key) sent and not answered yet; the first is being graded
        self.deadline = 0.0  # hard deadline of the first one

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        """The exit status once the process is gone (waits briefly: EOF on its pipe can precede its exit)."""
        try:
            return self.process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                try:
                    self.sender.send(None)
                except (OSError, ValueError):
                    self.process.kill()
            try:
                self.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sender.close()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class GraderError(RuntimeError):
    """The grading pool cannot work (its workers fail to start)."""


class Grader:
    """A pool of grading processes with hard per-item timeouts; use as a context manager (or call `close()`).

    Workers start on first use (about a second each, in parallel). `num_workers` defaults to the CPUs this process
    may use; `timeout_s` is the per-item budget, enforced to within `timeout_s + 0.5 s` whatever the item does.
    Identical items within one call are graded once.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers or len(os.sched_getaffinity(0))
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[_Worker] = []
        self._task_ids = itertools.count()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.replaced_workers = 0

    # -- public API ---------------------------------------------------------------------------------------------------

    def grade(self, completion: str, gold: str) -> GradeResult:
        return self.grade_many([(completion, gold)])[0]

    def grade_many(self, items: list[tuple[str, str]], progress: bool = False) -> list[GradeResult]:
        """Grade (completion, gold) pairs; results are in input order."""
        tasks = [("grade", _as_text(completion, "completion"), _as_text(gold, "gold")) for completion, gold in items]
        return [GradeResult(*result) for result in self._run(tasks, progress, "grade")]

    def equivalent(self, a: str, b: str) -> bool:
        """Whether two extracted answers are equivalent (for majority-vote grouping), under the same timeouts."""
        return self.equivalent_many([(a, b)])[0]

    def equivalent_many(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[bool]:
        tasks = [("equivalent", _as_text(a, "answer"), _as_text(b, "answer")) for a, b in pairs]
        return [bool(result) for result in self._run(tasks, progress, "group answers")]

    @property
    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the dispatch loop --------------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        worker = _Worker(self.timeout_s, self.memory_limit_mb)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker, kill: bool) -> None:
        self._workers.remove(worker)
        worker.stop(kill=kill)

    def _run(self, tasks: list[tuple[str, str, str]], progress: bool, description: str) -> list:
        if self._closed:
            raise GraderError("this Grader is closed")
        if not tasks:
            return []
        positions: dict[tuple, list[int]] = {}
        for index, task in enumerate(tasks):
            positions.setdefault(task, []).append(index)
        queue = deque(positions)
        attempts: Counter = Counter()
        startup_failures = 0
        results: list = [None] * len(tasks)
        remaining = len(positions)
        while len(self._workers) < min(self.num_workers, remaining):
            self._spawn()

        from multiprocessing.connection import wait

        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=description, unit="item", disable=not progress, leave=False)

        def finish(task: tuple, value) -> None:
            nonlocal remaining
            for index in positions[task]:
                results[index] = value
            remaining -= 1
            bar.update(len(positions[task]))

        def lost(worker: _Worker, why: str, timed_out: bool = False) -> None:
            """A worker died or hung: replace it, retry the item it was on once unless it ran out of time, and
            requeue the items it had not started."""
            in_flight = [task for _, task in worker.tasks]
            self._retire(worker, kill=True)
            self.replaced_workers += 1
            if in_flight:
                task, unstarted = in_flight[0], in_flight[1:]
                queue.extendleft(reversed(unstarted))
                attempts[task] += 1
                if timed_out or attempts[task] >= 2:
                    logger.warning("grading %s: %s; verdict timeout", _describe(task), why)
                    finish(task, _TIMED_OUT[task[0]])
                else:
                    queue.appendleft(task)
            if remaining and len(self._workers) < min(self.num_workers, remaining):
                self._spawn()

        budget = self.timeout_s + HARD_TIMEOUT_GRACE_S
        try:
            while remaining:
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.ready and not worker.tasks and queue:
                        # Several items per message while the queue is long (fewer round trips); one at a time near
                        # the end, so that no worker sits on a backlog while another is idle. Only idle workers get
                        # work: a worker reads its pipe only between batches, so sending to a busy one could block.
                        size = max(1, min(_MAX_BATCH, len(queue) // (2 * len(self._workers))))
                        worker.tasks.extend((next(self._task_ids), queue.popleft()) for _ in range(size))
                        worker.deadline = now + budget
                        try:
                            worker.sender.send([(task_id, *task) for task_id, task in worker.tasks])
                        except OSError:
                            lost(worker, f"worker {worker.pid} died (exit code {worker.exitcode})")
                busy = [worker.deadline for worker in self._workers if worker.tasks]
                wait_s = max(0.0, min(busy) - now) if busy else 1.0
                by_conn = {worker.conn: worker for worker in self._workers}
                for conn in wait(list(by_conn), timeout=wait_s):
                    worker = by_conn[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        if not worker.ready:
                            startup_failures += 1
                            self._check_startup(startup_failures, f"exit code {worker.exitcode}")
                        lost(worker, f"worker {worker.pid} died (exit code {worker.exitcode})")
                        continue
                    if message[0] == "ready":
                        worker.ready, startup_failures = True, 0
                    elif message[0] == "failed":
                        startup_failures += 1
                        self._check_startup(startup_failures, message[1])
                        lost(worker, "worker failed to start")
                    elif worker.tasks and message[0] == worker.tasks[0][0]:
                        _, task = worker.tasks.popleft()
                        worker.deadline = time.monotonic() + budget  # the clock starts over for the next item
                        status, value = message[1]
                        if status == "error":
                            logger.warning("grading %s failed (%s); counted as not correct", _describe(task), value)
                            value = ("incorrect", None) if task[0] == "grade" else False
                        finish(task, value)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.tasks and now > worker.deadline:
                        lost(worker, f"no answer within {budget:.1f} s", timed_out=True)
        except BaseException:
            # Interrupted (Ctrl-C) or broken: workers may be mid-item; do not leave them running.
            for worker in list(self._workers):
                self._retire(worker, kill=True)
            raise
        finally:
            bar.close()
        return results

    def _check_startup(self, failures: int, detail: str) -> None:
        if failures >= _STARTUP_FAILURES_BEFORE_GIVING_UP:
            raise GraderError(
                f"grading workers fail to start ({failures} in a row); last error:\n{detail}\n"
                "Check that math-verify is installed in this environment (pip install 'math-verify>=0.9,<0.10')."
            )


def _as_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}: {value!r:.80}")
    return value


def _describe(task: tuple) -> str:
    operation, a, b = task
    shown = a if len(a) <= 60 else f"{a[:30]}...{a[-27:]} ({len(a)} chars)"
    return f"{operation}({shown!r} vs {b[:40]!r})"
