"""A run killed with SIGKILL at arbitrary moments and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from selfcorrect import load_run

from conftest import cli

ARGS = ["run", "--limit", "16", "--rounds", "2", "--strategy", "critique", "--json"]
TOTAL_TURNS = 16 * 3


def _turn_count(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not written yet
        return 0


def _start_and_kill_after(db, turns: int) -> int:
    """Start the run in a subprocess, SIGKILL it once at least `turns` turns are stored; return the count."""
    process = subprocess.Popen(
        [sys.executable, "-m", "selfcorrect", *ARGS, "--db", str(db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while _turn_count(db) < turns and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return _turn_count(db)


def _as_rows(run):
    return [
        (t.item_id, t.sample, t.round, t.messages, t.response, t.feedback, t.answer, t.correct,
         t.prompt_tokens, t.completion_tokens)
        for t in run.turns
    ]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    reference_db, killed_db = tmp_path / "reference.sqlite", tmp_path / "killed.sqlite"
    reference = cli(*ARGS, "--db", str(reference_db))
    assert reference.returncode == 0, reference.stderr

    first_kill = _start_and_kill_after(killed_db, 8)
    second_kill = _start_and_kill_after(killed_db, first_kill + 15)
    assert 8 <= first_kill < second_kill < TOTAL_TURNS, "the kills must land mid-run"

    resumed = cli(*ARGS, "--db", str(killed_db))
    assert resumed.returncode == 0, resumed.stderr
    resumed_report, reference_report = json.loads(resumed.stdout), json.loads(reference.stdout)
    # The last invocation generated exactly what was missing: nothing lost, nothing duplicated.
    # (A reply cached just before a kill, whose turn was not yet written, comes back from the cache.)
    assert resumed_report["generated"] + resumed_report["cache_hits"] == TOTAL_TURNS - second_kill

    run_id = reference_report["run_id"]
    assert resumed_report["run_id"] == run_id
    assert _as_rows(load_run(run_id, killed_db)) == _as_rows(load_run(run_id, reference_db))
    for key in ("n_items", "acc", "cl", "cs", "rss", "acc_inf", "transitions", "ci", "pairs"):
        assert resumed_report[key] == reference_report[key], key
