"""Benchmark: selfcorrect's engine against a bare llama-cpp-python loop over the same conversations.

Workload: the embedded model on arithmetic items, a first answer and one `reask` correction each
(two rounds), greedy decoding. The engine run also grades and writes every turn to a SQLite store; the
bare loop replays exactly the conversations the engine sent, straight into `create_chat_completion`.
Both figures come from this one run on this machine; the ratio is what to compare across machines.

    python bench/bench_engine.py [--items N]

The last lines have the form `name: value`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selfcorrect import evaluate
from selfcorrect.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    args = parser.parse_args()

    backend = load_model("embedded")
    backend.complete([{"role": "user", "content": "Hello"}], 8, 0.0, 0)  # warm up: first-call allocations

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = evaluate(task="arithmetic", limit=args.items, rounds=1, backend=backend, db=Path(tmp) / "bench.sqlite")
        engine_s = time.perf_counter() - started
    engine_tokens = sum(t.completion_tokens for t in run.turns)

    started = time.perf_counter()
    raw_tokens = 0
    for turn in run.turns:  # a turn's messages end with its reply: send what came before it
        reply = backend.llm.create_chat_completion(
            messages=turn.messages[:-1], max_tokens=run.config["max_tokens"], temperature=0.0, seed=0
        )
        raw_tokens += reply["usage"]["completion_tokens"]
    raw_s = time.perf_counter() - started

    engine_rate, raw_rate = engine_tokens / engine_s, raw_tokens / raw_s
    print(f"workload: {args.items} arithmetic items x 2 rounds (reask), embedded SmolLM2-135M Q4_1, greedy")
    print(f"turns: {len(run.turns)}")
    print(f"engine_completion_tokens: {engine_tokens}")
    print(f"raw_completion_tokens: {raw_tokens}")
    print(f"engine_tokens_per_s: {engine_rate:.1f}")
    print(f"raw_tokens_per_s: {raw_rate:.1f}")
    print(f"engine_vs_raw: {engine_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
