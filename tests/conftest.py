"""Shared fixtures: paths to the shared data, the real embedded model (loaded once), the command line in this
process (`cli`) and in a process of its own (`run_cli`), and a scripted backend for unit tests of the engine's
bookkeeping."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import pytest

from selfcorrect.models import Completion

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data beside the repo at {SHARED_DATA}"
    return SHARED_DATA


@functools.cache
def embedded_backend():
    """The real embedded SmolLM2 backend, loaded once for the whole session: each load holds a llama.cpp
    context of 16 slots (over a GB) for as long as the process lives."""
    from selfcorrect.models import load_model

    return load_model("embedded")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2 backend (`embedded_backend`), shared by the whole session."""
    return embedded_backend()


def pytest_sessionfinish(session, exitstatus):
    # Free the session's model while the interpreter is whole: freed at its exit instead, llama-cpp-python's
    # destructor finds its library half torn down and prints a traceback.
    embedded_backend.cache_clear()


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory) -> Path:
    """A real training of the embedded model, a few steps on arithmetic rows, into an adapter directory; shared by
    the tests that only read a trained adapter (test_lora_models, test_rl's starting point)."""
    from selfcorrect.train.trainer import train
    from test_train_lora import sft_rows, write_jsonl

    folder = tmp_path_factory.mktemp("trained")
    data = write_jsonl(folder / "data.jsonl", sft_rows())
    train(data, "embedded", folder / "adapter", max_steps=8, batch_size=4, learning_rate=1e-3, seed=0)
    return folder / "adapter"


@pytest.fixture(scope="session")
def hf_embedded():
    """The embedded GGUF on transformers (`hf:FILE.gguf`, dequantised to float32), loaded once for the session."""
    pytest.importorskip("torch", reason="the hf extra is not installed (pip install torch==2.13.0 'selfcorrect[hf]')")
    from selfcorrect.models import load_model
    from selfcorrect.models.spec import embedded_model_path

    return load_model(f"hf:{embedded_model_path()}")


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
    """Run `python -m selfcorrect ARGS` in a subprocess, as a user would from a shell: for what only a process of
    its own shows (the interpreter's exit code and streams, signals, the package's import). Most tests use `cli`."""
    return subprocess.run(
        [sys.executable, "-m", "selfcorrect", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def _sharing_the_embedded(spec: str, **limits):
    """`load_model`, with the session's embedded model for `embedded` (no HTTP limits asked)."""
    from selfcorrect.models import load_model

    if spec == "embedded" and all(value is None for value in limits.values()):
        return embedded_backend()
    return load_model(spec, **limits)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `selfcorrect ARGS` in this process (Typer's CliRunner), stdout and stderr captured apart, under `env`
    added to the environment: the same commands, checks and output as in a process of its own, without starting
    Python and importing the package for each call (about 0.4 s here). The embedded model is
    the session's (`embedded_backend`) instead of a load per command, unless a test replaced the loader itself.
    An error the command does not turn into its one line is raised here, with its traceback, and fails the test."""
    from typer.testing import CliRunner

    import selfcorrect.api
    import selfcorrect.reproduce
    from selfcorrect.cli import app
    from selfcorrect.models import load_model

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.dict(os.environ, env or {}))
        for module in (selfcorrect.api, selfcorrect.reproduce):
            if module.load_model is load_model:
                patches.enter_context(mock.patch.object(module, "load_model", _sharing_the_embedded))
        result = CliRunner().invoke(app, list(args), prog_name="selfcorrect", catch_exceptions=False)
    return subprocess.CompletedProcess(["selfcorrect", *args], result.exit_code, result.stdout, result.stderr)


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


@functools.cache
def browser_helpers():
    """scripts/screenshot_report.py, which holds the one headless Chromium setup (shared with the README's
    screenshot): `headless_chromium(profile_dir)` and `open_report(driver, page)`."""
    spec = importlib.util.spec_from_file_location("screenshot_report", REPO / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


SERVED_AS = "smollm2"  # the model's name at the llama.cpp server
API_KEY = "test-key-7f3a"


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """URL of a llama.cpp server (without /v1) that serves the embedded model as SERVED_AS to API_KEY, started
    once for every test that talks to it."""
    from selfcorrect.models.spec import embedded_model_path

    port = free_port()
    # One decoding thread: on a 2-core machine shared with other work, two spinning llama.cpp threads
    # slowed to 0.35 tokens/s when the cores were busy, one thread kept about 7.
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--model_alias",
            SERVED_AS, "--api_key", API_KEY, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
            "--n_threads", "1"]
    with serving(argv, port, tmp_path_factory.mktemp("server") / "server.log", API_KEY) as url:
        yield url
