"""Drive conversations through a backend, round by round, writing every graded turn to the store.

The work of a run is a grid of cells (item, sample, round). Each (item, sample) is one conversation: round
0 asks the question, each later round sends the strategy's correction prompts after the previous answer.
Cells already in the store are read back instead of generated, which is all that resuming takes: the
conversation is rebuilt from the stored messages and continues from the first missing round.

Every generation gets a seed derived from the run seed and its cell, so a cell's reply does not depend on
which cells ran before it: a resumed run produces what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from .models import Backend, Message
from .store import Store, Turn
from .strategies import Strategy
from .tasks import Item, Task


def cell_seed(run_seed: int, item_id: str, sample: int, round_: int, step: int) -> int:
    """A 31-bit seed unique to one generation of one cell."""
    key = f"{run_seed}/{item_id}/{sample}/{round_}/{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & 0x7FFFFFFF


def round_prompts(task: Task, strategy: Strategy, item: Item, round_: int) -> list[str]:
    """The user messages of one round. The strategy gets the question as the model saw it, not the item,
    so it cannot read the gold answer."""
    question = task.prompt(item)
    if round_ == 0:
        return [question]
    return strategy.round_prompts(question, task.instruction(item))


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
    on_turn: Callable[[], None] = lambda: None,
) -> int:
    """Generate and store every missing cell; returns how many turns were generated.

    Conversations run one after another, each through all its rounds, so the backend's cached prefix
    (the conversation so far) is the one the next round extends.
    """
    stored = {(t.item_id, t.sample, t.round): t for t in store.turns(run_id)}
    generated = 0
    for item in items:
        for sample in range(samples):
            history: list[Message] = []
            for round_ in range(rounds + 1):
                turn = stored.get((item.id, sample, round_))
                if turn is None:
                    turn = _generate_turn(task, strategy, backend, item, sample, round_, history,
                                          temperature=temperature, max_tokens=max_tokens, seed=seed)
                    store.add_turn(run_id, turn)
                    generated += 1
                    on_turn()
                history = turn.messages + [{"role": "assistant", "content": turn.response}]
    return generated


def _generate_turn(
    task: Task, strategy: Strategy, backend: Backend, item: Item, sample: int, round_: int,
    history: list[Message], *, temperature: float, max_tokens: int, seed: int,
) -> Turn:
    messages = list(history)
    feedback: list[str] = []
    prompt_tokens = completion_tokens = 0
    started = time.perf_counter()
    prompts = round_prompts(task, strategy, item, round_)
    for step, prompt in enumerate(prompts):
        if step > 0:
            # The reply to an earlier prompt of the round (a critique) stays in the conversation.
            feedback.append(reply.text)
            messages.append({"role": "assistant", "content": reply.text})
        messages.append({"role": "user", "content": prompt})
        reply = backend.complete(messages, max_tokens, temperature, cell_seed(seed, item.id, sample, round_, step))
        prompt_tokens += reply.prompt_tokens
        completion_tokens += reply.completion_tokens
    grade = task.grade(item, reply.text)
    return Turn(
        item_id=item.id, sample=sample, round=round_, messages=messages, response=reply.text, feedback=feedback,
        answer=grade.answer, correct=grade.correct, reason=grade.reason, extra=grade.extra,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        latency_s=time.perf_counter() - started, backend=backend.identity,
    )
