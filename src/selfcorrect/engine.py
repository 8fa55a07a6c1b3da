"""Drive conversations through a backend, round by round, writing every graded turn to the store.

The work of a run is a grid of cells (item, sample, round). Each (item, sample) is one conversation: round
0 asks the question, each later round sends the strategy's correction prompts after the previous answer.
Cells already in the store are read back instead of generated, which is all that resuming takes: the
conversation is rebuilt from the stored messages and continues from the first missing round.

Every generation gets a seed derived from the run seed and its cell, so a cell's reply does not depend on
which cells ran before it: a resumed run produces what an uninterrupted one would have, on backends whose
replies do not depend on what shares their batch (the embedded engine by construction; transformers does
not promise it for padded batches, see `models/hf.py`). A turn stores the whole conversation after its
round, so the next round continues from exactly what the model saw.

Conversations run concurrently: as many as the backend can serve at once (`backend.max_in_flight`, 1 if it
does not say) each run in a worker thread, and when one conversation's turn finishes its next turn goes
straight back to the backend, which batches whatever is in flight. Only the calling thread writes turns to
the store, in the order they finish. A request the backend cannot complete (`BackendError`) is recorded as
a failed cell, never graded; the run stops starting new turns and the error reaches the caller.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .errors import UserError
from .models import Backend, Message
from .models.base import BackendError
from .store import Store, Turn
from .strategies import CorrectionRound, Strategy
from .tasks import Item, Task

# Fresh samples of the compute-matched baselines need diversity: at temperature 0 every sample would be
# the first answer again, so they are drawn at this temperature when the run itself is greedy.
BASELINE_TEMPERATURE = 0.7
# The P(True) probe (Kadavath et al., 2022): the model judges a proposed answer in a fresh conversation.
P_TRUE_PROMPT = "Question:\n{question}\n\nProposed answer:\n{answer}\n\nIs the proposed answer correct? Answer True or False."
P_TRUE_PREFIX = "The proposed answer is"


def cell_seed(run_seed: int, item_id: str, sample: int, round_: int, step: int) -> int:
    """A 31-bit seed unique to one generation of one cell."""
    key = f"{run_seed}/{item_id}/{sample}/{round_}/{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & 0x7FFFFFFF


class Dialogue:
    """One conversation being extended: `ask` sends a user message, appends the model's reply, and
    counts tokens. Each reply gets its own seed, so a reply never depends on what ran before it."""

    def __init__(self, backend: Backend, history: list[Message], *, max_tokens: int, temperature: float,
                 seed: Callable[[int], int], critic: Backend | None = None):
        self.backend, self.max_tokens, self.temperature, self.seed = backend, max_tokens, temperature, seed
        self.critic = critic
        self.side_requests = 0  # numbers the seeds of requests outside the main conversation
        self.messages = list(history)
        self.replies: list[str] = []
        self.prompt_tokens = self.completion_tokens = 0
        self.generated_replies = 0  # replies the model produced now, not served from the response cache

    def ask(self, prompt: str) -> str:
        self.messages.append({"role": "user", "content": prompt})
        reply = self.backend.complete(self.messages, self.max_tokens, self.temperature, self.seed(len(self.replies)))
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.generated_replies += not reply.cached
        self.replies.append(reply.text)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply.text

    def ask_critic(self, prompt: str) -> str:
        """A one-message conversation with the critic model; it stays out of the main conversation, but
        its tokens count in the turn's cost."""
        if self.critic is None:
            raise RuntimeError("this round has no critic model")  # the API refuses such runs before they start
        return self._side_request(self.critic, prompt, self.temperature)

    def ask_fresh(self, prompt: str) -> str:
        """A one-message conversation with the model, outside the main one (a verdict on a candidate)."""
        return self._side_request(self.backend, prompt, self.temperature)

    def sample_fresh(self, question: str) -> str:
        """A new answer to the question in a fresh conversation (for the self-consistency and best-of-n
        baselines), sampled even when the run is greedy; its tokens count in the turn's cost."""
        return self._side_request(self.backend, question, self.temperature or BASELINE_TEMPERATURE)

    def p_true(self, question: str, answer: str) -> float | None:
        """The model's probability that `answer` is right, read from its option scores; None when the
        backend cannot score. The scoring prompt's tokens count in the turn's cost."""
        if not (callable(getattr(self.backend, "option_probs", None)) and callable(getattr(self.backend, "count_tokens", None))):
            return None
        messages = [{"role": "user", "content": P_TRUE_PROMPT.format(question=question, answer=answer)}]
        self.prompt_tokens += self.backend.count_tokens(messages, P_TRUE_PREFIX)
        return self.backend.option_probs(messages, P_TRUE_PREFIX, ["True", "False"])[0]

    def tokens_spent(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def _side_request(self, backend: Backend, prompt: str, temperature: float) -> str:
        reply = backend.complete([{"role": "user", "content": prompt}], self.max_tokens, temperature,
                                 self.seed(1000 + self.side_requests))
        self.side_requests += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.generated_replies += not reply.cached
        return reply.text


def play_round(
    task: Task, strategy: Strategy, item: Item, round_: int, dialogue: Dialogue, previous: Turn | None,
    *, budget: int | None = None, examples: str = "",
) -> tuple[str | None, dict]:
    """Run round `round_` on `dialogue`: ask the question (round 0) or let the strategy correct the
    `previous` turn. Returns (the reply to grade, or None if the strategy kept the previous answer; the
    strategy's notes).

    The strategy gets the question as the model saw it, not the item, so it cannot read the gold answer;
    only an oracle strategy is told whether the previous answer was right. `examples` (in-context
    examples of corrections) go before the round's first prompt to the model.
    """
    if round_ == 0:
        return dialogue.ask(task.prompt(item)), {}
    question = task.prompt(item)
    pending_examples = [examples] if examples else []

    def ask(prompt: str) -> str:
        return dialogue.ask(f"{pending_examples.pop()}\n\n{prompt}" if pending_examples else prompt)

    correction = CorrectionRound(
        question=question,
        instruction=task.instruction(item),
        previous_reply=previous.response,
        ask=ask,
        ask_critic=dialogue.ask_critic,
        ask_fresh=dialogue.ask_fresh,
        sample_fresh=lambda: dialogue.sample_fresh(question),
        # The answer as the grader reads it. Extraction never looks at the target, and only the answer
        # (not the verdict) is handed over, so this is gold-free.
        answer_of=lambda reply: task.grade(item, reply).answer,
        p_true=lambda reply: dialogue.p_true(question, reply),
        tokens_spent=dialogue.tokens_spent,
        budget=budget,
        execution_feedback=previous.reason if task.execution_feedback else None,
        previous_correct=previous.correct if strategy.oracle else None,
    )
    return strategy.correct(correction), correction.notes


def run_cells(
    run_id: str,
    task: Task,
    items: list[Item],
    strategy: Strategy,
    backend: Backend,
    store: Store,
    *,
    samples: int,
    rounds: int,
    temperature: float,
    max_tokens: int,
    seed: int,
    critic: Backend | None = None,
    budget: int | None = None,
    examples: Callable[[Item], str] = lambda item: "",
    on_turn: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """Generate and store every missing cell; returns (turns generated, turns served whole from the
    response cache). Raises UserError when the backend failed a request (the failed cell is recorded;
    every finished turn is stored, so the same call resumes).

    Memory does not grow with the run: workers take conversations one at a time from a shared iterator,
    and of the stored turns only their keys are held (a resumed conversation reads back its last turn).
    """
    stored = store.turn_keys(run_id)
    conversations = iter([
        (item, sample) for item in items for sample in range(samples)
        if any((item.id, sample, round_) not in stored for round_ in range(rounds + 1))
    ])
    take_lock = threading.Lock()
    n_workers = max(1, getattr(backend, "max_in_flight", 1))
    # (turn, from_cache), (failed cell, error), or None when a worker ends. Bounded, so workers wait for
    # the writer rather than pile finished turns up in memory.
    finished: queue.Queue = queue.Queue(maxsize=4 * n_workers)
    stop = threading.Event()

    def converse(item: Item, sample: int) -> None:
        previous: Turn | None = None
        for round_ in range(rounds + 1):
            if (item.id, sample, round_) in stored:
                previous = None  # read back only if a later round needs it
                continue
            if stop.is_set():
                return
            if round_ > 0 and previous is None:
                previous = store.turn(run_id, item.id, sample, round_ - 1)
            try:
                turn, from_cache = _generate_turn(
                    task, strategy, backend, item, sample, round_, previous, temperature=temperature,
                    max_tokens=max_tokens, seed=seed, critic=critic, budget=budget,
                    examples=examples(item) if round_ > 0 else "",
                )
            except BackendError as error:
                stop.set()
                finished.put(((item.id, sample, round_), str(error)))
                return
            finished.put((turn, from_cache))
            previous = turn

    def work() -> None:
        try:
            while not stop.is_set():
                with take_lock:
                    conversation = next(conversations, None)
                if conversation is None:
                    return
                converse(*conversation)
        except BaseException:
            stop.set()  # a bug or a bad grader: let the other workers wind down
            raise
        finally:
            finished.put(None)

    generated = cache_hits = 0
    failures: list[str] = []
    pool = ThreadPoolExecutor(max_workers=n_workers)
    workers = []
    try:
        workers = [pool.submit(work) for _ in range(n_workers)]
        for _ in workers:  # each worker ends with one None
            while (message := finished.get()) is not None:
                outcome, detail = message
                if isinstance(outcome, Turn):
                    store.add_turn(run_id, outcome)
                    cache_hits += detail
                    generated += not detail
                    on_turn()
                else:
                    store.add_failure(run_id, *outcome, detail)
                    failures.append(detail)
        for worker in workers:
            worker.result()  # re-raise what went wrong inside a conversation
    finally:
        stop.set()  # on an interrupt: workers finish the turn they are in and start no other
        while not all(worker.done() for worker in workers):  # unblock workers waiting to hand over a turn
            try:
                finished.get(timeout=0.1)
            except queue.Empty:
                pass
        pool.shutdown(wait=True)
    if failures:
        raise UserError(
            f"{failures[0]} ({len(failures)} turn(s) failed; the finished turns are stored: run the same command "
            "again to retry the rest)"
        )
    return generated, cache_hits


def _generate_turn(
    task: Task, strategy: Strategy, backend: Backend, item: Item, sample: int, round_: int,
    previous: Turn | None, *, temperature: float, max_tokens: int, seed: int, critic: Backend | None,
    budget: int | None, examples: str,
) -> tuple[Turn, bool]:
    """The turn, and whether every reply in it came from the response cache."""
    started = time.perf_counter()
    dialogue = Dialogue(
        backend, previous.messages if previous else [], max_tokens=max_tokens, temperature=temperature,
        seed=lambda step: cell_seed(seed, item.id, sample, round_, step), critic=critic,
    )
    response, notes = play_round(task, strategy, item, round_, dialogue, previous, budget=budget, examples=examples)
    if response is None:  # the strategy stopped: the previous answer stands, and all replies were feedback
        response, feedback = previous.response, dialogue.replies
    elif dialogue.replies and response == dialogue.replies[-1]:
        feedback = dialogue.replies[:-1]
    else:  # a baseline picked its answer among side samples: every reply in the conversation was feedback
        feedback = dialogue.replies
    grade = task.grade(item, response)
    turn = Turn(
        item_id=item.id, sample=sample, round=round_, messages=dialogue.messages, response=response,
        feedback=feedback, answer=grade.answer, correct=grade.correct, reason=grade.reason, extra=grade.extra,
        notes=notes, prompt_tokens=dialogue.prompt_tokens, completion_tokens=dialogue.completion_tokens,
        latency_s=time.perf_counter() - started, backend=backend.identity,
    )
    made = dialogue.replies or dialogue.side_requests
    return turn, bool(made) and dialogue.generated_replies == 0
