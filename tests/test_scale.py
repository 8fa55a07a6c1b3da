"""A 10,000-item run with a scripted model: the engine's memory does not grow with the run, and every
turn is stored once."""

from __future__ import annotations

import sqlite3
import tracemalloc

import pytest

from selfcorrect import evaluate

from test_engine import ConcurrentScriptedBackend


class InstantBackend(ConcurrentScriptedBackend):
    """Answers at once (no sleep) and keeps no call log, which would itself grow with the run."""

    def complete(self, messages, max_tokens, temperature, seed):
        from selfcorrect.models import Completion

        return Completion(self.default_reply(messages, seed), 20, 5)


def _peak_during_run(tmp_path, n_items: int) -> tuple[int, int]:
    """(largest traced memory while turns were being written, turns stored) for a fresh run of n items."""
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, tracemalloc.get_traced_memory()[0])

    db = tmp_path / f"{n_items}.sqlite"
    tracemalloc.start()
    try:
        evaluate(task="arithmetic", task_options={"n": str(n_items), "digits": "3"}, rounds=1, cache=False,
                 backend=InstantBackend(max_in_flight=8), db=db, on_turn=sample)
    finally:
        tracemalloc.stop()
    with sqlite3.connect(db) as connection:
        stored = connection.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    return peak, stored


@pytest.mark.slow
def test_engine_memory_does_not_grow_with_the_run(tmp_path):
    small_peak, small_turns = _peak_during_run(tmp_path, 1_000)
    large_peak, large_turns = _peak_during_run(tmp_path, 10_000)
    assert (small_turns, large_turns) == (2_000, 20_000)
    # Ten times the items may add their own item records (a few hundred bytes each), not turns held in memory.
    assert large_peak - small_peak < 10_000 * 1_000, (small_peak, large_peak)
    assert large_peak < 64 * 2**20
