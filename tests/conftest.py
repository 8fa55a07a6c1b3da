"""Shared fixtures: paths to the shared data, the real embedded model (loaded once), a CLI runner,
and a scripted backend for unit tests of the engine's bookkeeping."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from selfcorrect.models import Completion

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data beside the repo at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2 backend, loaded once for the whole session."""
    from selfcorrect.models import load_model

    return load_model("embedded")


# .ci/run sets this: there, bubblewrap is installed and a test that needs it must fail rather than skip.
REQUIRE_BUBBLEWRAP = os.environ.get("SELFCORRECT_REQUIRE_BUBBLEWRAP") == "1"


def need_bubblewrap() -> None:
    """Skip the calling test where bubblewrap does not work here (fail instead under SELFCORRECT_REQUIRE_BUBBLEWRAP=1)."""
    from selfcorrect.sandbox import bubblewrap_problem

    problem = bubblewrap_problem()
    if problem is not None:
        if REQUIRE_BUBBLEWRAP:
            pytest.fail(f"SELFCORRECT_REQUIRE_BUBBLEWRAP=1 but {problem}")
        pytest.skip(problem)


def sandbox_processes(bubblewrap: bool = True, descendants_of: int | None = None) -> list[int]:
    """Host pids of sandboxed programs (and their forks) still running, seen from this side of any namespace;
    with `bubblewrap`, also the bwrap processes around them; by default only those this process started
    (`descendants_of`: another pid's; 0: anyone's), so that a suite running beside this one is not counted."""
    ancestor = os.getpid() if descendants_of is None else descendants_of
    parents, found = {}, []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline, open(f"/proc/{entry}/stat") as stat:
                command = cmdline.read()
                state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):  # the process ended while being read
            continue
        parents[int(entry)] = int(parent)
        if b"sandbox_child.py" in command and state not in "ZX" and (bubblewrap or b"bwrap" not in command):
            found.append(int(entry))

    def descends(pid: int) -> bool:
        while pid in parents and pid > 1:
            pid = parents[pid]
            if pid == ancestor:
                return True
        return False

    return [pid for pid in found if ancestor == 0 or descends(pid)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m selfcorrect ARGS` in a subprocess, as a user would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "selfcorrect", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


class ScriptedBackend:
    """A test double: replies are a pure function of (messages, seed), and every call is recorded."""

    def __init__(self, reply=None, identity: str = "scripted:v1"):
        # The identity names the script: two different scripts must not share cached replies.
        self.identity = identity
        self.calls: list[tuple[list[dict], int]] = []
        self.reply = reply or self.default_reply

    @staticmethod
    def default_reply(messages: list[dict], seed: int) -> str:
        digest = hashlib.sha256(f"{messages}{seed}".encode()).digest()
        return f"The answer is {digest[0] % 10}."

    def complete(self, messages, max_tokens, temperature, seed):
        self.calls.append(([dict(m) for m in messages], seed))
        text = self.reply(messages, seed)
        return Completion(text=text, prompt_tokens=sum(len(m["content"]) for m in messages), completion_tokens=len(text))


def check_turns(task, run) -> None:
    """What every sampled run's turns must show, whatever the model replied: each stored verdict is the task's
    grade of the stored reply; the first turn asks the task's prompt and ends with the reply it graded; each
    correction continues its item's conversation (its messages begin with the previous turn's), keeps the
    previous reply when its strategy stopped, and stores as feedback the replies before the graded one."""
    from selfcorrect.strategies import get_strategy

    baseline = get_strategy(run.config["strategy"]).baseline
    items = {item.id: item for item in task.items}
    cells = {(turn.item_id, turn.sample, turn.round): turn for turn in run.turns}
    assert len(cells) == len(run.turns), "a cell stored twice"
    for turn in run.turns:
        where = (turn.item_id, turn.sample, turn.round, turn.response)
        grade = task.grade(items[turn.item_id], turn.response)
        assert (turn.answer, turn.correct) == (grade.answer, grade.correct), where
        if turn.round == 0:
            assert turn.messages == [{"role": "user", "content": task.prompt(items[turn.item_id])},
                                     {"role": "assistant", "content": turn.response}], where
            assert turn.feedback == [], where
            continue
        previous = cells[(turn.item_id, turn.sample, turn.round - 1)]
        assert turn.messages[: len(previous.messages)] == previous.messages, where
        replies = [m["content"] for m in turn.messages[len(previous.messages):] if m["role"] == "assistant"]
        if turn.notes.get("stopped"):
            assert turn.response == previous.response and turn.feedback == replies, where
        elif baseline:  # picks among the previous reply and fresh samples, outside the conversation
            assert turn.response in [previous.response, *turn.notes["candidates"]] and turn.feedback == replies, where
        else:
            assert replies and replies[-1] == turn.response and turn.feedback == replies[:-1], where
            assert turn.messages[-1] == {"role": "assistant", "content": turn.response}, where


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(argv: list[str], port: int, log: Path, api_key: str = "none"):
    """A server process started from `argv` (listening on 127.0.0.1:`port`, its output in `log`), once its
    /v1/models answers; yields its URL without /v1 and stops it on exit."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ready = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(ready, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
