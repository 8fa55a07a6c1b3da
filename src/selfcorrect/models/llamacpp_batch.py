"""Many conversations decoded as one batch by llama.cpp, each in a sequence slot that keeps its KV cache.

The engine calls `complete` from one thread per conversation in flight. Each call becomes a request in a
queue; one decoding thread admits requests into free sequence slots and runs a loop of `llama_decode`
calls, each carrying the next token of every sequence that is generating plus chunks of the prompts still
being prefilled. A request goes to the free slot whose cached tokens share the longest prefix with its
prompt, so a conversation's next turn usually lands on the slot that holds its earlier turns and only the
new tokens are prefilled (`counters` shows how many were reused and how many prefilled).

Sampling happens here, in numpy, per request with the request's own seed: greedy is the argmax;
otherwise temperature with llama-cpp-python's default top-k 40, top-p 0.95 and min-p 0.05. A reply thus
depends only on its prompt, sampling parameters and seed, not on which other requests share the batch
(up to the floating-point differences llama.cpp's batched kernels themselves make).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    future: Future = field(default_factory=Future)
    generated: list[int] = field(default_factory=list)


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV the slot holds, in position order
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet prefilled
    last_used: int = 0
    rng: np.random.Generator | None = None


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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

    def __init__(self, model, n_slots: int, slot_ctx: int, n_threads: int, n_batch: int = 512):
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
        self.slots = [Slot(seq_id) for seq_id in range(n_slots)]
        self.requests: queue.Queue[Request] = queue.Queue()
        self.waiting: list[Request] = []
        self.clock = 0
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
        request = Request(prompt, min(max_tokens, self.slot_ctx - len(prompt)), temperature, seed)
        self.requests.put(request)
        return request.future

    # The decoding thread.

    def _loop(self) -> None:
        while True:
            busy = any(slot.request for slot in self.slots)
            try:
                self._take_requests(block=not busy and not self.waiting)
                self._step()
            except Exception as error:  # fail every request in flight rather than hang their callers
                for slot in self.slots:
                    if slot.request:
                        slot.request.future.set_exception(error)
                    slot.request, slot.pending, slot.cached = None, [], []
                self.llama_cpp.llama_memory_clear(self.context.memory, True)

    def _take_requests(self, block: bool) -> None:
        if block:
            self.waiting.append(self.requests.get())
        while True:
            try:
                self.waiting.append(self.requests.get_nowait())
            except queue.Empty:
                break
        while self.waiting and (free := [slot for slot in self.slots if slot.request is None]):
            self._admit(self.waiting.pop(0), free)

    def _admit(self, request: Request, free: list[Slot]) -> None:
        """Put the request in the free slot that already holds the longest part of its prompt (the least
        recently used among equals), and drop the rest of that slot's cache."""
        slot = max(free, key=lambda s: (shared_prefix(s.cached, request.prompt), -s.last_used))
        # At least the prompt's last token is evaluated again: its logits give the first reply token.
        keep = min(shared_prefix(slot.cached, request.prompt), len(request.prompt) - 1)
        self.llama_cpp.llama_memory_seq_rm(self.context.memory, slot.seq_id, keep, -1)
        slot.cached, slot.pending, slot.request = request.prompt[:keep], request.prompt[keep:], request
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
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, len(slot.cached), 1
            batch.seq_id[i][0], batch.logits[i] = slot.seq_id, logits
            slot.cached.append(token)
            batch.n_tokens += 1
            if logits:
                wants_logits.append((slot, i))

        active = [slot for slot in self.slots if slot.request]
        for slot in active:
            if not slot.pending:
                add(slot, slot.request.generated[-1], True)
        for slot in active:
            while slot.pending and batch.n_tokens < self.n_batch:
                add(slot, slot.pending.pop(0), not slot.pending)
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
            self.clock += 1
            slot.request, slot.last_used = None, self.clock
            request.future.set_result(request.generated)
