"""Drive conversations through a backend, round by round, writing every graded turn to the store.

The work of a run is a grid of cells (item, sample, round). Each (item, sample) is one conversation: round
0 asks the question, each later round sends the strategy's correction prompts after the previous answer.
Cells already in the store are read back instead of generated, which is all that resuming takes: the
conversation is rebuilt from the stored messages and continues from the first missing round.

Every generation gets a seed derived from the run seed and its cell, so a cell's reply does not depend on
which cells ran before it: a resumed run produces what an uninterrupted one would have. A turn stores the
whole conversation after its round, so the next round continues from exactly what the model saw.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from .models import Backend, Message
from .store import Store, Turn
from .strategies import CorrectionRound, Strategy
from .tasks import Item, Task


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
        reply = self.critic.complete([{"role": "user", "content": prompt}], self.max_tokens, self.temperature,
                                     self.seed(1000 + len(self.replies)))
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.generated_replies += not reply.cached
        return reply.text


def play_round(
    task: Task, strategy: Strategy, item: Item, round_: int, dialogue: Dialogue, previous: Turn | None,
) -> tuple[str | None, dict]:
    """Run round `round_` on `dialogue`: ask the question (round 0) or let the strategy correct the
    `previous` turn. Returns (the reply to grade, or None if the strategy kept the previous answer; the
    strategy's notes).

    The strategy gets the question as the model saw it, not the item, so it cannot read the gold answer;
    only an oracle strategy is told whether the previous answer was right.
    """
    if round_ == 0:
        return dialogue.ask(task.prompt(item)), {}
    correction = CorrectionRound(
        question=task.prompt(item),
        instruction=task.instruction(item),
        previous_reply=previous.response,
        ask=dialogue.ask,
        ask_critic=dialogue.ask_critic,
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
    on_turn: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """Generate and store every missing cell; returns (turns generated, turns served whole from the
    response cache).

    Conversations run one after another, each through all its rounds, so the backend's cached prefix
    (the conversation so far) is the one the next round extends.
    """
    stored = {(t.item_id, t.sample, t.round): t for t in store.turns(run_id)}
    generated = cache_hits = 0
    for item in items:
        for sample in range(samples):
            previous: Turn | None = None
            for round_ in range(rounds + 1):
                turn = stored.get((item.id, sample, round_))
                if turn is None:
                    turn, from_cache = _generate_turn(task, strategy, backend, item, sample, round_, previous,
                                                      temperature=temperature, max_tokens=max_tokens, seed=seed,
                                                      critic=critic)
                    store.add_turn(run_id, turn)
                    cache_hits += from_cache
                    generated += not from_cache
                    on_turn()
                previous = turn
    return generated, cache_hits


def _generate_turn(
    task: Task, strategy: Strategy, backend: Backend, item: Item, sample: int, round_: int,
    previous: Turn | None, *, temperature: float, max_tokens: int, seed: int, critic: Backend | None,
) -> tuple[Turn, bool]:
    """The turn, and whether every reply in it came from the response cache."""
    started = time.perf_counter()
    dialogue = Dialogue(
        backend, previous.messages if previous else [], max_tokens=max_tokens, temperature=temperature,
        seed=lambda step: cell_seed(seed, item.id, sample, round_, step), critic=critic,
    )
    response, notes = play_round(task, strategy, item, round_, dialogue, previous)
    if response is None:  # the strategy stopped: the previous answer stands, and all replies were feedback
        response, feedback = previous.response, dialogue.replies
    else:
        feedback = dialogue.replies[:-1]
    grade = task.grade(item, response)
    turn = Turn(
        item_id=item.id, sample=sample, round=round_, messages=dialogue.messages, response=response,
        feedback=feedback, answer=grade.answer, correct=grade.correct, reason=grade.reason, extra=grade.extra,
        notes=notes, prompt_tokens=dialogue.prompt_tokens, completion_tokens=dialogue.completion_tokens,
        latency_s=time.perf_counter() - started, backend=backend.identity,
    )
    return turn, bool(dialogue.replies) and dialogue.generated_replies == 0
