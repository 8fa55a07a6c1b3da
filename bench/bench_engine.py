"""Benchmark: selfcorrect's engine against llama.cpp's own limit on its workload, and against a naive
transformers loop.

Workload: the embedded SmolLM2-135M (or `--gguf PATH`) on GSM8K questions
(`../shared/data/gsm8k_test.jsonl`, beside the repository), a first answer and one `reask` correction
each, greedy. In one run:

- the engine: `selfcorrect.evaluate`, which also grades every reply and writes every turn to SQLite;
- the limit: how fast llama.cpp itself can do the same work, from two rates measured on the engine's own
  turns, in the engine's own llama.cpp context once the run is over:
  - decode: 16 sequences (the engine's conversations in flight) decoding one token each in every
    llama_decode call, each sequence given its conversation's next turn, or the next conversation, as soon
    as a reply is done, so the batch never shrinks; every turn decodes as many tokens as the engine's reply
    had, after its prompt, so at the KV lengths the engine's turns had; measured until every conversation
    has been decoded in full, sequences starting the workload again meanwhile so that none idles;
  - prefill: the tokens each turn adds to its conversation (the whole prompt for a first answer, the
    correction message after the reply for the next), each after its conversation so far, in llama_decode
    calls of up to the engine's batch size, measured two ways, the faster counting: in big batches (16
    conversations at a time, the first turns' new tokens of all 16 together, then their second turns'),
    and one turn at a time, as the engine prefills;
  the limit is the time the workload's completion tokens take at the decode rate: no engine can decode
  them faster with at most 16 sequences per call. Prefill is not added: the engine prefills a turn in the
  same llama_decode calls that decode the other sequences, where it costs much less than alone (adding it
  at its own rate put the limit below what the engine did, 1.08x, in a run on this machine). The prefill
  rate is printed beside it, as what prefilling the new prompt tokens alone would take;
- the naive loop: transformers' `model.generate`, one prompt at a time, as the paper's reference code does
  on a CPU, on `--naive` of the same turns' prompts spread over both rounds (it is slow), with torch's
  default settings in a process of its own.

Rates are completion tokens per second; the ratios are what to compare across machines, and the machine
(CPU model, the instruction sets of the llama.cpp build) is printed with them.

    python bench/bench_engine.py [--items N] [--naive N] [--gguf PATH]

The last lines have the form `name: value`, ending with `engine_vs_limit` and `engine_vs_naive`.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench_sandbox import cpu_model
from naive_hf import naive_generate_loop
from selfcorrect import evaluate
from selfcorrect.models.identity import llama_cpp_build
from selfcorrect.models.llamacpp import LlamaCppBackend
from selfcorrect.models.spec import embedded_model_path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


@dataclass
class Turn:
    prompt: list[int]  # the whole conversation before the reply
    start: int  # the position of its first new token: the earlier prompts and replies come before it
    reply: int  # tokens of the engine's reply

    @property
    def new(self) -> list[int]:
        """The prompt tokens the turn adds to its conversation (the whole prompt for a first answer)."""
        return self.prompt[self.start:]


def conversation_turns(backend: LlamaCppBackend, run) -> list[list[Turn]]:
    """The run's conversations as the limit replays them: each turn's new prompt tokens come after what the
    sequence holds (the earlier prompts and replies), and its reply is as long as the engine's."""
    conversations: dict[str, list[Turn]] = {}
    for turn in sorted(run.turns, key=lambda t: (t.item_id, t.round)):
        turns = conversations.setdefault(turn.item_id, [])
        prompt = backend._prompt_tokens(turn.messages[:-1])
        held = turns[-1].start + len(turns[-1].new) + turns[-1].reply if turns else 0
        # At least one new token: its logits give the reply's first token.
        turns.append(Turn(prompt, min(held, len(prompt) - 1), turn.completion_tokens))
    return list(conversations.values())


def timed_decode(decoder, rows: list[tuple[int, int, int, bool]]) -> float:
    """Seconds of one llama_decode, in `decoder`'s context, of (sequence, token, position, wants logits) rows."""
    batch = decoder.batch.batch
    batch.n_tokens = len(rows)
    for i, (seq, token, position, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.n_seq_id[i] = token, position, seq, 1
        batch.logits[i] = logits
    started = time.perf_counter()
    status = decoder.llama_cpp.llama_decode(decoder.context.ctx, batch)
    elapsed = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"llama_decode failed with status {status}")
    return elapsed


def decode_in_calls(decoder, rows: list[tuple[int, int, int, bool]]) -> float:
    """Seconds of decoding `rows` in calls of up to `decoder`'s batch size."""
    return sum(timed_decode(decoder, rows[cut: cut + decoder.n_batch]) for cut in range(0, len(rows), decoder.n_batch))


def prefill_seconds(decoder, conversations: list[list[Turn]], width: int) -> float:
    """Seconds llama.cpp takes to prefill every turn's new prompt tokens: `width` conversations at a time,
    the new tokens of one turn of each together in calls of up to `decoder`'s batch size, at their
    positions; before a turn, its conversation's previous reply is put in the sequence (untimed), so the new
    tokens attend to the whole conversation, as in the engine."""
    llama_cpp, memory = decoder.llama_cpp, decoder.context.memory
    seconds = 0.0
    for first in range(0, len(conversations), width):
        wave = conversations[first: first + width]
        llama_cpp.llama_memory_clear(memory, True)
        held = [0] * len(wave)
        for round_ in range(max(len(turns) for turns in wave)):
            replies, news = [], []
            for seq, turns in enumerate(wave):
                if round_ >= len(turns):
                    continue
                turn = turns[round_]
                llama_cpp.llama_memory_seq_rm(memory, seq, min(held[seq], turn.start), -1)
                replies += [(seq, token, position, False)
                            for position, token in enumerate(turn.prompt[held[seq]: turn.start], held[seq])]
                news += [(seq, token, position, position == len(turn.prompt) - 1)
                         for position, token in enumerate(turn.new, turn.start)]
                held[seq] = len(turn.prompt)
            decode_in_calls(decoder, replies)
            seconds += decode_in_calls(decoder, news)
    return seconds


@dataclass
class Decoding:
    tokens: int = 0
    seconds: float = 0.0
    kv_sum: int = 0  # the KV length before every decoded token, summed: their mean is the context decoded at


def measure_decoding(decoder, conversations: list[list[Turn]]) -> Decoding:
    """llama.cpp decoding `conversations` with every sequence of `decoder`'s context in every call (see the
    module docstring). A sequence whose conversation is done takes the next one, from the start of the
    workload again once all have started, until every conversation has been decoded in full: so the batch
    never shrinks and every turn of the workload is decoded at its positions (the repeats add shorter
    ones). Only the decoding calls are timed; tokens are greedy, so the sequences hold what the engine's
    did."""
    if not any(turn.reply for turns in conversations for turn in turns):
        raise RuntimeError("the workload has no completion tokens to decode")
    llama_cpp, context = decoder.llama_cpp, decoder.context
    width = len(decoder.slots)
    order = itertools.cycle(range(len(conversations)))
    unfinished = set(range(len(conversations)))
    current: list[int | None] = [None] * width  # the conversation in each sequence
    turns_left: list[deque[Turn]] = [deque() for _ in range(width)]
    position, left, token = [0] * width, [0] * width, [0] * width
    decoding = Decoding()
    llama_cpp.llama_memory_clear(context.memory, True)

    def greedy(row: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, row),
                                                   shape=(decoder.n_vocab,))))

    def start_turn(seq: int) -> None:
        """Prefill (untimed), in sequence `seq`, its conversation's next turn with a reply, else the next
        conversation's."""
        while True:
            if not turns_left[seq]:
                unfinished.discard(current[seq])
                current[seq] = next(order)
                turns_left[seq] = deque(conversations[current[seq]])
            turn = turns_left[seq].popleft()
            llama_cpp.llama_memory_seq_rm(context.memory, seq, turn.start, -1)
            decode_in_calls(decoder, [(seq, tok, pos, pos == len(turn.prompt) - 1)
                                      for pos, tok in enumerate(turn.new, turn.start)])
            position[seq], left[seq], token[seq] = len(turn.prompt), turn.reply, greedy(-1)  # -1: the last logits
            if turn.reply:
                return

    for seq in range(width):
        start_turn(seq)
    while unfinished:
        decoding.seconds += timed_decode(decoder, [(seq, token[seq], position[seq], True) for seq in range(width)])
        decoding.tokens += width
        decoding.kv_sum += sum(position)
        token[:] = [greedy(seq) for seq in range(width)]  # before a prefill overwrites the logits
        for seq in range(width):
            position[seq], left[seq] = position[seq] + 1, left[seq] - 1
            if not left[seq]:
                start_turn(seq)
    return decoding


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

    conversations = conversation_turns(backend, run)
    new_prompt_tokens = sum(len(turn.new) for turns in conversations for turn in turns)
    # In the engine's own context (same parameters, its KV memory already allocated), idle now that every
    # request of the run has been answered.
    # Big batches of 16 conversations, or each turn alone as the engine prefills: the limit takes the faster.
    prefill_rates = {width: new_prompt_tokens / prefill_seconds(backend.decoder, conversations, width)
                     for width in (len(backend.decoder.slots), 1)}
    prefill_rate = max(prefill_rates.values())
    decoding = measure_decoding(backend.decoder, conversations)
    decode_rate = decoding.tokens / decoding.seconds
    limit_s = engine_tokens / decode_rate  # prefill is not added: see the module docstring
    # The KV length before each completion token of the workload (its position), summed.
    workload_kv_sum = sum(turn.reply * len(turn.prompt) + turn.reply * (turn.reply - 1) // 2
                          for turns in conversations for turn in turns)

    by_round = [[turn.messages[:-1] for turn in run.turns if turn.round == r] for r in (0, 1)]
    naive_prompts = by_round[0][: args.naive // 2] + by_round[1][: args.naive - args.naive // 2]
    # In a process of its own: torch and llama.cpp would share one OpenMP runtime, torch's, in which
    # llama.cpp decodes about 15% slower, and each engine is measured as it runs alone.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        naive_tokens, naive_s = pool.apply(naive_generate_loop, (gguf, naive_prompts, run.config["max_tokens"]))

    engine_rate, limit_rate, naive_rate = engine_tokens / engine_s, engine_tokens / limit_s, naive_tokens / naive_s
    print(f"workload: {args.items} GSM8K items x 2 rounds (reask), {gguf.name}, greedy")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    print(f"llama.cpp build: {llama_cpp_build()}")
    print(f"turns: {len(run.turns)}")
    print(f"completion_tokens: {engine_tokens}")
    print(f"prompt_tokens_new: {new_prompt_tokens}  (what the turns add to their conversations)")
    print(f"prompt_tokens_reused: {counters['prompt_tokens_reused']}")
    print(f"prompt_tokens_prefilled: {counters['prompt_tokens_prefilled']}")
    print(f"prompt_tokens_replayed: {counters['prompt_tokens_replayed']}")
    print(f"decode_tokens_per_s: {decode_rate:.1f}  ({len(backend.decoder.slots)} sequences in every call, "
          f"{decoding.tokens} tokens at a mean KV length of {decoding.kv_sum / decoding.tokens:.0f}; "
          f"the workload's: {workload_kv_sum / engine_tokens:.0f})")
    print(f"prefill_tokens_per_s: {prefill_rate:.1f}  ({len(backend.decoder.slots)} conversations together: "
          f"{prefill_rates[len(backend.decoder.slots)]:.1f}, one turn at a time: {prefill_rates[1]:.1f})")
    print(f"engine_seconds: {engine_s:.1f}")
    print(f"limit_seconds: {limit_s:.1f}  (prefilling the new prompt tokens alone: {new_prompt_tokens / prefill_rate:.1f})")
    print(f"naive_tokens_per_s: {naive_rate:.1f}  ({naive_tokens} tokens, {len(naive_prompts)} prompts)")
    print(f"limit_tokens_per_s: {limit_rate:.1f}")
    print(f"engine_tokens_per_s: {engine_rate:.1f}")
    print(f"engine_vs_limit: {engine_rate / limit_rate:.3f}")
    print(f"engine_vs_naive: {engine_rate / naive_rate:.1f}")


if __name__ == "__main__":
    main()
