"""Many conversations decoded as one batch by llama.cpp, each in a sequence slot that keeps its KV cache.

The engine calls `submit` from one worker thread per conversation in flight, and each worker runs its
conversations one after another. Each worker thread owns one sequence slot (its "lane"), so a
conversation's next turn finds the whole conversation so far, the reply it just generated included, in the
slot's KV cache, and prefills only the new message; `counters` shows how many prompt tokens were reused and
how many computed. One decoding thread runs a loop of `llama_decode` calls, each carrying the next token of
every sequence that is generating plus prompt tokens still to be computed.

A reply must not depend on whether its turn found the conversation in the cache (it does not after a resume,
after another strategy's run served the first turn from the response cache, or when the slot held another
conversation). llama.cpp computes a token slightly differently when it is decoded on its own (one token of
its sequence per call, as during generation) than inside a prefill chunk (its server documents this for
its prompt cache): keeping the decoded reply but prefilling it on a cache miss changed 7 of 40 greedy
correction replies. So every prompt token is computed one canonical way, cached or not: the tokens of an
earlier assistant reply one per call, as they were when generated, and every other token in prefill chunks
cut from the start of its run of such tokens. A token's KV then comes out bit for bit the same whether it
was generated in this slot or replayed after a resume (measured: 0.0 difference in the next logits). And
what else shares a call changes nothing: one token of each of several sequences gives the logits one
sequence alone gives, and a prefill chunk is decoded alone (see `_step`). So replies, sampled ones too,
depend neither on how many conversations are in flight nor on the cache.

Sampling happens here, in numpy, per request with the request's own seed: greedy is the argmax;
otherwise temperature with llama-cpp-python's default top-k 40, top-p 0.95 and min-p 0.05.
"""

from __future__ import annotations

import ctypes
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
    prompt: list[tuple[int, bool]]  # (token, is it part of an earlier reply, computed one per call)
    max_tokens: int  # what fits: the caller's max_tokens, or less when the slot's context is nearly full
    temperature: float
    seed: int
    cut_by_context: bool  # max_tokens was lowered to fit the context
    future: Future = field(default_factory=Future)
    generated: list[int] = field(default_factory=list)


@dataclass
class Slot:
    seq_id: int
    waiting: deque = field(default_factory=deque)  # requests of this lane not yet admitted
    cached: list[tuple[int, bool]] = field(default_factory=list)  # the tokens whose KV the slot holds, as computed
    request: Request | None = None
    pending: list[tuple[int, bool]] = field(default_factory=list)  # prompt tokens not yet computed
    rng: np.random.Generator | None = None


def attach_lora(ctx, adapter) -> None:
    """Apply a loaded LoRA adapter (llama_adapter_lora_init) at full scale in a llama.cpp context."""
    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
        raise RuntimeError("llama.cpp could not attach the LoRA adapter to a context")


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
    decodes them. `submit(prompt, replay, ...)` returns a Future of (the generated tokens, why generation
    ended: "stop", "length" at max_tokens, or "context" when the slot's context ran out first). `lora`: a
    LoRA adapter loaded on `model` (llama_adapter_lora_init), applied in this context at full scale."""

    def __init__(self, model, n_slots: int, slot_ctx: int, n_threads: int, n_batch: int = 1024, lora=None):
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
        # As llama-cpp-python's own contexts: a first turn's greedy reply then matches its create_chat_completion.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = LlamaContext(model=model, params=params, verbose=False)
        if lora is not None:
            attach_lora(self.context.ctx, lora)
        self.batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.slot_ctx, self.n_batch = slot_ctx, n_batch
        self.slots = [Slot(seq_id) for seq_id in range(n_slots)]
        self.requests: queue.Queue[Request] = queue.Queue()
        self.lanes = threading.local()  # the slot of the calling thread
        self.next_lane = itertools.count()
        # What the KV reuse saved: prompt tokens found in a slot's cache against those computed (prefilled,
        # or replayed one per call: earlier replies missing from the cache).
        self.counters = {"requests": 0, "prompt_tokens_reused": 0, "prompt_tokens_prefilled": 0,
                         "prompt_tokens_replayed": 0, "completion_tokens": 0, "decode_calls": 0}
        threading.Thread(target=self._loop, name="llamacpp-batch", daemon=True).start()

    def submit(self, prompt: list[int], replay: list[bool], max_tokens: int, temperature: float, seed: int) -> Future:
        """Generate after `prompt`; `replay[i]` marks prompt tokens of earlier assistant replies."""
        if len(prompt) >= self.slot_ctx:
            raise UserError(
                f"the conversation has {len(prompt)} tokens, more than the model's context of {self.slot_ctx} per "
                "conversation; lower --rounds or --max-tokens"
            )
        if not hasattr(self.lanes, "lane"):  # a thread's first request: give it the next slot, in turn
            self.lanes.lane = next(self.next_lane) % len(self.slots)
        budget = min(max_tokens, self.slot_ctx - len(prompt))
        request = Request(self.lanes.lane, list(zip(prompt, replay)), budget, temperature, seed, budget < max_tokens)
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
                    slot.request, slot.pending, slot.cached = None, [], []
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
        """Start the request in its lane's slot, keeping the KV of the longest prefix the slot holds as the
        request would compute it (see the module docstring)."""
        prompt = request.prompt
        keep = 0
        for held, wanted in zip(slot.cached, prompt[:-1]):  # the last token is computed: its logits are needed
            if held != wanted:
                break
            keep += 1
        # Inside a run of prefill tokens, go back to its start, so its chunks are cut as on a cache miss.
        while 0 < keep and not prompt[keep][1] and not prompt[keep - 1][1]:
            keep -= 1
        self.llama_cpp.llama_memory_seq_rm(self.context.memory, slot.seq_id, keep, -1)
        del slot.cached[keep:]
        slot.pending, slot.request = prompt[keep:], request
        slot.rng = np.random.default_rng(request.seed) if request.temperature > 0 else None
        self.counters["requests"] += 1
        self.counters["prompt_tokens_reused"] += keep
        self.counters["prompt_tokens_prefilled"] += len(slot.pending)
        self.counters["prompt_tokens_replayed"] += sum(replay for _, replay in slot.pending)

    def _step(self) -> None:
        """Two llama_decode calls: one token of every sequence that has one to decode (its next generated
        token, or the next reply token it replays), then one prefill chunk of one sequence, alone. With a
        KV cache per sequence llama.cpp cuts a call into pieces holding equally many tokens of each sequence,
        so a chunk sharing a call with other sequences would be cut by what else is there."""
        active = [slot for slot in self.slots if slot.request]
        singles = [slot for slot in active if not slot.pending or slot.pending[0][1]]
        if singles:
            self._decode([(slot, slot.pending.pop(0) if slot.pending else (slot.request.generated[-1], True))
                          for slot in singles])
        filling = next((slot for slot in active if slot.pending and not slot.pending[0][1]), None)
        if filling:
            run = sum(1 for _ in itertools.takewhile(lambda item: not item[1], filling.pending[: self.n_batch]))
            chunk = filling.pending[:run]
            del filling.pending[:run]
            self._decode([(filling, item) for item in chunk])

    def _decode(self, tokens: list[tuple[Slot, tuple[int, bool]]]) -> None:
        """One llama_decode of (slot, (token, replay)) pairs; then sample for every slot whose prompt is
        done (its last prompt token or its last generated token was among them)."""
        batch = self.batch.batch
        batch.n_tokens = len(tokens)
        wants_logits: list[tuple[Slot, int]] = []
        for i, (slot, item) in enumerate(tokens):
            last = not slot.pending and (i + 1 == len(tokens) or tokens[i + 1][0] is not slot)
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = item[0], len(slot.cached), 1
            batch.seq_id[i][0], batch.logits[i] = slot.seq_id, last
            slot.cached.append(item)
            if last:
                wants_logits.append((slot, i))
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
            reason = "stop" if finished else "context" if request.cut_by_context else "length"
            request.future.set_result((request.generated, reason))
