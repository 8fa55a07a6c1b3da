"""Attacks that only a kernel boundary stops: libc called through ctypes, around the Python guard. Under
bubblewrap none of them reaches the host, which each test checks from the host's side (the file is not
there, the process is alive, the listener accepted nothing). Where an attack is safe to let through, a
control runs it in the process-only sandbox and sees it succeed: the attack is real, the boundary stops it.

Also: how the isolation mode is found, refused and recorded (trial run, strict, fallback, the report line).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from selfcorrect import isolation, sandbox
from selfcorrect.isolation import IsolationUnavailable
from selfcorrect.sandbox import run_program

from conftest import REPO, cli, need_bubblewrap, run_cli, sandbox_processes

LIBC = "import ctypes, ctypes.util, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def inside_bubblewrap(program: str, **limits):
    need_bubblewrap()
    return run_program(program, mode="strict", **{"timeout_s": 5, **limits})


def process_only(program: str, **limits):
    return run_program(program, mode="process", **{"timeout_s": 5, **limits})


def libc_write(path: Path) -> str:
    """A program that creates `path` and writes to it with libc's open() and write(), as root could anywhere."""
    return LIBC + (
        f"fd = libc.open({str(path).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "print('open', fd, ctypes.get_errno())\n"
        "if fd >= 0:\n"
        "    libc.write(fd, b'pwned', 5)\n"
        "    libc.close(fd)\n"
    )


@pytest.fixture
def outside_paths(tmp_path):
    """Places outside the working directory: the host's /tmp, a test directory under /tmp, /var/tmp (which any
    user may write to, so only a read-only root keeps the program out), and a directory of the repository; none
    exists before the attack."""
    token = secrets.token_hex(4)
    paths = [Path("/tmp") / f"selfcorrect-attack-{token}", tmp_path / "pwned.txt",
             Path("/var/tmp") / f"selfcorrect-attack-{token}", REPO / "tests" / f"attack-{token}"]
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_libc_writes_outside_the_working_directory_do_not_reach_the_host(outside_paths):
    for path in outside_paths:
        result = inside_bubblewrap(libc_write(path))
        assert result.isolation == "bubblewrap"
        assert not path.exists(), f"the sandboxed program wrote {path} on the host"
        # Under /tmp the write lands in the sandbox's private /tmp, thrown away; elsewhere the root is read-only.
        if path.is_relative_to("/var/tmp"):
            assert result.stdout.split() == ["open", "-1", str(errno.EROFS)], result.stdout
        elif not path.is_relative_to("/tmp"):
            assert result.stdout.startswith("open -1"), result.stdout


def test_control_libc_writes_reach_the_host_without_the_boundary(outside_paths):
    result = process_only(libc_write(outside_paths[0]))
    assert result.passed and outside_paths[0].read_text() == "pwned"


def _peak_of_sandbox_processes(stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], len(sandbox_processes(bubblewrap=False)))
        time.sleep(0.02)


def test_forking_past_the_limit_is_stopped_by_the_kernel():
    """A fork bomb through libc (the guard never sees it): run by root, the program runs as an unprivileged
    user, so the kernel's process limit holds; counted from the host while it runs."""
    limit = 12
    program = LIBC + (
        "children = 0\n"
        "for _ in range(200):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        libc.pause()\n"
        "        libc._exit(0)\n"
        "    if pid < 0:\n"
        "        break\n"
        "    children += 1\n"
        "print(children, ctypes.get_errno(), flush=True)\n"
        "import time\n"
        "time.sleep(1)\n"  # the host counts the processes meanwhile
    )
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=_peak_of_sandbox_processes, args=(stop, peak))
    watcher.start()
    try:
        result = inside_bubblewrap(program, max_processes=limit)
    finally:
        stop.set()
        watcher.join()
    children, errno = map(int, result.stdout.split())
    assert result.passed, result.reason
    assert children < limit and errno == 11  # EAGAIN: RLIMIT_NPROC
    assert 1 < peak[0] <= limit
    assert sandbox_processes() == []


def test_signals_do_not_reach_host_processes():
    """The program sends SIGKILL to a host process, to the test's own process, and to every process it may
    (kill(-1)): inside its PID namespace none of them is in reach."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        program = LIBC + (
            f"print(libc.kill({victim.pid}, 9), libc.kill({os.getpid()}, 9), libc.kill(os.getppid(), 9), flush=True)\n"
            "libc.kill(-1, 9)\n"
        )
        result = inside_bubblewrap(program)
        time.sleep(0.2)
        assert victim.poll() is None, "the host process was killed"
        # Neither pid exists in the program's PID namespace (the third, its parent there, is bubblewrap's init,
        # which ignores signals from inside, whatever kill() returns).
        assert result.stdout.split()[:2] == ["-1", "-1"]
    finally:
        victim.kill()
        victim.wait()


def test_control_signals_reach_host_processes_without_the_boundary():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result = process_only(LIBC + f"print(libc.kill({victim.pid}, {int(signal.SIGKILL)}))\n")
        assert result.stdout.split() == ["0"]
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


def _libc_connect(family: str, address: str) -> str:
    """A program that opens a socket and connects it with libc calls only, and prints connect()'s result."""
    if family == "tcp":
        host, port = address.rsplit(":", 1)
        build = (
            "class Address(ctypes.Structure):\n"
            "    _fields_ = [('family', ctypes.c_ushort), ('port', ctypes.c_uint16), ('addr', ctypes.c_uint32),"
            " ('zero', ctypes.c_char * 8)]\n"
            f"import socket\naddress = Address(socket.AF_INET, socket.htons({port}),"
            f" int.from_bytes(socket.inet_aton({host!r}), 'little'))\n"
            "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        )
    else:
        build = (
            "class Address(ctypes.Structure):\n"
            "    _fields_ = [('family', ctypes.c_ushort), ('path', ctypes.c_char * 108)]\n"
            f"import socket\naddress = Address(socket.AF_UNIX, {address.encode()!r})\n"
            "fd = libc.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)\n"
        )
    return LIBC + build + (
        "result = libc.connect(fd, ctypes.byref(address), ctypes.sizeof(address))\n"
        "print('connect', result, ctypes.get_errno(), flush=True)\n"
        "import time\ntime.sleep(0.3)\n"
    )


def _accepted(server: socket.socket) -> bool:
    server.settimeout(0.5)
    try:
        connection, _ = server.accept()
    except (TimeoutError, BlockingIOError):
        return False
    connection.close()
    return True


def _host_addresses() -> list[str]:
    """127.0.0.1 and this machine's own outward address, if it has one."""
    addresses = ["127.0.0.1"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            addresses.append(probe.getsockname()[0])
        except OSError:
            pass
    return addresses


@pytest.mark.parametrize("where", ["loopback", "outward"])
def test_a_tcp_connection_does_not_reach_the_host(where):
    addresses = _host_addresses()
    if where == "outward" and len(addresses) < 2:
        pytest.skip("this machine has no outward address")
    host = addresses[0 if where == "loopback" else 1]
    with socket.create_server((host, 0)) as server:
        result = inside_bubblewrap(_libc_connect("tcp", f"{host}:{server.getsockname()[1]}"))
        assert result.stdout.startswith("connect -1"), result.stdout
        assert not _accepted(server), "the sandboxed program connected to a host server"


@pytest.fixture
def host_unix_socket():
    """A Unix socket listening under the host's /run, as a daemon's would (docker.sock, dbus)."""
    path = Path("/run") / f"selfcorrect-attack-{secrets.token_hex(4)}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    except OSError as error:
        server.close()
        pytest.skip(f"cannot listen under /run here: {error}")
    os.chmod(path, 0o777)  # any user may connect: only the boundary may keep the program out
    server.listen()
    yield path, server
    server.close()
    path.unlink(missing_ok=True)


def test_a_host_unix_socket_under_run_is_out_of_reach(host_unix_socket):
    path, server = host_unix_socket
    result = inside_bubblewrap(_libc_connect("unix", str(path)))
    assert result.stdout.startswith("connect -1"), result.stdout
    assert not _accepted(server), "the sandboxed program connected to a host Unix socket"


def test_control_a_host_unix_socket_is_reached_without_the_boundary(host_unix_socket):
    path, server = host_unix_socket
    result = process_only(_libc_connect("unix", str(path)))
    assert result.stdout.startswith("connect 0"), result.stdout
    assert _accepted(server)


def test_the_program_holds_no_privilege():
    """Run by root, the program runs as another user, with no capability, and no setuid binary can give root
    back (no_new_privs)."""
    result = inside_bubblewrap("status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
                               "print(status['Uid'].split()[0], int(status['CapEff'], 16), status['NoNewPrivs'].strip())\n")
    uid, capabilities, no_new_privs = result.stdout.split()
    assert capabilities == "0" and no_new_privs == "1"
    assert uid != "0" and (int(uid) == os.geteuid() or os.geteuid() == 0)


# ----- Finding, refusing and recording the boundary -----


@pytest.fixture
def without_bubblewrap(monkeypatch, tmp_path):
    """A PATH on which bwrap is not found, and the trial run forgotten before and after."""
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox.bubblewrap_problem.cache_clear()
    yield
    sandbox.bubblewrap_problem.cache_clear()


def test_without_bubblewrap_auto_falls_back_and_strict_refuses(without_bubblewrap):
    assert "not installed" in sandbox.bubblewrap_problem()
    assert run_program("assert True\n", mode="auto").isolation == "process only"
    with pytest.raises(IsolationUnavailable, match="--isolation strict: bubblewrap is not installed"):
        run_program("assert True\n", mode="strict")
    with isolation.using("strict"), pytest.raises(IsolationUnavailable):
        run_program("assert True\n")


def test_bubblewrap_that_cannot_make_namespaces_fails_its_trial(monkeypatch, tmp_path):
    """bwrap on the PATH is not enough: one that the kernel refuses (a container without namespaces) is found
    out by the trial run. This bwrap fails the way a refused one does."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox.bubblewrap_problem.cache_clear()
    try:
        problem = sandbox.bubblewrap_problem()
        assert problem is not None and "No permissions to create new namespace" in problem
        assert run_program("assert True\n").isolation == "process only"
    finally:
        sandbox.bubblewrap_problem.cache_clear()


HUMANEVAL_0 = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\n"


def test_grade_refuses_strict_without_bubblewrap_and_records_the_boundary(tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text(HUMANEVAL_0)
    args = ["grade", "--task", "humaneval", "--item", "HumanEval/0", "--response", str(reply)]
    # A PATH without bubblewrap, in processes of their own: this one has looked bubblewrap up already.
    refused = run_cli(*args, "--isolation", "strict", env={"PATH": str(tmp_path)})
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--isolation strict: bubblewrap is not installed" in refused.stderr
    fallback = run_cli(*args, env={"PATH": str(tmp_path)})
    assert fallback.returncode == 0, fallback.stderr
    assert json.loads(fallback.stdout)["extra"]["isolation"] == "process only"
    need_bubblewrap()
    bounded = cli(*args, "--isolation", "strict")
    assert bounded.returncode == 0, bounded.stderr
    verdict = json.loads(bounded.stdout)
    assert verdict["extra"]["isolation"] == "bubblewrap" and verdict["correct"] is False
    assert cli(*args, "--isolation", "sometimes").returncode == 2


def test_a_task_without_code_is_not_refused_under_strict(without_bubblewrap, tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text("The answer is 5.")
    done = cli("grade", "--task", "arithmetic", "--item", "arith-0", "--response", str(reply), "--isolation", "strict")
    assert done.returncode == 0, done.stderr
    assert "isolation" not in json.loads(done.stdout)["extra"]


@pytest.mark.model
def test_the_boundary_is_recorded_per_grade_not_in_the_run_id(tmp_path):
    """A HumanEval run graded in the process-only sandbox says so in its report; the same command under the
    default mode is the same run (nothing generated again), and regrading it under bubblewrap changes the
    report's line, not the run."""
    need_bubblewrap()
    db = str(tmp_path / "runs.sqlite")
    args = ["run", "--task", "humaneval", "--limit", "2", "--max-tokens", "48", "--db", db]
    first = cli(*args, "--isolation", "process", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["grading"]["isolation"] == {"process only": 4}
    shown = cli("report", report["run_id"], "--db", db)
    assert "isolation: process only (no kernel boundary" in shown.stdout

    again = cli(*args, "--isolation", "strict", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["run_id"] == report["run_id"]
    assert "0 turns generated now" in cli(*args).stdout

    regraded = cli("regrade", report["run_id"], "--all", "--isolation", "strict", "--db", db)
    assert regraded.returncode == 0, regraded.stderr
    shown = cli("report", report["run_id"], "--db", db)
    assert "isolation: bubblewrap" in shown.stdout and "process only" not in shown.stdout
    page = tmp_path / "report.html"
    assert cli("report", report["run_id"], "--db", db, "--html", str(page)).returncode == 0
    assert "isolation: bubblewrap" in page.read_text()
