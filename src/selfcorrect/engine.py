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

import contextlib
import hashlib
import queue
import signal
import threading
import time
from typing import Callable, Iterator

from .errors import UserError
from .models import Backend, Message
from .models.base import BackendError, Completion
from .store import Store, Turn
from .strategies import CorrectionRound, Strategy, round_outcome
from .tasks import Item, Task, grader_version
from .tasks.base import ExecutionFeedback

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
        self.finish_reasons: list[str | None] = []  # of every reply, side requests included, in order
        self.served_by: dict = {}  # what the server reported for the last reply that said anything

    def ask(self, prompt: str) -> str:
        self.messages.append({"role": "user", "content": prompt})
        reply = self.backend.complete(self.messages, self.max_tokens, self.temperature, self.seed(len(self.replies)))
        self._count(reply)
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
        # Asked by name rather than through models.base.option_scoring_problem: this function's strings are part of
        # every run's prompt version (prompt_version.py), so a change of its text would give every run a new id.
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
        self._count(reply)
        return reply.text

    def _count(self, reply: Completion) -> None:
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.generated_replies += not reply.cached
        self.finish_reasons.append(reply.finish_reason)
        self.served_by = reply.served_by or self.served_by


def play_round(
    task: Task, strategy: Strategy, item: Item, round_: int, dialogue: Dialogue, previous: Turn | None,
    *, budget: int | None = None, examples: str = "",
) -> tuple[str | None, dict]:
    """Run round `round_` on `dialogue`: ask the question (round 0) or let the strategy correct the
    `previous` turn. Returns (the reply to grade, or None if the strategy kept the previous answer; the
    strategy's notes).

    The strategy gets the question as the model saw it, not the item, so it cannot read the gold answer;
    only an oracle strategy is told whether the previous answer was right. A strategy that needs
    execution feedback gets the previous reply's code run on the tests the question shows (run only for
    such strategies: it costs a sandbox run), an oracle one the hidden tests' verdict; either is stored
    in the notes. `examples` (in-context examples of corrections) go before the round's first prompt.
    """
    if round_ == 0:
        return dialogue.ask(task.prompt(item)), {}
    question = task.prompt(item)
    pending_examples = [examples] if examples else []
    feedback = None
    if strategy.needs_execution_feedback and strategy.oracle:  # an upper bound: the hidden tests quote the gold
        feedback = ExecutionFeedback(f"Running your code gave: {previous.reason}", previous.correct)
    elif strategy.needs_execution_feedback:
        feedback = task.execution_feedback(item, previous.response)

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
        execution_feedback=feedback,
        previous_correct=previous.correct if strategy.oracle else None,
        notes={"execution_feedback": feedback.text} if feedback else {},
    )
    return strategy.correct(correction), correction.notes


# After Ctrl-C, how long the turns in flight may take to finish and be stored before they are dropped.
INTERRUPT_GRACE_S = 3.0
WORKER_NAME = "selfcorrect-worker"  # the threads of run_cells


def dropped_turns_running() -> bool:
    """Whether worker threads of an interrupted run are still waiting for the backend (each ends when its
    request does). The backend may still be computing for them: a llama.cpp model freed under its decoding
    thread, as at interpreter exit, crashes, so the command line then ends the process at once."""
    return any(thread.name.startswith(WORKER_NAME) and thread.is_alive() for thread in threading.enumerate())


@contextlib.contextmanager
def _interrupt_sets(interrupted: threading.Event) -> Iterator[None]:
    """Within the block, the first Ctrl-C sets `interrupted` instead of raising KeyboardInterrupt wherever
    the main thread is; a second one raises it. Only in the main thread and over Python's default handler
    (a handler of the caller's is left alone; elsewhere Ctrl-C arrives as KeyboardInterrupt as usual)."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(signum, frame) -> None:
        if interrupted.is_set():
            signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
        interrupted.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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

    Ctrl-C (KeyboardInterrupt in the main thread) ends the call within INTERRUPT_GRACE_S seconds, however
    long a request would still take: no new turn starts, the turns that finish within the grace are
    stored, the others are dropped (a rerun makes them again), and KeyboardInterrupt reaches the caller.
    A second Ctrl-C drops them at once. While this runs in the main thread over Python's default handler,
    the first Ctrl-C only sets a flag, so it never lands in the middle of writing a turn. The workers are
    daemon threads: one still waiting for a reply does not keep the process alive, and when its request
    ends it hands over nothing more (until then the backend may still compute for it: see
    `dropped_turns_running`).
    """
    stored = store.turn_keys(run_id)
    pending = [
        (item, sample) for item in items for sample in range(samples)
        if any((item.id, sample, round_) not in stored for round_ in range(rounds + 1))
    ]
    conversations = iter(pending)
    take_lock = threading.Lock()
    # A worker per request the backend can have in flight, but no more than there are conversations: an HTTP
    # model at --concurrency 512 on a run of 20 items starts 20 threads.
    n_workers = max(1, min(getattr(backend, "max_in_flight", 1), len(pending)))
    # (turn, from_cache), (failed cell, error), or None when a worker ends. Bounded, so workers wait for
    # the writer rather than pile finished turns up in memory.
    finished: queue.Queue = queue.Queue(maxsize=4 * n_workers)
    stop = threading.Event()  # start no new turn
    abandoned = threading.Event()  # the writer reads no more: workers hand nothing over and report nothing
    crashed: list[BaseException] = []  # what went wrong inside a conversation, re-raised by the writer

    def hand_over(message) -> bool:
        """Queue a message for the writer; False (and the message dropped) once the run is abandoned."""
        while not abandoned.is_set():
            try:
                finished.put(message, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

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
                hand_over(((item.id, sample, round_), str(error)))
                return
            if not hand_over((turn, from_cache)):
                return
            previous = turn

    def work() -> None:
        try:
            while not stop.is_set():
                with take_lock:
                    conversation = next(conversations, None)
                if conversation is None:
                    return
                converse(*conversation)
        except BaseException as error:  # a bug or a bad grader: let the other workers wind down
            stop.set()
            if not abandoned.is_set():  # after abandonment (the store may be closed) nobody is told
                crashed.append(error)
        finally:
            hand_over(None)

    generated = cache_hits = 0
    failures: list[str] = []

    def write(message: tuple) -> None:
        nonlocal generated, cache_hits
        outcome, detail = message
        if isinstance(outcome, Turn):
            store.add_turn(run_id, outcome)
            cache_hits += detail
            generated += not detail
            on_turn()
        else:
            store.add_failure(run_id, *outcome, detail)
            failures.append(detail)

    ended = 0  # workers that have handed over their final None

    def write_until(deadline: float | None, interrupted: threading.Event) -> bool:
        """Write what the workers hand over until every worker has ended (True), or until `deadline`, or
        (without a deadline) until `interrupted` is set (False)."""
        nonlocal ended
        while ended < n_workers:
            if interrupted.is_set() if deadline is None else time.monotonic() >= deadline:
                return False
            try:
                message = finished.get(timeout=0.1)
            except queue.Empty:
                continue
            if message is None:
                ended += 1
            else:
                write(message)
        return True

    interrupted = threading.Event()
    try:
        with _interrupt_sets(interrupted):
            for number in range(n_workers):
                threading.Thread(target=work, name=f"{WORKER_NAME}-{number}", daemon=True).start()
            try:
                done = write_until(None, interrupted)
            except KeyboardInterrupt:  # raised by a handler other than ours
                done = False
            if not done:
                stop.set()
                write_until(time.monotonic() + INTERRUPT_GRACE_S, interrupted)  # a second Ctrl-C raises here
                abandoned.set()
                while True:  # turns handed over just before the deadline
                    try:
                        message = finished.get_nowait()
                    except queue.Empty:
                        break
                    if message is not None:
                        write(message)
                raise KeyboardInterrupt
        if crashed:
            raise crashed[0]
    finally:
        stop.set()
        abandoned.set()  # after an error of the writer's too: workers still in a request end on their own
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
        backend, previous.messages if previous else task.system_messages(), max_tokens=max_tokens, temperature=temperature,
        seed=lambda step: cell_seed(seed, item.id, sample, round_, step), critic=critic,
    )
    response, notes = play_round(task, strategy, item, round_, dialogue, previous, budget=budget, examples=examples)
    response, feedback = round_outcome(response, previous.response if previous else "", dialogue.replies)
    grade = task.grade(item, response)  # time-limited where the caller made it so (api.evaluate: GraderPool)
    turn = Turn(
        item_id=item.id, sample=sample, round=round_, messages=dialogue.messages, response=response,
        feedback=feedback, answer=grade.answer, correct=grade.correct, reason=grade.reason, extra=grade.extra,
        notes=notes, prompt_tokens=dialogue.prompt_tokens, completion_tokens=dialogue.completion_tokens,
        latency_s=time.perf_counter() - started, backend=backend.identity,
        finish_reasons=dialogue.finish_reasons, served_by=dialogue.served_by, grader_version=grader_version(),
    )
    made = dialogue.replies or dialogue.side_requests
    return turn, bool(made) and dialogue.generated_replies == 0
