"""Run a model-written Python program (a solution plus its tests) in a throwaway, limited process.

`run_program` writes the program to `program.py` in a fresh temporary directory and runs it there with
`python -I` in a new session, through a small runner (this file's `__main__` part). It passes only if
the program runs to its last line and the interpreter then exits 0.

Linux only. What is enforced, and by whom:

- By the kernel, whatever the program does: CPU time, address space and file size limits (setrlimit,
  so a memory bomb gets a MemoryError); a process-count limit, which Linux does not apply to root; a
  wall-clock timeout; a cap on stdout and stderr; an environment holding only PATH, LANG, HOME and
  TMPDIR (the parent's secrets are not passed on); a temporary working directory deleted afterwards;
  and, where the OS permits it (it does as root, and usually for others through a user namespace),
  an empty network namespace, in which no address, not even 127.0.0.1, is reachable. The program
  and every process it starts share one process group, which is killed as soon as the program ends,
  times out or floods its output, so no descendant outlives the run (unless it left the group).
- By a Python-level guard installed before the program starts: starting processes (os.fork,
  subprocess, os.system, exec*), signalling (os.kill, os.killpg) and leaving the process group are
  refused; so are creating, changing or removing files outside the working directory, reading other
  processes' /proc entries (their environment), and opening sockets. The guard stops honest mistakes
  and careless code, not a determined attacker: `ctypes`, `_io`, `_socket` and friends reach the
  same system calls around it. Such a program runs as the caller's user, so as root it can still
  kill other processes (the parent too), read their environments, write wherever root can, fork
  without limit until the timeout, or call setsid() to leave the process group and survive the run.
  Even a guarded program may fill the disk with many files of up to the size limit in its own
  directory. Run untrusted code as root only inside a machine or container you can throw away.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import linecache
import os
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROGRAM_FILE = "program.py"

# Once the program has exited, how long to keep reading what is already in its pipes.
_DRAIN_S = 1.0
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# os functions that create, change or remove files, and which of their arguments name those files.
_CHANGES_FILES = {
    "mkdir": ("path",), "mkfifo": ("path",), "mknod": ("path",), "remove": ("path",),
    "unlink": ("path",), "rmdir": ("path",), "rename": ("src", "dst"), "replace": ("src", "dst"),
    "link": ("src", "dst"), "symlink": ("dst",), "chmod": ("path",), "chown": ("path",),
    "lchown": ("path",), "truncate": ("path",),
}
# Functions that start processes, signal them, or leave the process group the parent will kill.
_REFUSED = {
    os: ("fork", "forkpty", "system", "execv", "execve", "posix_spawn", "posix_spawnp",
         "kill", "killpg", "setsid", "setpgid", "setpgrp"),
    signal: ("pthread_kill", "pidfd_send_signal"),
}


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended. `reason` is one line, fit to show a model as execution feedback."""

    passed: bool
    reason: str
    stdout: str
    stderr: str
    duration_s: float


def run_program(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: int = 10,
    max_output_bytes: int = 100_000,
    max_file_bytes: int = 10_000_000,
    max_processes: int = 32,
) -> ExecutionResult:
    """Run `program` (solution, tests and the call that runs them) in the sandbox and grade the run.

    A program that calls sys.exit() has not finished, even with code 0 after its last test; that
    includes unittest.main(), so run unittest with unittest.main(exit=False) and a failing result
    raising, or use plain asserts.

    stdout and stderr are each read up to `max_output_bytes`; one more byte ends the run. The kernel
    counts `max_processes` over all of the user's processes and threads (not for root), so a caller
    that is not root and already runs many processes needs a higher value for threaded programs.
    """
    # How the parent knows the program ran to its end: the runner reads this nonce from stdin before
    # the program starts, keeps it out of the program's namespace, and writes it to a pipe of its own
    # only after exec() of the program returns. sys.exit() raises SystemExit through exec(), and
    # os._exit() or a signal end the process before that line, so none of them can fake a pass; nor
    # can printing, since the nonce goes to a separate pipe. Only code that digs the nonce out of the
    # runner's frames could forge it, and such code is beyond what the guard claims to stop.
    nonce = secrets.token_hex(16)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="selfcorrect-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, PROGRAM_FILE).write_text(program, encoding="utf-8", errors="replace")
        status_read, status_write = os.pipe()
        try:
            limits = (memory_mb * 2**20, cpu_s, max_file_bytes, max_processes)
            process = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(status_write), *map(str, limits)],
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
                     "SELFCORRECT_PARENT_PID": str(os.getpid())},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_write,),
                start_new_session=True,
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
        with process:
            try:
                process.stdin.write(f"{nonce}\n".encode())
                process.stdin.close()
            except BrokenPipeError:
                pass  # the runner died at once; its exit status tells why
            try:
                stdout, stderr, status, stopped = _collect(process, status_read, timeout_s, max_output_bytes)
            finally:
                _kill_group(process.pid)
                process.wait()
                _await_group_end(process.pid)
                os.close(status_read)
    if stopped == "output":
        passed, reason = False, f"output limit exceeded (more than {max_output_bytes} bytes)"
    elif stopped == "timeout":
        passed, reason = False, f"timeout after {timeout_s:g}s"
    else:
        passed, reason = _verdict(process.returncode, _report(status.decode(errors="replace"), nonce), cpu_s)
    return ExecutionResult(
        passed=passed,
        reason=reason,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        duration_s=time.monotonic() - started,
    )


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
    return bool(live_processes_in_group(pgid))


def live_processes_in_group(pgid: int) -> list[int]:
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


def _report(status: str, nonce: str) -> str | None:
    """The runner's last report ("passed" or "failed REASON"), ignoring lines without the nonce."""
    reports = [line[len(nonce) + 1:] for line in status.splitlines() if line.startswith(f"{nonce} ")]
    return reports[-1] if reports else None


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


# ----- The runner: what runs in the child, as `python -I sandbox.py STATUS_FD LIMITS...` -----


def _child_main(argv: list[str]) -> int:
    """Isolate and limit this process, run program.py in it, and report how it ended (see run_program)."""
    status_fd = int(argv[0])
    memory_bytes, cpu_s, file_bytes, processes = map(int, argv[1:])
    nonce = sys.stdin.readline().strip()
    # A program must not outlive selfcorrect: a run that ends at once on Ctrl-C leaves its last programs.
    die_with_parent(int(os.environ.pop("SELFCORRECT_PARENT_PID")))
    _isolate_network()
    _install_guard(os.path.realpath(os.getcwd()))
    _set_limits(memory_bytes, cpu_s, file_bytes, processes)
    # A fresh __main__ for the program, so `if __name__ == "__main__":` works and the runner's names
    # (the nonce above all) are not among the program's globals.
    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = module
    sys.argv = [PROGRAM_FILE]  # as if run as `python program.py`; unittest.main() parses it
    try:
        source = Path(PROGRAM_FILE).read_text(encoding="utf-8")
        # Tracebacks quote the program as it was given, even if it changes or deletes the file.
        linecache.cache[PROGRAM_FILE] = (len(source), None, source.splitlines(True), PROGRAM_FILE)
        exec(compile(source, PROGRAM_FILE, "exec"), module.__dict__)
    except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt end a program too
        # Report first: after a MemoryError, printing the traceback may itself run out of memory.
        os.write(status_fd, f"{nonce} failed {_describe(error)}\n".encode())
        trace = error.__traceback__.tb_next if error.__traceback__ else None
        traceback.print_exception(type(error), error, trace)
        return 1
    os.write(status_fd, f"{nonce} passed\n".encode())
    return 0


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the parent thread that started it ends, or the parent with it
    (Linux only: elsewhere nothing happens)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(0)


def _isolate_network() -> None:
    """Move into a new network namespace, which has no usable interface, if the OS allows it.

    Root may create one directly; another user may only together with a user namespace. When neither
    is allowed, the guard's refusal to open sockets is all that remains.
    """
    import ctypes

    unshare = getattr(ctypes.CDLL(None, use_errno=True), "unshare", None)
    if unshare is None:
        return
    for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
        if unshare(flags) == 0:
            return


def _set_limits(memory_bytes: int, cpu_s: int, file_bytes: int, processes: int) -> None:
    """Apply the kernel limits. Hard limits too, so the program cannot raise them back.

    The CPU hard limit is one second above the soft one: the soft limit sends SIGXCPU, the hard one
    SIGKILL for a program that catches it.
    """
    for limit, soft, hard in (
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_NPROC, processes, processes),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        _, current_hard = resource.getrlimit(limit)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))


def _install_guard(root: str) -> None:
    """Refuse, from Python, what a test program has no business doing (see the module docstring)."""
    import _posixsubprocess
    import inspect
    import socket

    def refuse(what: str) -> Callable:
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")

        return refused

    for module, names in _REFUSED.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, refuse(f"{module.__name__}.{name}"))
    subprocess.Popen = refuse("starting a process")
    _posixsubprocess.fork_exec = refuse("starting a process")

    class NoSocket(socket.socket):
        """Stays a class, so modules that subclass socket.socket (ssl) still import."""

        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")

    socket.socket = NoSocket

    def check(path, dir_fd: int | None, writing: bool, what: str) -> None:
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        full = os.path.realpath(path)
        if writing and os.path.commonpath([full, root]) != root:
            raise PermissionError(
                f"sandbox: {what}({full!r}) is not allowed: only files in the working directory may be changed"
            )
        parts = full.split(os.sep)
        if parts[1:2] == ["proc"] and len(parts) > 2 and parts[2].isdigit() and int(parts[2]) != os.getpid():
            raise PermissionError(f"sandbox: reading another process's {full} is not allowed")

    def confine(module, name: str, parameters: tuple[str, ...], writing: Callable[[dict], bool]) -> None:
        real = getattr(module, name)
        signature = inspect.signature(real)
        what = name if module is builtins else f"{module.__name__}.{name}"

        def confined(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            for parameter in parameters:
                path = arguments.get(parameter)
                if path is not None and not isinstance(path, int):  # an int is an already open file
                    dir_fd = arguments.get("dir_fd", arguments.get(f"{parameter}_dir_fd"))
                    check(path, dir_fd, writing(arguments), what)
            return real(*args, **kwargs)

        setattr(module, name, confined)

    confine(builtins, "open", ("file",), lambda arguments: any(c in arguments.get("mode", "r") for c in "wax+"))
    io.open = builtins.open
    confine(os, "open", ("path",), lambda arguments: bool(arguments["flags"] & _WRITE_FLAGS))
    for name, parameters in _CHANGES_FILES.items():
        confine(os, name, parameters, lambda arguments: True)


def _describe(error: BaseException) -> str:
    """One line naming the error and the program line it came from, as feedback for the model."""
    line = None
    trace = error.__traceback__
    while trace is not None:  # the innermost frame that is the program's own
        if trace.tb_frame.f_code.co_filename == PROGRAM_FILE:
            line = trace.tb_lineno
        trace = trace.tb_next
    message = str(error)
    if isinstance(error, SyntaxError) and error.filename == PROGRAM_FILE:
        line, message = error.lineno, error.msg
    source = linecache.getline(PROGRAM_FILE, line).strip() if line else ""
    where = f"{type(error).__name__} at line {line}" if line else type(error).__name__
    if isinstance(error, SystemExit):
        code = 0 if error.code is None else int(error.code) if isinstance(error.code, int) else 1
        text = f"exited with code {code}{f' at line {line}' if line else ''} before the tests finished"
    elif isinstance(error, MemoryError):
        text = f"memory limit exceeded ({where}{f': {source}' if source else ''})"
    elif isinstance(error, AssertionError):
        text = f"{where}: {source}{f' ({message})' if message else ''}"
    else:
        text = f"{where}: {message or source}"
    return " ".join(text.split())[:500]


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
