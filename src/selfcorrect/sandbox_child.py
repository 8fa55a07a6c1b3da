"""What runs inside the sandbox, as `python -I sandbox_child.py STATUS_FD LIMITS... ISOLATION UID [REQUESTS_FD
REPLIES_FD]`: limit, guard and (when asked) drop this process to an unprivileged user, run program.py, and report
how it ended. Given the two call pipes, it then answers calls of the program's functions (`_serve`): the tests
run in the parent, and what the program returns reaches them as data.

The parent side, and what is enforced by whom, is selfcorrect.sandbox. This file imports only the standard
library: it starts for every program, and under bubblewrap it runs as a user who may read nothing else.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import io
import json
import linecache
import os
import resource
import signal
import subprocess
import sys
import threading
import traceback
import types
from pathlib import Path
from typing import Callable, Iterator

PROGRAM_FILE = "program.py"

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
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PR_SET_NO_NEW_PRIVS = 38


def _child_main(argv: list[str]) -> int:
    """Isolate and limit this process, run program.py in it, and report how it ended (see run_program).

    `argv`: the status pipe, the four limits, "bubblewrap" or "process", the user id to drop to ("-": stay), and
    optionally the pipes of calls to answer once the program has run.
    """
    status_fd = int(argv[0])
    memory_bytes, cpu_s, file_bytes, processes = map(int, argv[1:5])
    isolation, uid = argv[5], argv[6]
    calls = tuple(map(int, argv[7:9])) if len(argv) > 7 else None
    nonce = sys.stdin.readline().strip()
    if uid != "-":
        _drop_privileges(int(uid))
    if isolation == "process":
        # A program must not outlive selfcorrect: a run that ends at once on Ctrl-C leaves its last programs.
        # (bubblewrap's --die-with-parent does this for its sandbox, whose parent pid this one cannot see.)
        die_with_parent(int(os.environ.pop("SELFCORRECT_PARENT_PID")))
        _isolate_network()  # bubblewrap made a network namespace already
    _install_guard(os.path.realpath(os.getcwd()))
    _set_limits(memory_bytes, cpu_s, file_bytes, processes)
    # A fresh __main__ for the program, so `if __name__ == "__main__":` works and the runner's names
    # (the nonce above all) are not among the program's globals.
    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = module
    sys.argv = [PROGRAM_FILE]  # as if run as `python program.py`; unittest.main() parses it
    # Everything above is the sandbox's own setting up: a run without this line never reached the program.
    os.write(status_fd, f"{nonce} running\n".encode())
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
    if calls is not None:
        _serve(module.__dict__, *calls)
    return 0


def _as_data(value, depth: int = 0):
    """`value` with the containers that have no literal form made into ones that do, so honest code that returns
    them still reaches the tests: a Counter or other dict subclass as a dict, a frozenset as a set, an iterator
    or generator (`map(...)`, `(x for x in ...)`) as the list of what it yields, a deque as a list."""
    if depth > 100 or isinstance(value, (str, bytes, int, float, complex, type(None))):
        return value
    if isinstance(value, dict):
        return {_as_data(key, depth + 1): _as_data(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return {_as_data(item, depth + 1) for item in value}
    if isinstance(value, tuple):
        return tuple(_as_data(item, depth + 1) for item in value)
    if isinstance(value, list) or type(value).__name__ == "deque" or isinstance(value, Iterator):
        return [_as_data(item, depth + 1) for item in value]
    return value


# CPython 3.11 keeps the depth count of its AST conversion per interpreter, not per thread: two threads parsing
# at once (the tester threads of concurrent grades) can interleave inside it and fail with "SystemError: AST
# constructor recursion depth mismatch". One parse at a time.
_PARSING = threading.Lock()


def parse(text: str, mode: str = "exec") -> ast.AST:
    """`ast.parse`, one thread at a time (see _PARSING)."""
    with _PARSING:
        return ast.parse(text, mode=mode)


class _Floats(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(float(node.id)) if node.id in ("nan", "inf") else node


def plain_value(text: str):
    """The Python literal `text`, nan and inf included (repr writes them as names): how arguments and return values
    cross between the tests and the program, both ways."""
    return ast.literal_eval(_Floats().visit(parse(text, mode="eval")))


def _serve(namespace: dict, requests_fd: int, replies_fd: int) -> None:
    """Answer calls until the parent closes the request pipe: each request is a line [name, repr((args,
    kwargs))], each reply a line {"value": repr(what the call returned)} or {"raised": what it raised}. Only the
    text crosses: the parent reads the value back as a Python literal, so what the program returns reaches the
    tests as plain data, never as an object of the program's (one that equals anything, say). Nothing here
    decides a verdict: the program can write to these pipes itself, and all it can send is data."""
    with os.fdopen(requests_fd, "rb") as requests:
        for line in requests:
            try:
                name, arguments = json.loads(line)
                args, kwargs = plain_value(arguments)
                if name not in namespace:
                    raise NameError(f"name '{name}' is not defined")
                reply = {"value": repr(_as_data(namespace[name](*args, **kwargs)))}
            except BaseException as error:  # noqa: BLE001 - SystemExit too: the call did not return
                reply = {"raised": _describe(error), "type": type(error).__name__}
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(replies_fd, data):]


def _drop_privileges(uid: int) -> None:
    """Become user and group `uid` with no supplementary groups and no capabilities, for good.

    Runs as root inside bubblewrap's namespaces (see selfcorrect.isolation). Once no user id is 0 the kernel
    clears every capability; no_new_privs stops a setuid program (su, mount) from giving root back.
    """
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


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


def innermost_line(error: BaseException, filename: str) -> int | None:
    """The line of `filename` in the innermost frame of `error`'s traceback that runs that file's code."""
    line = None
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == filename:
            line = trace.tb_lineno
        trace = trace.tb_next
    return line


def one_line(text: str) -> str:
    """`text` as one line of at most 500 characters: a grade's reason."""
    return " ".join(text.split())[:500]


def _describe(error: BaseException) -> str:
    """One line naming the error and the program line it came from, as feedback for the model."""
    line = innermost_line(error, PROGRAM_FILE)
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
    return one_line(text)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
