"""Benchmark: does a run keep N requests in flight against an HTTP model, and does the adaptive limit spare a
rate-limited server? Real runs through `selfcorrect.evaluate` (arithmetic, first answer + one reask, a
fresh store, no response cache) against the mock OpenAI-compatible server of bench/mock_server.py, which
answers after 1 s plus up to 50 ms of jitter, in a process of its own.

1. For N = 8, 64 and 256 (`--concurrency N`), a run of `--waves` x N conversations: turns stored per
   second against the ideal N / latency. `http_efficiency_N` is their ratio in the steady state, over the
   middle half of the run's turns (from the turn stored at 25% of them to the one at 75%), what a long run
   gets; below 1 is what the harness's own scheduling, grading and storing cost, and the jitter (2.5% on
   average here). `http_run_efficiency_N` is the ratio over the whole run, from the start of its turns to
   the last one stored, so it also pays the run's start (its grading processes start while the first
   replies are awaited) and its tail (the last conversations end one by one).
2. Against a mock that answers at most 32 requests at once (429 with Retry-After: 1 s beyond), a run at
   N = 256 with the adaptive limit and one with a fixed limit: the share of requests that got 429.

    python bench/bench_http.py [--waves W]

The last lines have the form `name: value`.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

from mock_server import MockServer

from selfcorrect import evaluate
from selfcorrect.models.openai_http import OpenAIBackend

LATENCY_S = 1.0
CAPACITY = 32
RETRIES = 100  # at a fixed limit of 256 against a capacity of 32 a request may meet many 429s; none may fail


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed_run(url: str, conversations: int, db: Path, **model) -> tuple[float, list[float]]:
    """(when the run's turns started, when each turn was stored); `model` is the `concurrency` of the model
    evaluate loads, or the `backend` to use."""
    started, stored = [], []
    run = evaluate(
        task="arithmetic", task_options={"n": str(conversations), "digits": "3"}, model=f"openai:mock@{url}/v1",
        rounds=1, cache=False, db=db, **model,
        on_start=lambda run_id, total, done: started.append(time.perf_counter()),
        on_turn=lambda: stored.append(time.perf_counter()),
    )
    assert run.report()["complete"] and len(stored) == 2 * conversations, "the run did not finish every item"
    return started[0], stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=8, help="conversations per run, in multiples of N")
    args = parser.parse_args()

    lines = [f"cpu: {cpu_model()}"]
    with tempfile.TemporaryDirectory() as tmp:
        with MockServer(latency=LATENCY_S) as server:
            for n in (8, 64, 256):
                start, stored = timed_run(server.url, args.waves * n, Path(tmp) / f"n{n}.sqlite", concurrency=n)
                ideal = n / LATENCY_S
                quarter = len(stored) // 4
                steady = (len(stored) - 2 * quarter) / (stored[-quarter - 1] - stored[quarter])
                whole = len(stored) / (stored[-1] - start)
                print(f"N={n}: {len(stored)} turns in {stored[-1] - start:.2f} s; turns/s {steady:.1f} in the steady "
                      f"state, {whole:.1f} over the run; ideal {ideal:.0f}", flush=True)
                lines.append(f"http_efficiency_{n}: {steady / ideal:.3f}")
                lines.append(f"http_run_efficiency_{n}: {whole / ideal:.3f}")
        for adaptive in (True, False):
            with MockServer(latency=LATENCY_S, capacity=CAPACITY, retry_after=1.0) as server:
                backend = OpenAIBackend("mock", f"{server.url}/v1", max_in_flight=256, adaptive=adaptive,
                                        max_retries=RETRIES)
                name = "adaptive" if adaptive else "fixed"
                start, stored = timed_run(server.url, 2 * 256, Path(tmp) / f"{name}.sqlite", backend=backend)
                statuses = [request["status"] for request in server.stats()["requests"]]
                share = statuses.count(429) / len(statuses)
                print(f"capacity {CAPACITY}, N=256, {name} limit: {len(stored)} turns in {stored[-1] - start:.1f} s, "
                      f"{len(statuses)} requests, {statuses.count(429)} answered 429", flush=True)
                lines.append(f"http_429_share_{name}: {share:.3f}")
    lines.append(f"peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
