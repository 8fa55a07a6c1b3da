"""Benchmark: selfcorrect's engine against raw batched llama.cpp and against a naive transformers loop.

Workload: the embedded SmolLM2-135M (or `--gguf PATH`) on GSM8K questions
(`../shared/data/gsm8k_test.jsonl`, beside the repository), a first answer and one `reask` correction
each, greedy. Three ways through it, in one run:

- the engine: `selfcorrect.evaluate`, which also grades every reply and writes every turn to SQLite;
- the ceiling: the same work through a bare loop of llama.cpp calls, 16 conversations at a time: each
  turn prefills the prompt tokens the engine's turn added to its conversation (known in advance) and
  decodes, 16 sequences per llama_decode, as many tokens as the engine's reply had; no scheduling,
  sampling, grading or storing;
- the naive loop: transformers' `model.generate`, one prompt at a time, as the paper's reference code does
  on a CPU, on `--naive` of the same turns' prompts spread over both rounds (it is slow), with torch's
  default settings in a process of its own.

Rates are completion tokens per second; the ratios are what to compare across machines.

    python bench/bench_engine.py [--items N] [--naive N] [--gguf PATH]

The last lines have the form `name: value`, ending with `engine_vs_ceiling` and `engine_vs_naive`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from naive_hf import naive_generate_loop
from selfcorrect import evaluate
from selfcorrect.models.llamacpp import LlamaCppBackend, embedded_model_path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
WAVE = 16  # sequences per batch in the raw loop: the engine's conversations in flight


def raw_batched_decode(backend, conversations: list[list[tuple[list[int], int]]]) -> float:
    """Seconds for llama.cpp alone to run `conversations`, WAVE at a time: each is a list of turns (new prompt
    tokens, reply length); a turn prefills its new tokens after what the sequence holds, then decodes as many
    greedy tokens as the reply had, the wave's sequences one llama_decode per step."""
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
    for first in range(0, len(conversations), WAVE):
        wave = conversations[first: first + WAVE]
        llama_cpp.llama_memory_clear(context.memory, True)
        positions = [0] * len(wave)
        for turn in range(max(len(c) for c in wave)):
            seqs = [seq for seq, c in enumerate(wave) if turn < len(c)]
            batch.reset()
            b = batch.batch
            for seq in seqs:
                for k, token in enumerate(wave[seq][turn][0]):
                    b.token[b.n_tokens], b.pos[b.n_tokens], b.seq_id[b.n_tokens][0] = token, positions[seq] + k, seq
                    b.n_seq_id[b.n_tokens], b.logits[b.n_tokens] = 1, k == len(wave[seq][turn][0]) - 1
                    b.n_tokens += 1
                positions[seq] += len(wave[seq][turn][0])
            llama_cpp.llama_decode(context.ctx, b)
            tokens = dict(zip(seqs, next_tokens(list(np.cumsum([len(wave[seq][turn][0]) for seq in seqs]) - 1))))
            left = {seq: wave[seq][turn][1] - 1 for seq in seqs}
            while any(n > 0 for n in left.values()):
                live = [seq for seq, n in left.items() if n > 0]
                b.n_tokens = len(live)
                for row, seq in enumerate(live):
                    b.token[row], b.pos[row], b.seq_id[row][0], b.n_seq_id[row], b.logits[row] = tokens[seq], positions[seq], seq, 1, True
                    positions[seq] += 1
                    left[seq] -= 1
                llama_cpp.llama_decode(context.ctx, b)
                tokens.update(zip(live, next_tokens(list(range(len(live))))))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--naive", type=int, default=4, help="prompts for the naive transformers loop")
    parser.add_argument("--gguf", type=Path, help="a GGUF model to measure instead of the embedded one")
    args = parser.parse_args()

    gguf = args.gguf or embedded_model_path()
    backend = LlamaCppBackend(gguf)
    backend.complete([{"role": "user", "content": "Hello"}], 8, 0.0, 0)  # warm up: first-call allocations

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = evaluate(task="gsm8k", data=GSM8K, limit=args.items, rounds=1, backend=backend, cache=False,
                       model=f"llamacpp:{gguf}" if args.gguf else "embedded", db=Path(tmp) / "bench.sqlite")
        engine_s = time.perf_counter() - started
    engine_tokens = sum(t.completion_tokens for t in run.turns)
    counters = backend.decoder.counters

    # Each conversation's turns: the prompt tokens after what the sequence holds (the earlier prompt and all
    # but the last token of the reply, which was sampled but not yet decoded), and the reply's length.
    conversations: dict[str, list[tuple[list[int], int]]] = {}
    for turn in sorted(run.turns, key=lambda t: (t.item_id, t.round)):
        turns = conversations.setdefault(turn.item_id, [])
        held = sum(len(new) + length - 1 for new, length in turns)
        turns.append((backend._prompt_tokens(turn.messages[:-1])[held:], max(turn.completion_tokens, 1)))
    raw_s = raw_batched_decode(backend, list(conversations.values()))
    ceiling_tokens = sum(length for turns in conversations.values() for _, length in turns)

    by_round = [[turn.messages[:-1] for turn in run.turns if turn.round == r] for r in (0, 1)]
    naive_prompts = by_round[0][: args.naive // 2] + by_round[1][: args.naive - args.naive // 2]
    # In a process of its own: torch and llama.cpp would share one OpenMP runtime, torch's, in which
    # llama.cpp decodes about 15% slower, and each engine is measured as it runs alone.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        naive_tokens, naive_s = pool.apply(naive_generate_loop, (gguf, naive_prompts, run.config["max_tokens"]))

    engine_rate, raw_rate, naive_rate = engine_tokens / engine_s, ceiling_tokens / raw_s, naive_tokens / naive_s
    print(f"workload: {args.items} GSM8K items x 2 rounds (reask), {gguf.name}, greedy, {os.cpu_count()} cores")
    print(f"turns: {len(run.turns)}")
    print(f"completion_tokens: {engine_tokens}")
    print(f"prompt_tokens_reused: {counters['prompt_tokens_reused']}")
    print(f"prompt_tokens_prefilled: {counters['prompt_tokens_prefilled']}")
    print(f"prompt_tokens_replayed: {counters['prompt_tokens_replayed']}")
    print(f"engine_tokens_per_s: {engine_rate:.1f}")
    print(f"ceiling_tokens_per_s: {raw_rate:.1f}")
    print(f"naive_tokens_per_s: {naive_rate:.1f}  ({naive_tokens} tokens, {len(naive_prompts)} prompts)")
    print(f"engine_vs_ceiling: {engine_rate / raw_rate:.3f}")
    print(f"engine_vs_naive: {engine_rate / naive_rate:.1f}")


if __name__ == "__main__":
    main()
