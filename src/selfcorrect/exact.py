"""The exact estimator for multiple choice: CL and CS from option probabilities, no sampling.

Per item, one scoring pass gives p1, the model's distribution over the option labels for its first
answer. Then, for each option k, the conversation is continued as if the model had answered k, the
correction round's prompts are sent, and a second pass gives p2(.|k). With g the gold label:

    P(a) = p1[g],   P(b|a) = p2(g|g),   P(b|not a) = sum_{k != g} p1[k] p2(g|k) / (1 - p1[g])

K+1 scoring passes per item, and the metrics follow from these per-item probabilities exactly.
The gold label is used only here, after scoring, never to build a prompt. Each pass is stored as it
finishes; a pass the backend cannot complete (`BackendError`) stops the run with a UserError, and a rerun
scores only the passes still missing.
"""

from __future__ import annotations

import time
from typing import Callable

from .engine import Dialogue, cell_seed, play_round
from .errors import UserError
from .models import Backend, Message
from .models.base import BackendError, Completion, option_scoring_problem
from .store import OptionScore, Store, Turn
from .strategies import Strategy
from .tasks import Item, Task

# The phrase every multiple-choice instruction asks the answer to follow; scoring starts the reply with it.
ANSWER_PREFIX = "The answer is"


def scoring_problem(backend: Backend) -> str | None:
    """Why `backend` cannot score option labels, or None when it can (models.base.option_scoring_problem); a
    server that is down is a UserError here."""
    try:
        return option_scoring_problem(backend)
    except BackendError as error:
        raise UserError(str(error)) from None


def run_scoring(
    run_id: str, task: Task, items: list[Item], strategy: Strategy, backend: Backend, store: Store, *,
    max_tokens: int, seed: int, critic: Backend | None = None, on_pass: Callable[[], None] = lambda: None,
    examples: Callable[[Item], str] = lambda item: "",
) -> int:
    """Score every missing (item, given-answer) pass; returns how many passes ran."""
    stored = {(s.item_id, s.given) for s in store.option_scores(run_id)}
    done = 0
    for item in items:
        labels = task.labels(item)
        for given in ["", *labels]:
            if (item.id, given) in stored:
                continue
            started = time.perf_counter()
            first: list[Message] = [*task.system_messages(), {"role": "user", "content": task.prompt(item)}]
            try:
                if given:
                    probs, messages, feedback = _score_correction(task, strategy, backend, item, first, given,
                                                                  labels, max_tokens, seed, critic, examples(item))
                else:
                    probs, messages, feedback = backend.option_probs(first, task.answer_prefix or ANSWER_PREFIX, labels), first, []
            except BackendError as error:  # a server gone, an actor dead: what is scored stays stored
                raise UserError(
                    f"{error} (scoring stopped at item {item.id}; the finished scoring passes are stored: run the "
                    "same command again to score the rest)"
                ) from None
            store.add_option_score(
                run_id,
                OptionScore(item.id, given, labels, probs, messages, feedback, time.perf_counter() - started, backend.identity),
            )
            done += 1
            on_pass()
    return done


def _score_correction(
    task: Task, strategy: Strategy, backend: Backend, item: Item, first: list[Message], given: str,
    labels: list[str], max_tokens: int, seed: int, critic: Backend | None, examples: str,
) -> tuple[list[float], list[Message], list[str]]:
    """p2(.|given): the model made to have answered `given`, then the strategy's round run greedily; the
    reply it would grade is replaced by scoring the labels at that point of the conversation. A strategy
    that stops keeps the given answer, so p2 puts all its mass there."""
    previous_reply = task.stated_answer(given) if task.stated_answer else f"{ANSWER_PREFIX} {given}."
    dialogue = Dialogue(
        _ScoredReplyNotGenerated(backend) if strategy.fixed_prompt else backend, [*first, {"role": "assistant", "content": previous_reply}], max_tokens=max_tokens, temperature=0.0,
        seed=lambda step: cell_seed(seed, item.id, 0, 1, step), critic=critic,
    )
    # The given answer as a graded first turn: an oracle strategy may see whether it is right.
    previous = Turn(item.id, 0, 0, dialogue.messages, previous_reply, [], given, given == item.target, "", {}, {},
                    0, 0, 0.0, backend.identity)
    response, _ = play_round(task, strategy, item, 1, dialogue, previous, examples=examples)
    if response is None:
        return [1.0 if label == given else 0.0 for label in labels], dialogue.messages, dialogue.replies
    context = dialogue.messages[:-1]  # up to the prompt that the graded reply answered
    return backend.option_probs(context, task.answer_prefix or ANSWER_PREFIX, labels), context, dialogue.replies[:-1]


class _ScoredReplyNotGenerated:
    """The backend of a fixed-prompt strategy's scored round (reask, confident, critical). Its one reply is the
    reply that scoring replaces, so generating it would cost a whole greedy reply and change nothing: an empty
    reply stands in. Strategies that ask several times get the real backend, since their last prompt may
    depend on what the model said before."""

    def __init__(self, backend: Backend):
        self.identity = backend.identity

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        return Completion("", 0, 0)


def item_probabilities(scores: list[OptionScore], target: str) -> tuple[float, float, float] | None:
    """(P(a), P(b|a), P(b|not a)) of one item from its K+1 passes, or None if a pass is missing."""
    by_given = {s.given: s for s in scores}
    if "" not in by_given:
        return None
    labels = by_given[""].labels
    if any(label not in by_given for label in labels):
        return None
    gold = labels.index(target)
    p1 = by_given[""].probs
    p2_gold = [by_given[label].probs[gold] for label in labels]  # p2(g | k) for each k
    p_a = p1[gold]
    wrong_mass = 1.0 - p_a
    p_b_not_a = sum(p1[k] * p2_gold[k] for k in range(len(labels)) if k != gold) / wrong_mass if wrong_mass > 0 else 0.0
    return p_a, p2_gold[gold], p_b_not_a
