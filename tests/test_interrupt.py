"""Ctrl-C and a second process, with real CLI processes against a real (tiny) OpenAI-compatible server.

The server answers the first requests at once and then holds the rest without answering, as a server
that hangs would, while the client's timeout stays at its 300 s default. Ctrl-C must not wait for it:
the run stores its finished turns, exits 130 within 10 s with one line saying how to resume, and the same
command completes it later. While a process runs a run, a second one of the same run stops at once (exit
2, naming the first's pid) and writes nothing, and so does a regrade of the run; other runs of the same
store go on, readers too, and a process killed with SIGKILL leaves nothing that blocks the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfcorrect.engine import INTERRUPT_GRACE_S

from conftest import run_cli

STALL_S = 300  # as long as the client's default timeout: only Ctrl-C can end a held request in time
LIMIT = 12  # items; the backend keeps 8 conversations in flight, so some are always waiting
TURNS = LIMIT * 2  # one correction round
ENV = {"SELFCORRECT_HTTP_TIMEOUT": "300"}  # the default, spelled out: Ctrl-C must not wait for it


class StallingServer:
    """`with StallingServer(answer_first) as server:` an OpenAI-compatible chat server on `server.url`.

    The first `answer_first` POSTs (counted from 0) are answered at once; with `hold_one`, the next one is
    answered only when `server.answer_held` is set; every later POST is held without an answer (for
    STALL_S, or until the server stops) unless `server.answering` is set, which answers new POSTs at once.
    A reply is a pure function of the request, so a rerun asks and gets the same."""

    def __init__(self, answer_first: int, hold_one: bool = False):
        self.answer_first, self.hold_one = answer_first, hold_one
        self.posts = 0
        self.count_lock = threading.Lock()
        self.answering = threading.Event()
        self.answer_held = threading.Event()
        self.held_arrived = threading.Event()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True  # a held request must not keep the test process alive
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> "StallingServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.answer_held.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def completion(body: bytes) -> bytes:
        request = json.loads(body)
        digest = hashlib.sha256(body).digest()
        text = f"{digest[0] % 7} plus {digest[1] % 7} makes it. The answer is {digest[0] % 7 + digest[1] % 7}."
        return json.dumps({
            "id": "chatcmpl-" + digest.hex()[:12], "object": "chat.completion", "created": 0,
            "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": len(text) // 4,
                      "total_tokens": len(body) // 4 + len(text) // 4},
        }).encode()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.count_lock:
                    number = server.posts
                    server.posts += 1
                if server.hold_one and number == server.answer_first:
                    server.held_arrived.set()
                    server.answer_held.wait(STALL_S)
                elif number >= server.answer_first and not server.answering.is_set():
                    server.stopping.wait(STALL_S)
                if server.stopping.is_set():
                    self.close_connection = True
                    return
                answer = server.completion(body)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):  # the client went away meanwhile
                    self.close_connection = True

        return Handler


def _args(server: StallingServer, db, *extra: str) -> list[str]:
    return ["run", "--model", f"openai:m@{server.url}", "--task", "arithmetic", "--limit", str(LIMIT),
            "--db", str(db), "--json", *extra]


def _start(args: list[str]) -> subprocess.Popen:
    # Ctrl-C as a terminal delivers it: a suite started in the background (`pytest &` from a script) has SIGINT
    # ignored, and a child would inherit that and rightly leave it so.
    return subprocess.Popen(
        [sys.executable, "-m", "selfcorrect", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **ENV}, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _read(db, sql: str) -> list[tuple]:
    """Rows of a query, read-only (the run under test owns the file), [] before the schema exists."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _turns(db) -> dict[tuple, tuple]:
    """Every stored turn, whole, by (run, item, sample, round)."""
    return {row[:4]: row for row in _read(db, "SELECT * FROM turns")}


def _wait_for_turns(db, process: subprocess.Popen, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_turns(db)) < count:
        if process.poll() is not None:
            pytest.fail(f"the run ended early ({process.returncode}): {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"only {len(_turns(db))} of {count} turns were stored")
        time.sleep(0.05)


def _interrupt(process: subprocess.Popen, *, again_after: float | None = None,
               meanwhile=lambda: None) -> tuple[float, str]:
    """SIGINT (a second one `again_after` seconds later, if given); (seconds until the process ended,
    its stderr). Fails if it takes more than 10 s."""
    os.kill(process.pid, signal.SIGINT)
    sent = time.monotonic()
    meanwhile()
    if again_after is not None:
        time.sleep(again_after)
        os.kill(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=10 - (time.monotonic() - sent))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the run did not end within 10 s of Ctrl-C")
    return time.monotonic() - sent, stderr


def test_ctrl_c_stores_finished_turns_exits_130_fast_and_the_run_resumes(tmp_path):
    db = tmp_path / "runs.sqlite"
    answered = 5
    with StallingServer(answer_first=answered, hold_one=True) as server:
        process = _start(_args(server, db))
        _wait_for_turns(db, process, answered)
        assert server.held_arrived.wait(60), "the held request never came"
        before = _turns(db)
        assert len(before) == answered

        # The held request is answered a second into the grace: its turn finished, so it must be stored.
        def answer_the_held_one() -> None:
            time.sleep(1.0)
            server.answer_held.set()

        seconds, stderr = _interrupt(process, meanwhile=answer_the_held_one)
        print(f"\nCtrl-C to exit: {seconds:.2f} s")
        assert process.returncode == 130, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "run the same command again to resume" in lines[0], stderr
        assert "Traceback" not in stderr

        after = _turns(db)
        assert len(after) == answered + 1, "the turn that finished during the grace was not stored"
        assert all(after[key] == row for key, row in before.items())
        assert not _read(db, "SELECT * FROM failed_cells"), "an interrupted turn is not a failed one"

        server.answering.set()
        resumed = run_cli(*_args(server, db), env=ENV, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        report = json.loads(resumed.stdout)
        assert report["complete"] and report["generated"] + report["cache_hits"] == TURNS - len(after)

    final = _turns(db)
    assert len(final) == TURNS  # the primary key would refuse a duplicate; none was attempted either
    assert all(final[key] == row for key, row in after.items()), "a turn stored before Ctrl-C changed"


def test_a_second_ctrl_c_during_the_grace_exits_at_once(tmp_path):
    db = tmp_path / "runs.sqlite"
    with StallingServer(answer_first=5) as server:
        process = _start(_args(server, db))
        _wait_for_turns(db, process, 5)
        before = _turns(db)
        seconds, stderr = _interrupt(process, again_after=0.5)
        print(f"\ntwo Ctrl-C to exit: {seconds:.2f} s")
    assert process.returncode == 130, stderr
    assert seconds < INTERRUPT_GRACE_S, "the second Ctrl-C did not cut the grace short"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "resume" in lines[0] and "Traceback" not in stderr, stderr
    assert _turns(db) == before


def test_one_process_per_run_other_runs_and_readers_go_on_and_sigkill_leaves_no_lock(tmp_path):
    db = tmp_path / "runs.sqlite"
    with StallingServer(answer_first=5) as server:
        first = _start(_args(server, db))
        try:
            _wait_for_turns(db, first, 5)  # the first process holds the run, its requests now held
            tables = ("runs", "items", "turns", "response_cache", "failed_cells")
            snapshot = {table: _read(db, f"SELECT * FROM {table}") for table in tables}

            started = time.monotonic()
            second = run_cli(*_args(server, db), env=ENV, timeout=120)
            seconds = time.monotonic() - started
            print(f"\nsecond process refused after {seconds:.2f} s (interpreter start included)")
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0], lines[0]
            assert "run the same command again" in lines[0], lines[0]
            assert {table: _read(db, f"SELECT * FROM {table}") for table in tables} == snapshot

            # Readers are not locked out while the run goes on (processes of their own: a lock fails at the timeout).
            listed = run_cli("runs", "--db", str(db), "--json", timeout=120)
            assert listed.returncode == 0, listed.stderr
            (run_id,) = [row["run_id"] for row in json.loads(listed.stdout)]
            shown = run_cli("report", run_id, "--db", str(db), "--json", timeout=120)
            assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == run_id, shown.stderr

            # A regrade of the run would grade again while the first process adds turns: refused the same way,
            # with a regrade's own way on.
            regraded = run_cli("regrade", run_id, "--db", str(db), timeout=120)
            assert regraded.returncode == 2, regraded.stderr
            assert regraded.stderr == second.stderr.replace(" and run the same command again to resume",
                                                            ", then regrade the run again"), regraded.stderr
            assert {table: _read(db, f"SELECT * FROM {table}") for table in tables} == snapshot

            # Another run of the same store is not blocked (new requests are answered from here on;
            # the first process's stay held).
            server.answering.set()
            other = run_cli(*_args(server, db, "--seed", "1"), env=ENV, timeout=300)
            assert other.returncode == 0, other.stderr
            other_report = json.loads(other.stdout)
            assert other_report["run_id"] != run_id and other_report["complete"]
        finally:
            first.kill()  # SIGKILL: the kernel drops its lock
            first.communicate()
        assert first.returncode == -signal.SIGKILL

        resumed = run_cli(*_args(server, db), env=ENV, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["complete"]
    assert len([key for key in _turns(db) if key[0] == run_id]) == TURNS


def test_run_lock_is_exclusive_per_run_and_released(tmp_path):
    """The lock itself, in one process: a second holder of the same run is refused, another run is not,
    and release lets the next one in and leaves no file behind."""
    from selfcorrect.errors import UserError
    from selfcorrect.store import RunLock, fcntl

    if fcntl is None:
        pytest.skip("runs are not locked without fcntl")
    db = tmp_path / "runs.sqlite"
    with RunLock(db, "aaa"):
        with pytest.raises(UserError, match=f"run aaa is already running in .* \\(pid {os.getpid()} on host "):
            RunLock(db, "aaa")
        with RunLock(db, "bbb"):
            pass
    with RunLock(db, "aaa"):
        pass
    assert not (tmp_path / "runs.sqlite.locks").exists()
    # The refusal says what the holder is doing, and the refused one's own way on.
    with RunLock(db, "aaa", "regrading", "then regrade it"):
        with pytest.raises(UserError, match=r"run aaa is being regraded in .*; wait for it to finish, or stop it and "
                                            "run the same command again to resume$"):
            RunLock(db, "aaa")
    with RunLock(db, "aaa", "deleting"):
        with pytest.raises(UserError, match=r"run aaa is being deleted in .*\); then regrade it$"):
            RunLock(db, "aaa", "regrading", "then regrade it")
