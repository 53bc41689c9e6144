"""The grading pool in the parent process: `Grader` hands items to worker processes and enforces hard deadlines.

- the parent gives every item a hard deadline of `timeout_s + 0.5 s` from the moment its worker reaches it; a
  worker that has not answered by then is killed and replaced, the item gets the verdict `timeout`, and the items
  queued behind it go to other workers;
- a worker that dies (crash, out-of-memory kill) is replaced too, and its item is retried once on a fresh worker;
- identical items within one call are graded once; results come back in input order.

One call (`grade_many`, `equivalent_many`) is one `_Dispatch`: its queue, its results and the loop that feeds idle
workers, reads answers and ends overdue items.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import Counter, deque

from align.grading.options import default_grader_workers
from align.grading.verify import FAILED, TIMED_OUT, GradeResult
from align.grading.worker import WorkerProcess


logger = logging.getLogger("align.grading")

HARD_TIMEOUT_GRACE_S = 0.5
DEFAULT_MEMORY_LIMIT_MB = 4096
_STARTUP_FAILURES_BEFORE_GIVING_UP = 3
_MAX_BATCH = 8


class GraderError(RuntimeError):
    """The grading pool cannot work (its workers fail to start)."""


def _shutdown(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class Grader:
    """A pool of grading processes with hard per-item timeouts; use as a context manager (or call `close()`).

    Workers start on first use (about a second each, in parallel). `num_workers` defaults to
    `default_grader_workers()` (the CPUs this process may use, divided by the processes on this machine);
    `timeout_s` is the per-item budget, enforced to within `timeout_s + 0.5 s` whatever the item does.
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
        self.num_workers = num_workers or default_grader_workers()
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[WorkerProcess] = []
        self._task_ids = itertools.count()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.replaced_workers = 0

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

    def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess(self.timeout_s, self.memory_limit_mb)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: WorkerProcess, kill: bool) -> None:
        self._workers.remove(worker)
        worker.stop(kill=kill)

    def _run(self, tasks: list[tuple[str, str, str]], progress: bool, description: str) -> list:
        if self._closed:
            raise GraderError("this Grader is closed")
        if not tasks:
            return []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=description, unit="item", disable=not progress, leave=False)
        try:
            return _Dispatch(self, tasks, bar).run()
        except BaseException:
            # Interrupted (Ctrl-C) or broken: workers may be mid-item; do not leave them running.
            for worker in list(self._workers):
                self._retire(worker, kill=True)
            raise
        finally:
            bar.close()


class _Dispatch:
    """One call's items through the pool: a queue of distinct tasks, fed to idle workers until all are answered."""

    def __init__(self, grader: Grader, tasks: list[tuple[str, str, str]], bar):
        self.grader, self.bar = grader, bar
        self.positions: dict[tuple, list[int]] = {}  # task -> its indices in the call (duplicates graded once)
        for index, task in enumerate(tasks):
            self.positions.setdefault(task, []).append(index)
        self.queue = deque(self.positions)
        self.attempts: Counter = Counter()
        self.startup_failures = 0
        self.results: list = [None] * len(tasks)
        self.remaining = len(self.positions)
        self.budget = grader.timeout_s + HARD_TIMEOUT_GRACE_S

    @property
    def workers(self) -> list[WorkerProcess]:
        return self.grader._workers

    def run(self) -> list:
        from multiprocessing.connection import wait

        self._top_up()
        while self.remaining:
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.ready and not worker.tasks and self.queue:
                    self._send(worker, now)
            busy = [worker.deadline for worker in self.workers if worker.tasks]
            by_conn = {worker.conn: worker for worker in self.workers}
            for conn in wait(list(by_conn), timeout=max(0.0, min(busy) - now) if busy else 1.0):
                self._receive(by_conn[conn])
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.tasks and now > worker.deadline:
                    self._lost(worker, f"no answer within {self.budget:.1f} s", timed_out=True)
        return self.results

    def _top_up(self) -> None:
        while len(self.workers) < min(self.grader.num_workers, self.remaining):
            self.grader._spawn()

    def _send(self, worker: WorkerProcess, now: float) -> None:
        # Several items per message while the queue is long (fewer round trips); one at a time near the end, so
        # that no worker sits on a backlog while another is idle. Only idle workers get work: a worker reads its
        # pipe only between batches, so sending to a busy one could block.
        size = max(1, min(_MAX_BATCH, len(self.queue) // (2 * len(self.workers))))
        worker.tasks.extend((next(self.grader._task_ids), self.queue.popleft()) for _ in range(size))
        worker.deadline = now + self.budget
        try:
            worker.sender.send([(task_id, *task) for task_id, task in worker.tasks])
        except OSError:
            self._lost(worker, f"worker {worker.pid} died (exit code {worker.exitcode})")

    def _receive(self, worker: WorkerProcess) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                self._startup_failed(f"exit code {worker.exitcode}")
            self._lost(worker, f"worker {worker.pid} died (exit code {worker.exitcode})")
            return
        if message[0] == "ready":
            worker.ready, self.startup_failures = True, 0
        elif message[0] == "failed":
            self._startup_failed(message[1])
            self._lost(worker, "worker failed to start")
        elif worker.tasks and message[0] == worker.tasks[0][0]:
            _, task = worker.tasks.popleft()
            worker.deadline = time.monotonic() + self.budget  # the clock starts over for the next item
            status, value = message[1]
            if status == "error":
                logger.warning("grading %s failed (%s); counted as not correct", _describe(task), value)
                value = FAILED[task[0]]
            self._finish(task, value)

    def _finish(self, task: tuple, value) -> None:
        for index in self.positions[task]:
            self.results[index] = value
        self.remaining -= 1
        self.bar.update(len(self.positions[task]))

    def _lost(self, worker: WorkerProcess, why: str, timed_out: bool = False) -> None:
        """A worker died or hung: replace it, retry the item it was on once unless it ran out of time, and requeue
        the items it had not started."""
        in_flight = [task for _, task in worker.tasks]
        self.grader._retire(worker, kill=True)
        self.grader.replaced_workers += 1
        if in_flight:
            task, unstarted = in_flight[0], in_flight[1:]
            self.queue.extendleft(reversed(unstarted))
            self.attempts[task] += 1
            if timed_out or self.attempts[task] >= 2:
                logger.warning("grading %s: %s; verdict timeout", _describe(task), why)
                self._finish(task, TIMED_OUT[task[0]])
            else:
                self.queue.appendleft(task)
        self._top_up()

    def _startup_failed(self, detail: str) -> None:
        self.startup_failures += 1
        if self.startup_failures >= _STARTUP_FAILURES_BEFORE_GIVING_UP:
            raise GraderError(
                f"grading workers fail to start ({self.startup_failures} in a row); last error:\n{detail}\n"
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
