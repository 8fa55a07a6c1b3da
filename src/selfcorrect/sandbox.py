"""Run a model-written Python program (a solution plus its tests) in a throwaway, limited process.

`run_program` writes the program to `program.py` in a fresh temporary directory and runs it there with
`python -I` in a new session, through a small runner (selfcorrect.sandbox_child). It passes only if the
program runs to its last line and the interpreter then exits 0. Linux only.

Two boundaries, chosen by the isolation mode (selfcorrect.isolation; the grade records which one ran):

**bubblewrap**, where it works here (a trial run at first use tells, `bubblewrap_problem`). The program runs
in new PID, network, IPC, UTS and cgroup namespaces with a read-only root, private /tmp, /run, /proc and
/dev, empty home directories, and its working directory inside the private /tmp (memory, not a host disk).
It cannot see or signal any host process, reach any address or host Unix socket under /run, write to any
host file, or read the caller's home, whatever it calls (ctypes and libc included). Run by root, it runs as a
fresh unprivileged user (no capabilities, no setuid), so the kernel's process-count limit contains a fork
bomb. What remains: it reads what that user may read of the host's other files (the root is bound
read-only, not hidden). See selfcorrect.isolation.

**process only** (no bubblewrap, or mode "process"). Enforced by the kernel: CPU time, address space and
file size limits (setrlimit, so a memory bomb gets a MemoryError); a process-count limit, which Linux does
not apply to root; where the OS permits it, an empty network namespace. Enforced by a Python-level guard:
starting processes (os.fork, subprocess, os.system, exec*), signalling (os.kill, os.killpg) and leaving the
process group are refused; so are creating, changing or removing files outside the working directory,
reading other processes' /proc entries (their environment), and opening sockets. The guard stops honest
mistakes and careless code, not a determined attacker: `ctypes`, `_io`, `_socket` and friends reach the
same system calls around it. Such a program runs as the caller's user, so as root it can still kill
other processes (the parent too), read their environments, write wherever root can, fork without limit
until the timeout, connect to host Unix sockets, or call setsid() to leave the process group and survive
the run. Run untrusted code that way only inside a machine or container you can throw away.

In both: the guard (it turns mistakes into clear reasons), the rlimits, a wall-clock timeout, a cap on
stdout and stderr, an environment holding only PATH, LANG, HOME and TMPDIR (the parent's secrets are not
passed on), a working directory deleted afterwards, and one process group killed as soon as the program
ends, times out or floods its output, so no descendant outlives the run.

**Where the verdict is made.** A program that runs its own tests decides its own verdict: whatever reports
"passed" from inside the process (a status pipe, a nonce, an exit code) the program can reach and forge, and a
value whose `__eq__` answers True passes any `assert f(x) == y`. So a grade with tests (`TestPlan`) runs only
the candidate's code in the sandbox and the tests here, in the grading process: each call of the program's
functions crosses the boundary as text (the arguments and the returned value as Python literals, read back by
`ast.literal_eval`), so the tests see plain data; builtins the program replaces are its own; a program that
ends early, hangs or floods its output fails. What the sandbox reports is then only ever a failure (it could
not load the program, or the program broke a limit).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import io
import json
import linecache
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from . import isolation
from .isolation import BUBBLEWRAP, PROCESS_ONLY, IsolationUnavailable
from .sandbox_child import PROGRAM_FILE, innermost_line, one_line, parse, plain_value

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# Once the program has exited, how long to keep reading what is already in its pipes.
_DRAIN_S = 1.0
# bubblewrap exits with 128 + the signal that killed the program, as a shell does.
_SIGNALLED = 128


class SandboxBroken(RuntimeError):
    """The sandbox could not start the program (it says nothing about the program)."""


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended. `reason` is one line, fit to show a model as execution feedback."""

    passed: bool
    reason: str
    stdout: str
    stderr: str
    duration_s: float
    isolation: str = PROCESS_ONLY  # BUBBLEWRAP or PROCESS_ONLY: the boundary the program ran inside
    isolation_note: str | None = None  # why not inside bubblewrap, one line


@dataclass(frozen=True)
class TestPlan:
    """Tests to run here, in the grading process, against the program's functions.

    `setup` runs first (the task's own code: a HumanEval prompt with its helper functions, an MBPP item's setup
    code); then each name of `candidates` is bound to a function that calls the program's function of that name
    in the sandbox (None: every name the tests call that neither `setup` nor the tests define, and that is no
    builtin); then `tests` runs. The grade passes when `tests` runs to its end."""

    setup: str
    tests: str
    candidates: tuple[str, ...] | None = None

    def run(self, candidate: Callable[[str], Callable], filename: str) -> None:
        namespace: dict = {"__name__": "__tests__"}
        exec(compile(self.setup, f"{filename} setup", "exec"), namespace)  # noqa: S102 - the task's own code
        code = compile(self.tests, filename, "exec")
        for name in self.candidates if self.candidates is not None else _free_names(self.tests, namespace):
            namespace[name] = candidate(name)
        # unittest-style tests: their TestCases are run below, so their own unittest.main() does nothing (here
        # it would parse the grader's arguments and look for tests in the grader's __main__).
        with unittest.mock.patch.object(unittest, "main", lambda *args, **kwargs: None):
            exec(code, namespace)  # noqa: S102 - the task's own tests
        cases = [value for value in namespace.values()
                 if isinstance(value, type) and issubclass(value, unittest.TestCase) and value is not unittest.TestCase]
        if cases:
            suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case) for case in cases)
            outcome = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
            if not outcome.wasSuccessful():
                test, trace = (outcome.failures + outcome.errors)[0]
                raise AssertionError(f"{test.id().rpartition('.')[2]} failed: {trace.strip().splitlines()[-1]}")


def _free_names(tests: str, namespace: dict) -> list[str]:
    """Names the tests read that they do not define and that `namespace` and builtins lack: the program's
    functions (called, or passed on: `map(f, xs)`, `key=f`). A name the tests only use as a module
    (`math.isclose`) is imported here instead, as the program's own `import math` used to provide it."""
    tree = parse(tests)
    defined = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    defined |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined |= {alias.asname or alias.name.partition(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    known = defined | set(namespace) | set(dir(builtins))
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    bare = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} - {
        node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    for name in sorted((read - known) - bare):  # used only as `name.attribute`
        with contextlib.suppress(ImportError):
            namespace[name] = __import__(name)
    return sorted(read - known - set(namespace))


class CandidateError(BaseException):
    """A call of the program's function that gave no plain value: it raised, returned an object that is not a
    literal, ended the program or ran out of time. The message is one line, for the grade's reason. A
    BaseException, so that tests catching `Exception` do not take it for an error they expect."""


# The exceptions a call of the program may raise in the tests as themselves (tests may expect one); any other
# arrives as a CandidateError. StopIteration and its kin are left out: raised inside a test's generator or
# `map`, they would end it quietly, as if every remaining value had passed.
CROSSING_EXCEPTIONS = (ValueError, TypeError, KeyError, IndexError, LookupError, ArithmeticError, ZeroDivisionError,
                       OverflowError, AttributeError, AssertionError, NotImplementedError, RuntimeError, RecursionError)


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    cpu_s: int
    max_output_bytes: int
    max_file_bytes: int
    max_processes: int


def run_program(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: int = 10,
    max_output_bytes: int = 100_000,
    max_file_bytes: int = 10_000_000,
    max_processes: int = 32,
    mode: str | None = None,
    tests: TestPlan | None = None,
) -> ExecutionResult:
    """Run `program` (solution, tests and the call that runs them) in the sandbox and grade the run; or, with
    `tests`, run `program` (the solution alone) in the sandbox and `tests` here against it (see the module
    docstring): the grade passes when the tests do.

    A program that calls sys.exit() has not finished, even with code 0 after its last test; that
    includes unittest.main(), so run unittest with unittest.main(exit=False) and a failing result
    raising, or use plain asserts.

    stdout and stderr are each read up to `max_output_bytes`; one more byte ends the run. Without bubblewrap
    the kernel counts `max_processes` over all of the user's processes and threads (not for root), so a
    caller that is not root and already runs many processes needs a higher value for threaded programs.
    `mode` is an isolation mode (selfcorrect.isolation; None: the one in force); "strict" raises
    IsolationUnavailable where bubblewrap does not work. SandboxBroken: the sandbox failed to start.
    """
    limits = Limits(timeout_s, memory_mb, cpu_s, max_output_bytes, max_file_bytes, max_processes)
    mode = mode or isolation.current_mode()
    inside_bubblewrap = _use_bubblewrap(mode)
    result = _execute(program, inside_bubblewrap, limits, tests)
    if inside_bubblewrap:
        return result
    return replace(result, isolation_note="--isolation process" if mode == "process" else bubblewrap_problem())


def _use_bubblewrap(mode: str) -> bool:
    if isolation.check_mode(mode) == "process":
        return False
    problem = bubblewrap_problem()
    if problem is not None and mode == "strict":
        raise IsolationUnavailable(f"--isolation strict: {problem}")
    return problem is None


def isolation_for(mode: str) -> str:
    """The boundary programs will run inside in `mode` (BUBBLEWRAP or PROCESS_ONLY); IsolationUnavailable
    for "strict" where bubblewrap does not work. A run asks this before it starts."""
    return BUBBLEWRAP if _use_bubblewrap(mode) else PROCESS_ONLY


# The trial run: it passes only where bubblewrap started it cut off from the host as run_program promises.
_TRIAL = """
import os
assert os.getpid() < 10, f"pid {os.getpid()}: not in a new PID namespace"
assert os.getuid() != 0, "still root"
assert os.listdir("/run") == [], "the host's /run is visible"
"""


@functools.cache
def bubblewrap_problem() -> str | None:
    """None when bubblewrap isolates programs here, else why not (one line). Found once per process by a
    trial run through the same path every program takes."""
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian and Ubuntu: apt install bubblewrap)"
    try:
        trial = _execute(_TRIAL, True, Limits(60.0, 512, 10, 100_000, 1_000_000, 32))
    except (OSError, SandboxBroken) as error:
        return f"bubblewrap does not work here: {error}"
    if not trial.passed:
        return f"bubblewrap's trial run failed: {trial.reason}"
    return None


def _execute(program: str, use_bubblewrap: bool, limits: Limits, tests: TestPlan | None = None) -> ExecutionResult:
    # How the parent knows the program ran to its end: the runner reads this nonce from stdin before
    # the program starts, keeps it out of the program's namespace, and writes it to a pipe of its own
    # only after exec() of the program returns. sys.exit() raises SystemExit through exec(), and
    # os._exit() or a signal end the process before that line, so none of them can fake it; nor can
    # printing, since the nonce goes to a separate pipe. Code that digs the nonce out of the runner's
    # frames can forge it: so with `tests`, a report of the runner's can fail a grade but never pass one.
    nonce = secrets.token_hex(16)
    started = time.monotonic()
    with _workdir(program, use_bubblewrap) as (workdir, program_fd):
        uid = isolation.sandbox_uid() if use_bubblewrap else None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        status_read, status_write = os.pipe()
        # With tests: the runner reads calls from one pipe and answers on the other (sandbox_child._serve).
        requests_read, requests_write = os.pipe() if tests else (None, None)
        replies_read, replies_write = os.pipe() if tests else (None, None)
        theirs = [fd for fd in (status_write, requests_read, replies_write, program_fd) if fd is not None]
        try:
            command = [sys.executable, "-I", _CHILD, str(status_write), str(limits.memory_mb * 2**20),
                       str(limits.cpu_s), str(limits.max_file_bytes), str(limits.max_processes),
                       "bubblewrap" if use_bubblewrap else "process", "-" if uid is None else str(uid)]
            if tests:
                command += [str(requests_read), str(replies_write)]
            if use_bubblewrap:
                command = isolation.bubblewrap_argv(command, env, workdir, program_fd, uid,
                                                    readable=(os.path.dirname(_CHILD),))
            else:
                env["SELFCORRECT_PARENT_PID"] = str(os.getpid())
            process = subprocess.Popen(
                command,
                cwd="/" if use_bubblewrap else workdir,  # under bubblewrap, workdir exists only inside
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(theirs),
                start_new_session=True,
            )
        except BaseException:
            for fd in (status_read, requests_write, replies_read):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in theirs:
                if fd != program_fd:
                    os.close(fd)
        with process:
            tester = None
            try:
                if tests:
                    tester = _Tester(tests, requests_write, replies_read, started + limits.timeout_s)
                try:
                    process.stdin.write(f"{nonce}\n".encode())
                    process.stdin.close()
                except BrokenPipeError:
                    pass  # the runner died at once; its exit status tells why
                stdout, stderr, status, stopped = _collect(process, status_read, limits.timeout_s,
                                                           limits.max_output_bytes)
            finally:
                _kill_group(process.pid)
                process.wait()
                _await_group_end(process.pid)
                os.close(status_read)
                if tester:
                    tester.finish()
    reports = _reports(status.decode(errors="replace"), nonce)
    returncode = process.returncode
    if use_bubblewrap and returncode > _SIGNALLED:  # (a program's own os._exit(130) reads as SIGINT: a failure too)
        returncode = _SIGNALLED - returncode
    if stopped == "output":
        passed, reason = False, f"output limit exceeded (more than {limits.max_output_bytes} bytes)"
    elif stopped == "timeout":
        passed, reason = False, f"timeout after {limits.timeout_s:g}s"
    elif "running" not in reports:
        lines = stderr.decode(errors="replace").strip().splitlines()
        raise SandboxBroken(f"the sandbox ({BUBBLEWRAP if use_bubblewrap else PROCESS_ONLY}) could not start the "
                            f"program (exit code {process.returncode}): {lines[-1] if lines else 'no message'}")
    else:
        final = [report for report in reports if report != "running"]
        passed, reason = _verdict(returncode, final[-1] if final else None, limits.cpu_s)
        if tester and (passed or final[-1:] == ["passed"]):
            # The program loaded (or says so, and cannot pass by saying it): the verdict is the tests'.
            passed, reason = tester.passed, tester.reason
    return ExecutionResult(
        passed=passed,
        reason=reason,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        duration_s=time.monotonic() - started,
        isolation=BUBBLEWRAP if use_bubblewrap else PROCESS_ONLY,
    )


# The most a reply of the program may hold: a value whose literal is larger fails the call. Reading a literal
# back costs the grading process memory and time (a crafted one: hundreds of MB and seconds per MB), so the
# cap is low; a function's result in a test is small.
MAX_REPLY_BYTES = 256_000


class _Tester:
    """Runs a TestPlan in a thread of this process while the program serves its calls; `passed` and `reason`
    once `finish` has returned. The thread ends when the tests do, or when the program is gone (the pipes
    close): its request pipe is closed then, which ends the program's loop of answers."""

    def __init__(self, tests: TestPlan, requests_fd: int, replies_fd: int, deadline: float):
        self.tests, self.requests_fd, self.replies_fd, self.deadline = tests, requests_fd, replies_fd, deadline
        self.pending = bytearray()
        self.filename = f"<tests {secrets.token_hex(4)}>"
        self.passed, self.reason = False, "the tests did not finish"
        self.thread = threading.Thread(target=self._run, name="sandbox-tests", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        linecache.cache[self.filename] = (len(self.tests.tests), None, self.tests.tests.splitlines(True), self.filename)
        try:
            self.tests.run(self.candidate, self.filename)
            self.passed, self.reason = True, "passed"
        except BaseException as error:  # noqa: BLE001 - whatever the tests raise fails them
            self.reason = _test_failure(error, self.filename)
        finally:
            linecache.cache.pop(self.filename, None)
            os.close(self.requests_fd)
            os.close(self.replies_fd)

    def finish(self) -> None:
        """Wait for the tests (the program is gone by now, so a call ends at once)."""
        self.thread.join(max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self.thread.is_alive():
            self.passed, self.reason = False, "the tests did not finish in time"

    def candidate(self, name: str) -> Callable:
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: tuple, kwargs: dict):
        arguments = repr((args, kwargs))
        try:
            plain_value(arguments)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise CandidateError(f"the tests pass {name}() an argument that is not plain data") from None
        request = (json.dumps([name, arguments]) + "\n").encode()
        try:
            while request:
                request = request[os.write(self.requests_fd, request):]
        except BrokenPipeError:
            raise CandidateError(f"the program ended before {name}() answered") from None
        line = self._line(name)
        try:
            reply = json.loads(line)
            raised = reply.get("raised")
            value = None if raised is not None else plain_value(reply["value"])
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, MemoryError, RecursionError):
            raise CandidateError(f"{name}() returned something that is not a plain value (a literal)") from None
        if raised is not None:
            # A builtin exception crosses as its type, so tests that expect one (pytest.raises-like checks) work.
            kind = {exception.__name__: exception for exception in CROSSING_EXCEPTIONS}.get(str(reply.get("type")))
            # The error's type leads, as in a traceback; the call that raised it follows.
            message = f"{raised}, calling {name}()"
            if kind is not None:
                raise kind(message)
            raise CandidateError(message)
        return value

    def _line(self, name: str) -> bytes:
        while b"\n" not in self.pending:
            remaining = self.deadline - time.monotonic()
            poll = select.poll()  # not select.select: a descriptor above 1023 is fine
            poll.register(self.replies_fd, select.POLLIN)
            if remaining <= 0 or not poll.poll(remaining * 1000):
                raise CandidateError(f"{name}() did not answer in time")
            chunk = os.read(self.replies_fd, 65536)
            if not chunk:
                raise CandidateError(f"the program ended before {name}() answered")
            self.pending += chunk
            if len(self.pending) > MAX_REPLY_BYTES:
                raise CandidateError(f"{name}() returned more than {MAX_REPLY_BYTES} bytes")
        line, _, rest = bytes(self.pending).partition(b"\n")
        self.pending = bytearray(rest)
        return line


def _test_failure(error: BaseException, filename: str) -> str:
    """One line for a failed test, as the sandbox's runner gives one for a failed program: the error and the
    line of the tests it came from."""
    line = innermost_line(error, filename)
    source = linecache.getline(filename, line).strip() if line else ""
    message = str(error)
    where = f"{type(error).__name__} at line {line} of the tests" if line else type(error).__name__
    if isinstance(error, CandidateError):
        text = f"{message}{f' (line {line} of the tests: {source})' if line else ''}"
    elif isinstance(error, AssertionError):
        text = f"{where}: {source}{f' ({message})' if message else ''}"
    else:
        text = f"{where}: {message or source}"
    return one_line(text)


@contextlib.contextmanager
def _workdir(program: str, inside_bubblewrap: bool) -> Iterator[tuple[str, int | None]]:
    """Where the program runs, and under bubblewrap a file descriptor holding it.

    Under bubblewrap the directory is made inside the sandbox's private /tmp, and bubblewrap copies the program
    there from the descriptor (a memory file): nothing of the run touches the host's disk. Otherwise it is a
    temporary directory of the host, deleted afterwards.
    """
    source = program.encode("utf-8", errors="replace")
    if inside_bubblewrap:
        program_fd = os.memfd_create(PROGRAM_FILE)
        try:
            with open(program_fd, "wb", closefd=False) as handle:
                handle.write(source)
            os.lseek(program_fd, 0, os.SEEK_SET)
            yield f"/tmp/selfcorrect-sandbox-{secrets.token_hex(6)}", program_fd
        finally:
            os.close(program_fd)
        return
    with tempfile.TemporaryDirectory(prefix="selfcorrect-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, PROGRAM_FILE).write_bytes(source)
        yield workdir, None


def _collect(process: subprocess.Popen, status_fd: int, timeout_s: float, cap: int):
    """Read stdout, stderr and the status pipe until they close, the time is up or one passes `cap`.

    Returns the three byte strings and what stopped the run early: "timeout", "output" or None. When
    the program exits, its process group is killed at once: a descendant still holding the pipes must
    neither keep the parent waiting nor outlive the run.
    """
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray(), status_fd: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    exited = False
    stopped = None
    try:
        while selector.get_map() and stopped is None:
            if not exited and _has_exited(process.pid):
                exited = True
                _kill_group(process.pid)
                deadline = min(deadline, time.monotonic() + _DRAIN_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = None if exited else "timeout"
                break
            for key, _ in selector.select(min(remaining, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                buffer += chunk
                if len(buffer) > cap:
                    del buffer[cap:]
                    stopped = "output"
    finally:
        selector.close()
    stdout, stderr, status = (bytes(buffer) for buffer in buffers.values())
    return stdout, stderr, status, stopped


def _has_exited(pid: int) -> bool:
    """Whether the runner has exited, without reaping it: its zombie keeps its group id taken."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    """SIGKILL the program's whole process group, if any of it is left.

    Only called while the runner is not yet reaped, so the group id cannot belong to anyone else.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _await_group_end(pgid: int, limit_s: float = 1.0) -> None:
    """Wait briefly until no process of the killed group still runs, so none outlives run_program."""
    deadline = time.monotonic() + limit_s
    while _group_running(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_running(pgid: int) -> bool:
    """Whether a process of the group still runs."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return bool(_live_processes_in_group(pgid))


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids of the process group that still run. Zombies, which wait for init to reap them, don't."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                state, _, group = handle.read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _reports(status: str, nonce: str) -> list[str]:
    """The runner's reports ("running", then "passed" or "failed REASON"), ignoring lines without the nonce."""
    return [line[len(nonce) + 1:] for line in status.splitlines() if line.startswith(f"{nonce} ")]


def _verdict(returncode: int, report: str | None, cpu_s: int) -> tuple[bool, str]:
    """(passed, reason) for a run that ended by itself, from its exit status and the runner's report."""
    if returncode == -signal.SIGXCPU:
        return False, f"CPU time limit exceeded ({cpu_s}s)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return False, f"killed by signal {-returncode} ({name})"
    if report == "passed":
        if returncode == 0:
            return True, "passed"
        return False, f"exited with code {returncode} after the tests finished"
    if report is not None:
        return False, report.removeprefix("failed ")
    return False, f"exited with code {returncode} before the tests finished"
