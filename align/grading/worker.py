"""One grading process, both ends: `serve` runs inside it, `WorkerProcess` is the parent's handle on it.

Inside, every item is graded in the process's main thread under a `setitimer` alarm of `soft_timeout_s`: an
exception that unwinds sympy and leaves the worker usable (math-verify's own timeouts use `signal.alarm` too, which
only works in a main thread). The process's address space is capped, so a runaway answer fails inside its worker
instead of exhausting the machine. What the alarm cannot stop (a long computation inside C code, a stopped
process) is the parent's to end, with a hard deadline (`align.grading.pool`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import traceback
from collections import deque
from pathlib import Path

from align.grading.verify import OPERATIONS, TIMED_OUT, extraction_config, grade_answer


class _SoftTimeout(BaseException):
    """Raised by the worker's alarm. A BaseException, so math-verify's and sympy's `except Exception` let it pass."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


def _limit_memory(limit_mb: int | None) -> None:
    if not limit_mb:
        return
    import resource

    limit = limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(conn_in, conn_out, soft_timeout_s: float, memory_limit_mb: int | None) -> None:
    """Serve batches of (task_id, operation, a, b) items until told to stop (None) or the pipe closes.

    Replies: ("ready", pid) once started, or ("failed", traceback); then (task_id, (status, value)) per item,
    status `ok`, `timeout` or `error`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it shuts the pool down
    logging.disable(logging.CRITICAL)  # math-verify logs a warning for every unparsable answer
    try:
        _limit_memory(memory_limit_mb)
        extraction_config()
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
                    result = ("ok", OPERATIONS[operation](a, b))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                result = ("timeout", TIMED_OUT[operation])
            except Exception as error:  # a bug or resource exhaustion inside the grader: report, keep serving
                result = ("error", f"{type(error).__name__}: {error}")
            conn_out.send((task_id, result))


def main() -> None:
    """Entry point of `python -c` worker processes: argv = read fd, write fd, soft timeout, memory limit (MiB)."""
    from multiprocessing.connection import Connection

    read_fd, write_fd, soft_timeout_s, memory_limit_mb = sys.argv[1:5]
    conn_in = Connection(int(read_fd), writable=False)
    conn_out = Connection(int(write_fd), readable=False)
    serve(conn_in, conn_out, float(soft_timeout_s), int(memory_limit_mb) or None)


class WorkerProcess:
    """One grading process: a fresh `python -c` interpreter (not a fork of this process, which may hold torch and
    CUDA state, and not multiprocessing's spawn, which re-imports the caller's main script), talking over two pipes.
    """

    def __init__(self, soft_timeout_s: float, memory_limit_mb: int | None):
        from multiprocessing.connection import Connection

        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", "from align.grading.worker import main; main()"]
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
