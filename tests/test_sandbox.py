"""The sandbox grades honest programs right and survives hostile ones without harm to the test run, in both
isolation modes: every test runs once with the process-only sandbox and once inside bubblewrap.

Attacks that only a kernel boundary stops are in test_isolation.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from selfcorrect import isolation, sandbox
from selfcorrect.sandbox import run_program

from conftest import need_bubblewrap, sandbox_processes


@pytest.fixture(autouse=True, params=["process", "strict"], ids=["process-only", "bubblewrap"])
def mode(request):
    """The isolation mode of every run_program call in the test ("strict": bubblewrap, or the test skips)."""
    if request.param == "strict":
        need_bubblewrap()
    with isolation.using(request.param):
        yield request.param


def run(program: str, **limits):
    """run_program with limits small enough that a hostile program costs the suite seconds, not minutes."""
    return run_program(program, **{"timeout_s": 3, **limits})


def network_namespaces_allowed() -> bool:
    """Whether this OS lets a process create a network namespace, as the runner tries to."""
    probe = (
        "import ctypes, sys\n"
        "unshare = ctypes.CDLL(None, use_errno=True).unshare\n"
        "sys.exit(0 if unshare(0x40000000) == 0 or unshare(0x50000000) == 0 else 1)\n"
    )
    return subprocess.run([sys.executable, "-I", "-c", probe]).returncode == 0


def test_a_passing_program_passes(mode):
    result = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n")
    assert (result.passed, result.reason) == (True, "passed")
    assert result.duration_s < 3
    assert result.isolation == ("bubblewrap" if mode == "strict" else "process only")


def test_a_failing_assertion_is_named_with_its_line_and_source():
    result = run("def add(a, b):\n    return a + b\n\n\nassert add(2, 3) == 6\n")
    assert not result.passed
    assert result.reason == "AssertionError at line 5: assert add(2, 3) == 6"
    assert 'File "program.py", line 5' in result.stderr


def test_an_assertion_message_is_kept():
    result = run("x = 1\nassert x == 2, f'x is {x}'\n")
    assert result.reason == "AssertionError at line 2: assert x == 2, f'x is {x}' (x is 1)"


def test_an_exception_is_named_at_the_innermost_program_line():
    result = run("def f():\n    return x\n\n\ndef check():\n    assert f() == 1\n\n\ncheck()\n")
    assert not result.passed
    assert result.reason == "NameError at line 2: name 'x' is not defined"


def test_a_syntax_error_is_named_with_its_line():
    result = run("def f(:\n    pass\n")
    assert not result.passed
    assert result.reason.startswith("SyntaxError at line 1:")


def test_an_infinite_loop_times_out():
    result = run("while True:\n    pass\n", timeout_s=2)
    assert (result.passed, result.reason) == (False, "timeout after 2s")
    assert result.duration_s < 4


def test_the_cpu_limit_ends_a_busy_program():
    result = run("while True:\n    pass\n", cpu_s=1, timeout_s=10)
    assert (result.passed, result.reason) == (False, "CPU time limit exceeded (1s)")
    assert result.duration_s < 5


def test_a_fork_bomb_is_refused_and_leaves_no_process():
    result = run("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed
    assert result.reason == "PermissionError at line 3: sandbox: os.fork is not allowed"
    assert sandbox_processes() == []


def test_processes_started_around_the_guard_do_not_outlive_the_run():
    # libc's fork() bypasses the guard; the process group kill must still end every child as soon as
    # the program ends, though they hold the output pipes and would sleep for a minute: not only
    # after the grace period for draining the pipes.
    program = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None)\n"
        "for _ in range(4):\n"
        "    if libc.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        libc._exit(0)\n"
    )
    result = run(program)
    assert (result.passed, result.reason) == (True, "passed")
    assert result.duration_s < sandbox._DRAIN_S
    assert sandbox_processes() == []


@pytest.mark.parametrize(
    "program, line",
    [
        ("x = bytearray(10**10)\n", 1),
        ("x = []\nwhile True:\n    x.append(bytearray(10**6))\n", 3),
    ],
    ids=["one-huge-allocation", "growing-list"],
)
def test_a_memory_bomb_hits_the_memory_limit(program, line):
    result = run(program, memory_mb=256)
    assert not result.passed
    assert result.reason.startswith(f"memory limit exceeded (MemoryError at line {line}:")


@pytest.mark.parametrize(
    "write",
    [
        "open(TARGET, 'w').write('pwned')",
        "import pathlib; pathlib.Path(TARGET).write_text('pwned')",
        "import os; os.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
        "import shutil; shutil.copy('program.py', TARGET)",
        "import os; os.symlink(TARGET, 'link'); open('link', 'w').write('pwned')",
    ],
    ids=["open", "pathlib", "os.open", "shutil.copy", "through-a-symlink"],
)
def test_writing_outside_the_working_directory_is_refused(tmp_path, write):
    target = tmp_path / "pwned.txt"
    result = run(f"TARGET = {str(target)!r}\n{write}\n")
    assert not result.passed
    assert result.reason.startswith("PermissionError at line 2: sandbox:")
    assert "only files in the working directory may be changed" in result.reason
    assert not target.exists()


def test_removing_files_outside_the_working_directory_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run(f"import os\nos.remove({str(victim)!r})\n")
    assert not result.passed
    assert victim.read_text() == "precious"


def test_files_in_the_working_directory_may_be_written_and_it_is_deleted_afterwards():
    program = (
        "import os, shutil, tempfile\n"
        "print(os.getcwd())\n"
        "with open('notes.txt', 'w') as handle:\n"
        "    handle.write('hi')\n"
        "os.makedirs('a/b')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as scratch:\n"
        "    scratch.write(b'x')\n"
        "assert open('notes.txt').read() == 'hi'\n"
    )
    result = run(program)
    assert (result.passed, result.reason) == (True, "passed")
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("selfcorrect-sandbox-")
    assert not os.path.exists(workdir)


def test_the_environment_is_clean(monkeypatch):
    monkeypatch.setenv("SELFCORRECT_SECRET", "hunter2")
    result = run("import os\nassert 'SELFCORRECT_SECRET' not in os.environ\n")
    assert (result.passed, result.reason) == (True, "passed")
    shown = run("import os\nprint(dict(os.environ))\n")
    assert shown.passed
    assert "PATH" in shown.stdout
    assert "hunter2" not in shown.stdout


def test_the_parents_environment_cannot_be_read_through_proc():
    result = run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n")
    assert not result.passed
    assert result.reason.startswith("PermissionError at line 2: sandbox: reading another process's")
    assert result.stdout == ""


@pytest.fixture
def listener():
    """A local TCP server; `accepted()` tells whether any connection reached it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)

    def accepted() -> bool:
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return False
        connection.close()
        return True

    yield server.getsockname()[1], accepted
    server.close()


def test_a_network_connection_is_refused(listener):
    port, accepted = listener
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    assert not result.passed
    assert result.reason == "PermissionError at line 2: sandbox: network access is not allowed"
    assert not accepted()


@pytest.mark.skipif(not network_namespaces_allowed(), reason="this OS allows no network namespace")
def test_the_network_namespace_holds_when_the_guard_is_bypassed(listener):
    port, accepted = listener
    result = run(f"import _socket\nconnection = _socket.socket()\nconnection.connect(('127.0.0.1', {port}))\n")
    assert not result.passed
    # The runner's own namespace has no interface up; bubblewrap's has a loopback of its own, where nothing listens.
    assert result.reason in ("OSError at line 3: [Errno 101] Network is unreachable",
                             "ConnectionRefusedError at line 3: [Errno 111] Connection refused")
    assert not accepted()


def test_an_output_flood_is_cut_at_the_cap():
    result = run("while True:\n    print('x' * 10000)\n", max_output_bytes=50_000)
    assert (result.passed, result.reason) == (False, "output limit exceeded (more than 50000 bytes)")
    assert len(result.stdout) == 50_000
    assert result.duration_s < 2


def test_a_stderr_flood_is_cut_at_the_cap():
    result = run("import sys\nwhile True:\n    sys.stderr.write('x' * 10000)\n", max_output_bytes=50_000)
    assert (result.passed, result.reason) == (False, "output limit exceeded (more than 50000 bytes)")
    assert len(result.stderr) == 50_000


@pytest.mark.parametrize(
    "exit_call, reason",
    [
        ("import sys; sys.exit(0)", "exited with code 0 at line 2 before the tests finished"),
        ("exit()", "exited with code 0 at line 2 before the tests finished"),
        ("raise SystemExit", "exited with code 0 at line 2 before the tests finished"),
        ("import os; os._exit(0)", "exited with code 0 before the tests finished"),
        ("import os; os._exit(3)", "exited with code 3 before the tests finished"),
    ],
)
def test_exiting_before_the_tests_finish_is_a_failure(exit_call, reason):
    result = run(f"def add(a, b):\n    {exit_call}\n\nassert add(2, 3) == 6\n")
    assert (result.passed, result.reason) == (False, reason)


def test_unittest_sees_the_program_as_its_own_script():
    program = (
        "import unittest\n"
        "class T(unittest.TestCase):\n"
        "    def test_add(self):\n"
        "        self.assertEqual(2 + 3, 5)\n"
        "result = unittest.main(exit=False).result\n"
        "assert result.wasSuccessful() and result.testsRun == 1\n"
    )
    result = run(program)
    assert (result.passed, result.reason) == (True, "passed")


def test_printing_a_pass_signal_does_not_pass():
    result = run("import sys\nprint('passed'); print('passed', file=sys.stderr)\nimport os; os._exit(0)\n")
    assert not result.passed


def test_a_program_cannot_kill_the_parent():
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert not result.passed
    assert result.reason == "PermissionError at line 2: sandbox: os.kill is not allowed"


def test_a_program_killed_by_a_signal_says_which():
    result = run("import os\nos.abort()\n")
    assert (result.passed, result.reason) == (False, "killed by signal 6 (SIGABRT)")


def test_a_program_with_lots_of_output_under_the_cap_passes():
    result = run("for _ in range(90):\n    print('x' * 999)\nassert True\n", max_output_bytes=100_000)
    assert (result.passed, result.reason) == (True, "passed")
    assert len(result.stdout) == 90_000



def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_program_does_not_outlive_a_parent_that_exits_at_once(mode):
    """Ctrl-C ends a run with os._exit while programs may still run in worker threads: they must go too."""
    parent = subprocess.run([sys.executable, "-c", (
        "import os, threading, time\n"
        "from selfcorrect.sandbox import run_program\n"
        "threading.Thread(target=run_program, args=('import time\\ntime.sleep(60)\\n',),"
        f" kwargs={{'timeout_s': 60, 'mode': {mode!r}}}, daemon=True).start()\n"
        "time.sleep(3)\n"
        "mine = [p for p in os.listdir('/proc') if p.isdigit()"
        " and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == str(os.getpid())]\n"
        "print(' '.join(mine), flush=True)\n"
        "os._exit(130)\n"
    )], capture_output=True, text=True, timeout=60)
    programs = [int(pid) for pid in parent.stdout.split()]
    assert parent.returncode == 130 and programs, parent.stderr
    deadline = time.monotonic() + 5
    # Orphans are no longer this process's descendants: look for any sandboxed program left on the machine.
    while (any(_alive(pid) for pid in programs) or sandbox_processes(descendants_of=0)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in programs)
    assert sandbox_processes(descendants_of=0) == []
