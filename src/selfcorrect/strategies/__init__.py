"""Correction strategies: how the model is led from its previous answer to the next one.

A strategy is a function that runs one correction round. It gets a `CorrectionRound`: the question as the
model saw it, the task's answer instruction, the previous reply, execution feedback if the strategy is
registered as needing it (code tasks only), and `ask(prompt)`, which sends a user message and returns the
model's reply (both stay in the conversation). It returns the reply to grade, or None to keep the previous
answer (the strategy stopped). It may write what it decided into `notes` (for example its own verdict),
which is stored with the turn; the execution feedback it was given is stored there too.
The compute-matched baselines also draw fresh answers (`sample_fresh`), read the answer a reply states
(`answer_of`), score replies by the model's P(True) (`p_true`), and watch their token `budget`.

A strategy never sees the item's gold answer, and execution feedback runs only the tests the question shows
(see `selfcorrect.tasks.code`). Strategies registered with `oracle=True` are the exception, allowed only as
upper bounds that every report marks: the engine hands them the previous answer's grade (`oracle-stop`),
and as execution feedback the hidden tests' verdict (`exec-feedback-oracle`).

Add your own in a file of yours:

    from selfcorrect.strategies import register_strategy

    @register_strategy("double-check", "ask twice whether the answer holds, then answer again")
    def double_check(round):
        round.ask("Check your previous answer once more, step by step.")
        return round.ask(f"Now give your final answer. {round.instruction}")

and make it known to the command line with an entry point in your package's pyproject.toml:

    [project.entry-points."selfcorrect.strategies"]
    double-check = "my_package.strategies"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..plugins import load_plugins
from ..tasks.base import ExecutionFeedback


@dataclass
class CorrectionRound:
    question: str  # the first user message, as the model saw it
    instruction: str  # how the task wants the answer stated
    previous_reply: str
    ask: Callable[[str], str]
    # A one-message conversation with the critic model (--critic-model), for strategies that use one.
    ask_critic: Callable[[str], str] | None = None
    # A one-message conversation with the model, outside the main one (a verdict on a candidate answer).
    ask_fresh: Callable[[str], str] | None = None
    # A new answer to the question in a fresh conversation, sampled (at 0.7 when the run is greedy).
    sample_fresh: Callable[[], str] | None = None
    # The answer a reply states, as the task's grader extracts it (never whether it is right).
    answer_of: Callable[[str], "str | None"] | None = None
    # The model's probability that a reply is right (P(True)), or None when the backend cannot score.
    p_true: Callable[[str], "float | None"] | None = None
    # Tokens (prompt + completion) this round has spent so far, and the round's budget (--budget), if any.
    tokens_spent: Callable[[], int] = lambda: 0
    budget: int | None = None
    # For strategies registered with needs_execution_feedback: the previous reply's code run on the tests
    # the question shows (its `passed` is None where it shows none); an oracle gets the hidden tests' verdict.
    execution_feedback: ExecutionFeedback | None = None
    # Only for strategies registered with oracle=True: whether the previous answer was right.
    previous_correct: bool | None = None
    notes: dict = field(default_factory=dict)


CorrectFn = Callable[[CorrectionRound], "str | None"]


def round_outcome(response: str | None, previous: str, replies: list[str]) -> tuple[str, list[str]]:
    """(the answer a correction round leaves, the replies that were feedback on the way to it). A strategy that
    stopped (None) leaves the previous answer standing, and every reply of the round was feedback; otherwise its
    answer is its last reply, the ones before it feedback, or, for a baseline that picked its answer among side
    samples, every reply was feedback."""
    if response is None:
        return previous, replies
    if replies and response == replies[-1]:
        return response, replies[:-1]
    return response, replies


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    correct: CorrectFn
    oracle: bool = False  # reads the gold answer: an upper bound, never a method
    needs_execution_feedback: bool = False
    needs_critic: bool = False
    # A compute-matched baseline: picks its answer among fresh samples instead of correcting (--budget).
    baseline: bool = False
    # Its correction turn is one prompt that does not depend on the previous reply (reask, confident, critical):
    # another reply can stand in for the one it answered (training data with --clt-source gold).
    fixed_prompt: bool = False


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str, description: str, *, oracle: bool = False, needs_execution_feedback: bool = False,
    needs_critic: bool = False, baseline: bool = False, fixed_prompt: bool = False,
) -> Callable[[CorrectFn], CorrectFn]:
    def decorate(correct: CorrectFn) -> CorrectFn:
        STRATEGIES[name] = Strategy(name, description, correct, oracle, needs_execution_feedback, needs_critic, baseline,
                                    fixed_prompt)
        return correct

    return decorate


def all_strategies() -> dict[str, Strategy]:
    """Every strategy, plugins included."""
    load_plugins("selfcorrect.strategies", STRATEGIES)
    return STRATEGIES


def fixed_prompt_strategies() -> str:
    """The names of the strategies whose correction turn is a fixed prompt, for messages: "reask, confident, ..."."""
    return ", ".join(name for name, strategy in all_strategies().items() if strategy.fixed_prompt)


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        load_plugins("selfcorrect.strategies", STRATEGIES)
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name}: unknown strategy; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


from . import builtin  # noqa: E402,F401 - registers the strategies that ship with selfcorrect
