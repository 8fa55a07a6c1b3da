"""Benchmark: selfcorrect's engine against raw batched llama.cpp and against a naive transformers loop.

Workload: the embedded SmolLM2-135M on GSM8K questions (`../shared/data/gsm8k_test.jsonl`, beside the
repository), a first answer and one `reask` correction each, greedy. Three ways through it, in one run:

- the engine: `selfcorrect.evaluate`, which also grades every reply and writes every turn to SQLite;
- the ceiling: the same prompts (every turn the engine sent, known in advance) through a bare loop of
  llama.cpp calls, 16 sequences decoded per batch, each forced to the length the engine's reply had, with
  no scheduling, grading or storing;
- the naive loop: transformers' `model.generate`, one prompt at a time, as the paper's reference code does
  on a CPU, on `--naive` of the same turns' prompts spread over both rounds (it is slow).

Rates are completion tokens per second; the ratios are what to compare across machines.

    python bench/bench_engine.py [--items N] [--naive N]

The last lines have the form `name: value`, ending with `engine_vs_ceiling` and `engine_vs_naive`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from naive_hf import naive_generate_loop
from selfcorrect import evaluate
from selfcorrect.models import load_model
from selfcorrect.models.llamacpp import embedded_model_path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
WAVE = 16  # sequences per batch in the raw loop: the engine's conversations in flight


def raw_batched_decode(backend, prompts: list[list[int]], lengths: list[int]) -> float:
    """Seconds for llama.cpp alone to prefill `prompts` and decode `lengths[i]` greedy tokens after each,
    WAVE sequences at a time in one llama_decode per step."""
    import llama_cpp
    from llama_cpp._internals import LlamaBatch, LlamaContext

    params = llama_cpp.llama_context_default_params()
    # One llama_decode takes a whole wave's prompts; llama.cpp cuts it into micro-batches itself.
    params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = WAVE * 4096, WAVE, WAVE * 4096, 1024
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    params.kv_unified, params.flash_attn_type = False, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    context = LlamaContext(model=backend.llm._model, params=params, verbose=False)
    batch = LlamaBatch(n_tokens=WAVE * 4096, embd=0, n_seq_max=1, verbose=False)
    n_vocab = backend.llm.n_vocab()

    def next_tokens(rows: list[int]) -> list[int]:
        return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, row), shape=(n_vocab,))))
                for row in rows]

    started = time.perf_counter()
    for first in range(0, len(prompts), WAVE):
        wave = range(first, min(first + WAVE, len(prompts)))
        llama_cpp.llama_memory_clear(context.memory, True)
        batch.reset()
        for seq, i in enumerate(wave):
            batch.add_sequence(prompts[i], seq, False)
        llama_cpp.llama_decode(context.ctx, batch.batch)
        ends = np.cumsum([len(prompts[i]) for i in wave]) - 1
        tokens = next_tokens(list(ends))
        positions = [len(prompts[i]) for i in wave]
        left = [lengths[i] - 1 for i in wave]
        while any(n > 0 for n in left):
            live = [seq for seq, n in enumerate(left) if n > 0]
            b = batch.batch
            b.n_tokens = len(live)
            for row, seq in enumerate(live):
                b.token[row], b.pos[row], b.seq_id[row][0], b.n_seq_id[row], b.logits[row] = tokens[seq], positions[seq], seq, 1, True
                positions[seq] += 1
                left[seq] -= 1
            llama_cpp.llama_decode(context.ctx, b)
            for seq, token in zip(live, next_tokens(list(range(len(live))))):
                tokens[seq] = token
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--naive", type=int, default=4, help="prompts for the naive transformers loop")
    args = parser.parse_args()

    backend = load_model("embedded")
    backend.complete([{"role": "user", "content": "Hello"}], 8, 0.0, 0)  # warm up: first-call allocations

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = evaluate(task="gsm8k", data=GSM8K, limit=args.items, rounds=1, backend=backend, cache=False,
                       db=Path(tmp) / "bench.sqlite")
        engine_s = time.perf_counter() - started
    engine_tokens = sum(t.completion_tokens for t in run.turns)
    counters = backend.decoder.counters

    # Every turn's prompt is its conversation up to the reply; its length is the reply's length.
    prompts = [backend._prompt_tokens(turn.messages[:-1]) for turn in run.turns]
    lengths = [max(turn.completion_tokens, 1) for turn in run.turns]
    raw_s = raw_batched_decode(backend, prompts, lengths)

    by_round = [[turn.messages[:-1] for turn in run.turns if turn.round == r] for r in (0, 1)]
    naive_prompts = by_round[0][: args.naive // 2] + by_round[1][: args.naive - args.naive // 2]
    naive_tokens, naive_s = naive_generate_loop(embedded_model_path(), naive_prompts, run.config["max_tokens"])

    engine_rate, raw_rate, naive_rate = engine_tokens / engine_s, sum(lengths) / raw_s, naive_tokens / naive_s
    print(f"workload: {args.items} GSM8K items x 2 rounds (reask), embedded SmolLM2-135M Q4_1, greedy, {os.cpu_count()} cores")
    print(f"turns: {len(run.turns)}")
    print(f"completion_tokens: {engine_tokens}")
    print(f"prompt_tokens_reused: {counters['prompt_tokens_reused']}")
    print(f"prompt_tokens_prefilled: {counters['prompt_tokens_prefilled']}")
    print(f"engine_tokens_per_s: {engine_rate:.1f}")
    print(f"ceiling_tokens_per_s: {raw_rate:.1f}")
    print(f"naive_tokens_per_s: {naive_rate:.1f}  ({naive_tokens} tokens, {len(naive_prompts)} prompts)")
    print(f"engine_vs_ceiling: {engine_rate / raw_rate:.3f}")
    print(f"engine_vs_naive: {engine_rate / naive_rate:.1f}")


if __name__ == "__main__":
    main()
