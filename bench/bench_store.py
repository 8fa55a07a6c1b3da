"""Benchmark: is the run store's write path a bottleneck? A 10,000-item run with an instant scripted model.

Two rates in one run: turns per second of the whole engine (conversations in flight, grading, one
writer thread committing each turn in its own transaction) on a model that answers at once, and turns per
second of the store alone (the same turns written again into a fresh store, one transaction each). The
engine on a real model makes a few turns per second; the store takes thousands.

    python bench/bench_store.py [--items N]

The last lines have the form `name: value`.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
from pathlib import Path

from selfcorrect import evaluate
from selfcorrect.models import Completion
from selfcorrect.store import Store


class InstantBackend:
    """Replies at once with an answer drawn from a hash of the conversation."""

    identity = "bench:instant"
    max_in_flight = 8

    def complete(self, messages, max_tokens, temperature, seed):
        digit = hashlib.sha256(f"{messages}{seed}".encode()).digest()[0] % 10
        return Completion(f"The answer is {digit}.", 20, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = evaluate(task="arithmetic", task_options={"n": str(args.items), "digits": "3"}, rounds=1, cache=False,
                       backend=InstantBackend(), db=Path(tmp) / "engine.sqlite")
        engine_s = time.perf_counter() - started

        store = Store(Path(tmp) / "store.sqlite")
        store.create_run("bench", run.config, [])
        started = time.perf_counter()
        for turn in run.turns:
            store.add_turn("bench", turn)
        store_s = time.perf_counter() - started
        store.close()

    turns = len(run.turns)
    print(f"workload: {args.items} arithmetic items x 2 rounds (reask), instant scripted model")
    print(f"turns: {turns}")
    print(f"peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"engine_turns_per_s: {turns / engine_s:.0f}")
    print(f"store_turns_written_per_s: {turns / store_s:.0f}")


if __name__ == "__main__":
    main()
