"""The Inspect scorer `selfcorrect_scorer`: grades every round `selfcorrect_rounds` kept, with a selfcorrect
task's grader or with an Inspect scorer such as `match()`, and carries the metrics CL, CS, RSS and acc_0 ..
acc_N (`selfcorrect.inspect_ext.metrics`).

The score's value maps "round_0" .. "round_N" to 1 (right) or 0 (wrong); its answer is the last round's
answer, its explanation each round's answer and verdict, and its metadata each round's answer and grader
reason. A wrapped Inspect scorer grades each round's reply as if it were the sample's output; only a full
mark (CORRECT, or 1) counts as right, since the decomposition is over right and wrong answers.
"""

from __future__ import annotations

import copy
from functools import partial

import anyio
from inspect_ai.model import ModelOutput
from inspect_ai.scorer import Score, Scorer, Target, scorer, value_to_float
from inspect_ai.solver import TaskState

from ..errors import UserError
from .dataset import item_of, selfcorrect_task
from .metrics import cl, cs, round_accuracy, round_key, rss
from .refusal import refusals_for_inspect
from .solver import ROUNDS_KEY

_as_float = value_to_float()


@scorer(metrics=[cl(), cs(), rss(), round_accuracy()])
@refusals_for_inspect
def selfcorrect_scorer(
    grader: Scorer | None = None, task: str | None = None, data: str | None = None,
    task_opts: dict[str, str] | None = None,
) -> Scorer:
    """Grade every round kept by `selfcorrect_rounds`.

    Args:
      grader: an Inspect scorer (e.g. `match(numeric=True)`) that grades one reply; or
      task: the selfcorrect task whose grader grades the replies (samples from `selfcorrect_dataset`), with
        its `data` file and `task_opts` as for `selfcorrect run --task TASK --data DATA --task-opt K=V`.
    """
    if (grader is None) == (task is None):
        raise UserError(
            "selfcorrect_scorer: give either grader= (an Inspect scorer) or task= (a selfcorrect task name)")
    loaded = selfcorrect_task(task, data, task_opts) if task is not None else None

    async def grade(state: TaskState, target: Target, reply: str) -> tuple[bool, str | None, str]:
        """(right, the answer found, why) for one reply."""
        if loaded is not None:
            verdict = await anyio.to_thread.run_sync(partial(loaded.grade, item_of(loaded, state.sample_id), reply))
            return verdict.correct, verdict.answer, verdict.reason
        as_output = copy.copy(state)  # a shallow copy: only its output is replaced
        as_output.output = ModelOutput.from_content(model=str(state.model), content=reply)
        score = await grader(as_output, target)
        return _as_float(score.value) == 1.0, score.answer, score.explanation or ""

    async def score(state: TaskState, target: Target) -> Score:
        kept = state.store.get(ROUNDS_KEY)
        if kept is None:
            raise ValueError(
                f"sample {state.sample_id}: no rounds in its store; put selfcorrect_rounds() in the solver")
        return rounds_score([await grade(state, target, round_["response"]) for round_ in kept])

    return score


def rounds_score(graded: list[tuple[bool, str | None, str]]) -> Score:
    """The score of one conversation from each round's (right, answer found, grader's reason), round 0 first."""
    return Score(
        value={round_key(t): int(right) for t, (right, _, _) in enumerate(graded)},
        answer=graded[-1][1],
        explanation=" -> ".join(f"round {t}: {answer} ({'right' if right else 'wrong'})"
                                for t, (right, answer, _) in enumerate(graded)),
        metadata={"rounds": [{"answer": answer, "correct": right, "reason": reason}
                             for right, answer, reason in graded]},
    )
