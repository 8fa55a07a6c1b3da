"""Grading with a time limit: graders run in long-lived child processes, and one that takes too long is killed.

math-verify documents that it may not return: sympy can spend forever on an answer such as a tower of
powers, at times inside C code where not even math-verify's own SIGALRM limit gets through (its issue #65).
The engine grades in worker threads, and nothing can stop a call in a thread. So `GraderPool.limit(grade)` returns a grade
function of the same shape that sends (grader, item, reply) to an idle child process over a socket and
waits at most `timeout_s` for the verdict. A grade that is not back in time gets its child killed (a new one
takes its place at the next grade) and is recorded as wrong, with the reason "grader timeout" and extra
{"grader_timeout": true}.

Children are started with `python -c`, never forked: the parent holds llama.cpp's threads and locks. A
child imports the modules the graders bound so far preload (a `preload` attribute; the maths grader's
sympy) before it says it is ready, so that a first grade's clock does not count them; one that fails to
import is left to the grade, which then meets the error itself. A child imports the grader by name from the
pickle, on the parent's sys.path, so a grader must be a
module-level function of an importable module, as every built-in task's is. A grader that is not (a lambda,
a closure, a function of a script's __main__) grades in the calling thread, without a limit, after one
warning. The code graders grade in the calling thread too: the sandbox runs the program in a process of
its own and kills it at its own timeout, which a limit here could only cut short, turning the program's
own verdict ("timeout after 10s") into a grader timeout.

Children do not outlive the parent: `close()` (at the end of every run) kills them, so do garbage
collection and the interpreter's exit, and on Linux the kernel kills them when the parent dies
(PR_SET_PDEATHSIG). They run in a session of their own, so a Ctrl-C in the terminal reaches only the
parent, and they print nothing: their standard streams are /dev/null.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Callable

from .sandbox_child import die_with_parent
from .tasks import Grade, Item
from .tasks.code import grade_code_with_tests, grade_humaneval, grade_humaneval_3s
from .tasks.grading import grade_math

DEFAULT_TIMEOUT_S = 10.0
TIMEOUT_REASON = "grader timeout"
# Graders bounded by the sandbox, which kills the program they run at its own timeout.
SANDBOXED = (grade_humaneval, grade_humaneval_3s, grade_code_with_tests)
# A child imports selfcorrect (numpy and scipy among it) before it is ready; that is not the grade's time.
_START_TIMEOUT_S = 120.0
# What the built-in graders import that takes long: sympy, a second or so. (Declared here rather than on the
# grader, whose module's source is part of the grader version: stored verdicts would look outdated.)
BUILTIN_PRELOADS = {grade_math: ("math_verify",)}

Grader = Callable[[Item, str], Grade]


class GraderPool:
    """Up to `processes` grading children (default: one per CPU), started as grades ask for them; the first
    starts when a grader is bound (`limit`), so it imports selfcorrect while the model writes a reply."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, processes: int | None = None):
        self.timeout_s = timeout_s
        self.processes = processes or os.cpu_count() or 1
        self._changed = threading.Condition()
        self._idle: list[_Child] = []
        self._alive: set[_Child] = set()
        self._unstarted = self.processes  # children that may still be started
        self._closed = False
        self._in_thread: set = set()  # graders a child could not import
        self._preload: tuple[str, ...] = ()  # modules a new child imports before it is ready
        # Every child is started from this one thread: on Linux a child dies with the thread that started it
        # (that is how PR_SET_PDEATHSIG counts), and this one lives until the pool closes.
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="grader-pool")
        self._kill_all = weakref.finalize(self, _kill_children, self._alive)

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def limit(self, grader: Grader) -> Grader:
        """`grader`, bounded: through a child process where it can go there, else as it is."""
        if grader in SANDBOXED:
            return grader
        problem = _not_importable(grader)
        if problem:
            _warn_in_thread(grader, problem)
            return grader
        with self._changed:
            self._preload = tuple(sorted({*self._preload, *_preload_of(grader)}))
            if self._unstarted == self.processes:
                self._idle.append(self._start())
        return functools.partial(self.grade, grader)

    def grade(self, grader: Grader, item: Item, response: str) -> Grade:
        """`grader(item, response)` in a child, or the timeout's verdict if it is not back in time."""
        if grader in self._in_thread:
            return grader(item, response)
        child = self._take()
        try:
            outcome = child.ask((grader, item, response), self.timeout_s)
        except BaseException:
            self._discard(child)
            raise
        if outcome is None:
            self._discard(child)
            return Grade(None, False, TIMEOUT_REASON, {"grader_timeout": True})
        self._give_back(child)
        kind, value, detail = outcome
        if kind == "graded":
            return value
        if kind == "unloadable":
            _warn_in_thread(grader, value)
            self._in_thread.add(grader)
            return grader(item, response)
        raise value from _ChildTraceback(detail)

    def close(self) -> None:
        """Kill every child; grades asked after this fail."""
        with self._changed:
            self._closed = True
            self._idle.clear()
            self._changed.notify_all()
        self._kill_all()
        self._starter.shutdown()

    def _take(self) -> _Child:
        with self._changed:
            while not self._idle:
                if self._unstarted or self._closed:
                    return self._start()
                self._changed.wait()
            return self._idle.pop()

    def _start(self) -> _Child:
        """A new child, counted and tracked (called holding `_changed`). Starting it takes milliseconds: it
        imports selfcorrect afterwards, and its first grade waits for that outside the time limit."""
        if self._closed:
            raise RuntimeError("the grader pool is closed")
        child = self._starter.submit(_Child, self._preload).result()
        self._unstarted -= 1
        self._alive.add(child)
        return child

    def _give_back(self, child: _Child) -> None:
        with self._changed:
            if child in self._alive:  # not killed by close() meanwhile
                self._idle.append(child)
                self._changed.notify()

    def _discard(self, child: _Child) -> None:
        child.kill()
        with self._changed:
            self._alive.discard(child)
            self._unstarted += 1
            self._changed.notify()


class _ChildTraceback(Exception):
    """Where in the grading process a grader raised (the cause of the re-raised error)."""


class _Child:
    """One grading process, which imports the `preload` modules before it is ready, and the parent's end of its
    socket."""

    def __init__(self, preload: tuple[str, ...] = ()):
        parent_end, child_end = socket.socketpair()
        try:
            with child_end:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", "from selfcorrect.grader_pool import serve; serve()",
                     str(child_end.fileno()), str(os.getpid()), *preload],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    pass_fds=(child_end.fileno(),), start_new_session=True,
                    # The parent's sys.path, so a child imports selfcorrect and the graders as the parent did.
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                )
        except BaseException:
            parent_end.close()
            raise
        self.connection = Connection(parent_end.detach())
        self.ready = False  # it says so once it has imported selfcorrect
        self._killing = threading.Lock()  # close() and a timed-out grade may kill the same child

    def ask(self, request: tuple, timeout_s: float) -> tuple | None:
        """Send one grade and wait `timeout_s` for its outcome (None when the time ran out), after waiting
        for the child to be ready if it is new."""
        try:
            if not self.ready:
                self.ready = self.connection.poll(_START_TIMEOUT_S) and self.connection.recv() == "ready"
                if not self.ready:
                    raise EOFError
            self.connection.send(request)
            if not self.connection.poll(timeout_s):
                return None
            return self.connection.recv()
        except (EOFError, OSError):
            self.kill()
            if not self.ready:
                raise RuntimeError(f"a grading process did not start (exit code {self.process.returncode}); "
                                   f"check that `{sys.executable} -c 'import selfcorrect'` works") from None
            raise RuntimeError(
                f"a grading process died while grading (exit code {self.process.returncode})"
            ) from None

    def kill(self) -> None:
        with self._killing:
            if self.process.returncode is None:  # once reaped, its pid may belong to another process
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)  # its session: what the grader started goes too
                except ProcessLookupError:
                    pass
                self.process.wait()
            self.connection.close()


def _kill_children(alive: set[_Child]) -> None:
    for child in list(alive):
        child.kill()
    alive.clear()


def _preload_of(grader: Grader) -> tuple[str, ...]:
    """The modules a child imports for `grader` before it is ready: its `preload` attribute (a custom grader
    can have one), else the built-in graders' own."""
    wanted = getattr(grader, "preload", None) or BUILTIN_PRELOADS.get(grader, ())
    return (wanted,) if isinstance(wanted, str) else tuple(wanted)


def _not_importable(grader: Grader) -> str | None:
    """Why a child could not import `grader` by name, when the parent can tell."""
    try:
        pickle.dumps(grader)
    except Exception as error:  # pickling fails with several kinds of error
        return f"it cannot be pickled ({error})"
    if getattr(grader, "__module__", None) == "__main__":  # a child's __main__ is not the parent's script
        return "it is defined in the __main__ script"
    return None


def _warn_in_thread(grader: Grader, problem: str) -> None:
    name = getattr(grader, "__qualname__", repr(grader))
    warnings.warn(
        f"grader {name} cannot run in a grading process: {problem}; it grades without a time limit "
        "(make it a module-level function of an importable module to have one)",
        RuntimeWarning, stacklevel=3,
    )


def serve() -> None:
    """A grading child: grade what the parent sends until it closes its end of the socket."""
    die_with_parent(int(sys.argv[2]))
    connection = Connection(int(sys.argv[1]))
    for module in sys.argv[3:]:  # what the graders preload: before the first grade's clock starts, not inside it
        try:
            importlib.import_module(module)
        except Exception:  # the grade that needs it meets the error, as it would without the preload
            pass
    connection.send("ready")
    while True:
        try:
            request = connection.recv_bytes()
        except EOFError:
            return
        try:
            grader, item, response = pickle.loads(request)
        except Exception as error:  # the grader's module does not import here
            connection.send(("unloadable", f"{type(error).__name__}: {error}", None))
            continue
        try:
            outcome = ("graded", grader(item, response), None)
        except Exception as error:
            outcome = ("raised", error, traceback.format_exc())
        try:
            connection.send(outcome)
        except Exception as error:  # a verdict or an error that does not pickle
            connection.send(("raised", RuntimeError(f"grader {grader!r}: {error}"), traceback.format_exc()))
