"""The Inspect solver `selfcorrect_rounds`: a selfcorrect strategy run for N correction rounds on Inspect's model.

Round 0 is the model's first answer: the reply the conversation already ends with (when an earlier solver
such as `generate()` produced it), else one the solver asks for. Each later round hands the strategy a
`CorrectionRound` whose `ask` sends a user message through Inspect's `generate`, so the conversation grows in
`state.messages`, every Inspect model provider serves it, and Inspect's limits and transcript see each request.
Strategies are plain synchronous functions: one runs in a worker thread, and each `ask` waits there for the
reply that `generate` produces on the event loop.

Every round's graded reply is kept in the sample's store under ROUNDS_KEY (as a list, round 0 first), which is
what `selfcorrect_scorer` grades.

Strategies that need more than a model and the conversation are refused when the solver is built: those that
read the gold answer (oracle), run code (execution feedback), ask a second model (critic) or draw and score
fresh samples (the compute-matched baselines).
"""

from __future__ import annotations

from functools import partial

import anyio
from inspect_ai.model import ChatMessageAssistant, ChatMessageUser
from inspect_ai.solver import Generate, Solver, TaskState, solver

from ..errors import UserError
from ..strategies import CorrectionRound, Strategy, all_strategies, get_strategy, round_outcome
from .dataset import INSTRUCTION_KEY
from .refusal import refusals_for_inspect

ROUNDS_KEY = "selfcorrect_rounds"


def _needs(strategy: Strategy) -> str | None:
    """What the strategy needs that this solver cannot give it, or None."""
    if strategy.oracle:
        return "the gold answer (an oracle upper bound)"
    if strategy.needs_execution_feedback:
        return "a selfcorrect code task to run the reply's code"
    if strategy.needs_critic:
        return "a second (critic) model"
    if strategy.baseline:
        return "fresh samples scored by selfcorrect's grader or the model's option probabilities"
    return None


def usable_strategies() -> list[str]:
    """The strategies this solver runs."""
    return sorted(name for name, strategy in all_strategies().items() if _needs(strategy) is None)


def check_strategy(name: str) -> Strategy:
    """The strategy named `name`, or UserError if it is unknown or needs what Inspect's solver lacks."""
    strategy = get_strategy(name)
    needed = _needs(strategy)
    if needed is not None:
        raise UserError(
            f"selfcorrect_rounds(strategy={name!r}): it needs {needed}, which this Inspect solver does not have; "
            f"choose one of {', '.join(usable_strategies())}, or run it with `selfcorrect run`"
        )
    return strategy


def round_record(round_: int, response: str, feedback: list[str], notes: dict) -> dict:
    """What the store keeps of one round: the reply to grade, the other replies of the round, the strategy's notes."""
    return {"round": round_, "response": response, "feedback": feedback, "notes": notes}


@solver
@refusals_for_inspect
def selfcorrect_rounds(strategy: str = "reask", rounds: int = 1, instruction: str = "") -> Solver:
    """Run `strategy` for `rounds` correction rounds after the first answer, keeping every round's answer.

    Args:
      strategy: a selfcorrect strategy (`selfcorrect strategies` lists them; see docs/inspect.md for those
        this solver refuses).
      rounds: correction rounds after the first answer (1 or more).
      instruction: how the answer should be stated, repeated by strategies that ask for a new answer (e.g.
        critique's "improve your answer. {instruction}"), for samples whose metadata does not carry one
        (`selfcorrect_dataset` puts the task's there); empty for none.
    """
    chosen = check_strategy(strategy)
    if not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"selfcorrect_rounds(rounds={rounds!r}): must be a whole number, 1 or more")

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        async def reply_to(prompt: str) -> str:
            state.messages.append(ChatMessageUser(content=prompt))
            await generate(state, tool_calls="none")
            return state.output.completion

        if not (state.messages and isinstance(state.messages[-1], ChatMessageAssistant)):
            await generate(state, tool_calls="none")
        kept = [round_record(0, state.messages[-1].text, [], {})]
        question = state.user_prompt.text
        instruction_for_sample = state.metadata.get(INSTRUCTION_KEY, instruction)
        for round_ in range(1, rounds + 1):
            replies: list[str] = []

            def ask(prompt: str) -> str:  # runs in the strategy's worker thread
                replies.append(anyio.from_thread.run(reply_to, prompt))
                return replies[-1]

            correction = CorrectionRound(question=question, instruction=instruction_for_sample,
                                         previous_reply=kept[-1]["response"], ask=ask)
            response = await anyio.to_thread.run_sync(partial(chosen.correct, correction))
            response, feedback = round_outcome(response, kept[-1]["response"], replies)
            kept.append(round_record(round_, response, feedback, correction.notes))
        state.store.set(ROUNDS_KEY, kept)
        return state

    return solve
