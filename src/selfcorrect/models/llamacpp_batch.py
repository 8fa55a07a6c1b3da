"""Many conversations decoded as one batch by llama.cpp, each in a sequence slot that keeps its KV cache.

The engine calls `complete` from one worker thread per conversation in flight, and each worker runs its
conversations one after another. Each worker thread owns one sequence slot (its "lane"), so a
conversation's next turn always finds its previous prompt in the slot's KV cache and only what follows
it (the previous reply and the new message) is prefilled; `counters` shows how many prompt tokens were
reused and how many prefilled. One decoding thread runs a loop of `llama_decode` calls, each carrying the
next token of every sequence that is generating plus whole chunks of the prompts still being prefilled.

Replies must not depend on how many conversations share a batch, nor on whether a turn found its
conversation in the cache (after a resume, or when the response cache served the turn before it). In
llama.cpp a token's logits are the same whatever else is in the batch, and the same however a prompt is
cut into prefill chunks, but not the same for a token that was decoded one at a time during generation
(llama.cpp's server documents this for its prompt cache). So a slot keeps only the KV of its previous
*prompt*, and only for a request that extends that prompt (the same conversation, a turn later); the
previous reply and the new message are prefilled again. Measured on the embedded model: 40 of 40
correction turns equal with and without the cached prefix; keeping the decoded reply too, 33 of 40.

Sampling happens here, in numpy, per request with the request's own seed: greedy is the argmax;
otherwise temperature with llama-cpp-python's default top-k 40, top-p 0.95 and min-p 0.05.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


@dataclass
class Request:
    lane: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    future: Future = field(default_factory=Future)
    generated: list[int] = field(default_factory=list)


@dataclass
class Slot:
    seq_id: int
    waiting: deque = field(default_factory=deque)  # requests of this lane not yet admitted
    n_cached: int = 0  # tokens whose KV the slot holds: the next token's position
    last_prompt: list[int] = field(default_factory=list)
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet prefilled
    rng: np.random.Generator | None = None


def sample_token(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> int:
    """Greedy at temperature 0; otherwise top-k, then min-p and top-p on the tempered distribution."""
    if temperature <= 0:
        return int(np.argmax(logits))
    top = np.argpartition(logits, -TOP_K)[-TOP_K:]
    top = top[np.argsort(-logits[top], kind="stable")]
    scaled = logits[top].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    keep = probs >= MIN_P * probs[0]
    keep &= np.concatenate(([True], np.cumsum(probs)[:-1] < TOP_P))
    probs = probs[keep] / probs[keep].sum()
    return int(top[keep][rng.choice(len(probs), p=probs)])


class BatchDecoder:
    """Owns a llama.cpp context with `n_slots` sequences of `slot_ctx` tokens each, and the thread that
    decodes them. `submit(tokens, ...)` returns a Future of (generated tokens)."""

    def __init__(self, model, n_slots: int, slot_ctx: int, n_threads: int, n_batch: int = 1024):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext

        self.llama_cpp = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_slots * slot_ctx
        params.n_seq_max = n_slots
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        # Separate KV buffers per sequence: faster when sequences share little (conversations differ).
        params.kv_unified = False
        # As llama-cpp-python's own contexts: greedy replies then match its create_chat_completion.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = LlamaContext(model=model, params=params, verbose=False)
        self.batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.slot_ctx, self.n_batch = slot_ctx, n_batch
        self.chunk = n_batch - n_slots  # a prompt chunk always fits beside one decoding token per slot
        self.slots = [Slot(seq_id) for seq_id in range(n_slots)]
        self.requests: queue.Queue[Request] = queue.Queue()
        self.lanes = threading.local()  # the slot of the calling thread
        self.next_lane = itertools.count()
        # What the KV reuse saved: prompt tokens found in a slot's cache against those prefilled.
        self.counters = {"requests": 0, "prompt_tokens_reused": 0, "prompt_tokens_prefilled": 0,
                         "completion_tokens": 0, "decode_calls": 0}
        threading.Thread(target=self._loop, name="llamacpp-batch", daemon=True).start()

    def submit(self, prompt: list[int], max_tokens: int, temperature: float, seed: int) -> Future:
        if len(prompt) >= self.slot_ctx:
            raise UserError(
                f"the conversation has {len(prompt)} tokens, more than the model's context of {self.slot_ctx} per "
                "conversation; lower --rounds or --max-tokens"
            )
        if not hasattr(self.lanes, "lane"):  # a thread's first request: give it the next slot, in turn
            self.lanes.lane = next(self.next_lane) % len(self.slots)
        request = Request(self.lanes.lane, prompt, min(max_tokens, self.slot_ctx - len(prompt)), temperature, seed)
        self.requests.put(request)
        return request.future

    # The decoding thread.

    def _loop(self) -> None:
        while True:
            busy = any(slot.request for slot in self.slots)
            try:
                self._take_requests(block=not busy)
                self._step()
            except Exception as error:  # fail every request in flight rather than hang their callers
                for slot in self.slots:
                    if slot.request:
                        slot.request.future.set_exception(error)
                    slot.request, slot.pending, slot.n_cached, slot.last_prompt = None, [], 0, []
                self.llama_cpp.llama_memory_clear(self.context.memory, True)

    def _take_requests(self, block: bool) -> None:
        if block:
            self._queue(self.requests.get())
        while True:
            try:
                self._queue(self.requests.get_nowait())
            except queue.Empty:
                break
        for slot in self.slots:
            if slot.request is None and slot.waiting:
                self._admit(slot, slot.waiting.popleft())

    def _queue(self, request: Request) -> None:
        self.slots[request.lane].waiting.append(request)

    def _admit(self, slot: Slot, request: Request) -> None:
        """Start the request in its lane's slot, keeping the KV of the slot's previous prompt if the request
        continues it (see the module docstring for why not more)."""
        extends = len(request.prompt) > len(slot.last_prompt) and request.prompt[: len(slot.last_prompt)] == slot.last_prompt
        keep = len(slot.last_prompt) if extends else 0
        self.llama_cpp.llama_memory_seq_rm(self.context.memory, slot.seq_id, keep, -1)
        slot.n_cached, slot.pending, slot.request = keep, request.prompt[keep:], request
        slot.last_prompt = request.prompt
        slot.rng = np.random.default_rng(request.seed) if request.temperature > 0 else None
        self.counters["requests"] += 1
        self.counters["prompt_tokens_reused"] += keep
        self.counters["prompt_tokens_prefilled"] += len(slot.pending)

    def _step(self) -> None:
        """One llama_decode: the next token of every generating sequence, then prompt chunks."""
        batch = self.batch.batch
        batch.n_tokens = 0
        wants_logits: list[tuple[Slot, int]] = []

        def add(slot: Slot, token: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, slot.n_cached, 1
            batch.seq_id[i][0], batch.logits[i] = slot.seq_id, logits
            slot.n_cached += 1
            batch.n_tokens += 1
            if logits:
                wants_logits.append((slot, i))

        active = [slot for slot in self.slots if slot.request]
        for slot in active:
            if not slot.pending:
                add(slot, slot.request.generated[-1], True)
        for slot in active:  # a prompt chunk goes in whole, or waits for the next call
            chunk = slot.pending[: self.chunk]
            if chunk and batch.n_tokens + len(chunk) <= self.n_batch:
                del slot.pending[: len(chunk)]
                for k, token in enumerate(chunk):
                    add(slot, token, not slot.pending and k == len(chunk) - 1)
        if batch.n_tokens == 0:
            return
        status = self.llama_cpp.llama_decode(self.context.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self.counters["decode_calls"] += 1
        for slot, i in wants_logits:
            logits = np.ctypeslib.as_array(
                self.llama_cpp.llama_get_logits_ith(self.context.ctx, i), shape=(self.n_vocab,)
            )
            self._extend(slot, sample_token(logits, slot.request.temperature, slot.rng))

    def _extend(self, slot: Slot, token: int) -> None:
        request = slot.request
        finished = self.llama_cpp.llama_vocab_is_eog(self.vocab, token)
        if not finished:
            request.generated.append(token)
            self.counters["completion_tokens"] += 1
        if finished or len(request.generated) >= request.max_tokens:
            slot.request = None
            request.future.set_result(request.generated)
