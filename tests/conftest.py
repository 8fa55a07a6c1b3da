"""Shared fixtures: paths to the shared data, the real embedded model (loaded once), a CLI runner,
and a scripted backend for unit tests of the engine's bookkeeping."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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
