"""The strategies that ship with selfcorrect, each after the paper that introduced or studied it."""

from __future__ import annotations

import re
from typing import Callable

from . import CorrectionRound, register_strategy


@register_strategy("reask", "ask the same question again with the previous answer in context (Yang et al.)", fixed_prompt=True)
def reask(round: CorrectionRound) -> str:
    return round.ask(round.question)


@register_strategy("critique", "review the previous answer for problems, then improve it (Huang et al.)")
def critique(round: CorrectionRound) -> str:
    round.ask("Review your previous answer and find problems with your answer.")
    return round.ask(f"Based on the problems you found, improve your answer. {round.instruction}")


# The two ends of Yang et al.'s confidence-critique trade-off: a prompt that licenses keeping the answer
# moves CL up (and CS down); one that presumes a mistake moves CS up (and CL down).
@register_strategy("confident", "reconsider, keeping the answer unless sure it is wrong (raises CL)", fixed_prompt=True)
def confident(round: CorrectionRound) -> str:
    return round.ask(
        "Please double-check your previous answer. If you are confident it is correct, keep it; change it "
        f"only if you find a clear mistake. {round.instruction}"
    )


@register_strategy("critical", "assume the answer may be wrong and look for the error (raises CS)", fixed_prompt=True)
def critical(round: CorrectionRound) -> str:
    return round.ask(
        "Your previous answer may contain a mistake. Check every step critically, find the error and give "
        f"the corrected answer. {round.instruction}"
    )


NO_CHANGE = "NO CHANGES NEEDED"


@register_strategy("self-refine", "feedback, then refine; stops when the model's feedback finds nothing to change (Madaan et al.)")
def self_refine(round: CorrectionRound) -> str | None:
    feedback = round.ask(
        "Give feedback on your previous answer: point out each mistake or weakness. "
        f'If it is fully correct and nothing needs to change, reply exactly "{NO_CHANGE}".'
    )
    if NO_CHANGE.lower() in feedback.lower():
        round.notes["stopped"] = True
        return None
    return round.ask(f"Refine your answer using this feedback. {round.instruction}")


def judged_wrong(verdict: str) -> bool | None:
    """The model's verdict on its own answer: True for 'incorrect', False for 'correct', None if unclear."""
    words = re.findall(r"\b(incorrect|wrong|correct|right)\b", verdict.lower())
    if not words:
        return None
    return words[0] in ("incorrect", "wrong")


@register_strategy("verify-then-revise", "the model judges its answer first and revises only if it judges it wrong")
def verify_then_revise(round: CorrectionRound) -> str | None:
    verdict = round.ask('Is your previous answer correct? Start your reply with "Correct" or "Incorrect", then explain.')
    wrong = judged_wrong(verdict)
    round.notes["judged_wrong"] = wrong
    if wrong is False:
        round.notes["stopped"] = True
        return None
    return round.ask(f"Then give a corrected answer. {round.instruction}")


# One function, two strategies: what it is shown is the engine's choice. exec-feedback gets the code run on
# the tests the question shows (Self-Debug's setting), exec-feedback-oracle the verdict of the hidden tests
# the grade runs, which quotes their expected values: the gold answer, so it is only an upper bound.
@register_strategy(
    "exec-feedback-oracle", "UPPER BOUND, reads the hidden tests: shows their verdict on the code and asks for "
    "a fix; stops once they pass", oracle=True, needs_execution_feedback=True,
)
@register_strategy(
    "exec-feedback", "runs the code on the tests the question shows (HumanEval's docstring examples, MBPP's "
    "tests; else alone), shows the result and asks for a fix; stops once they pass (Self-Debug)",
    needs_execution_feedback=True,
)
def exec_feedback(round: CorrectionRound) -> str | None:
    feedback = round.execution_feedback
    if feedback.passed:
        round.notes["stopped"] = True
        return None
    if feedback.passed is None:  # no tests to pass: a clean run says nothing about whether the code is right
        return round.ask(f"{feedback.text}\nReview your code for mistakes and fix any you find. {round.instruction}")
    return round.ask(f"{feedback.text}\nFix the code. {round.instruction}")


@register_strategy(
    "critic", "a second model (--critic-model) reviews the answer; the first model revises with that review",
    needs_critic=True,
)
def critic(round: CorrectionRound) -> str:
    review = round.ask_critic(
        "Review this answer to the question below. Point out any mistakes, briefly.\n\n"
        f"Question:\n{round.question}\n\nAnswer:\n{round.previous_reply}"
    )
    round.notes["critique"] = review
    return round.ask(f"A reviewer commented on your answer:\n{review}\n\nRevise your answer. {round.instruction}")


@register_strategy(
    "oracle-stop", "UPPER BOUND, reads the gold answer: reask, but only where the previous answer was wrong",
    oracle=True,
)
def oracle_stop(round: CorrectionRound) -> str | None:
    if round.previous_correct:
        round.notes["stopped"] = True
        return None
    return round.ask(round.question)


# Compute-matched baselines: instead of correcting, spend the round's tokens on fresh answers to the same
# question. Without --budget they draw DEFAULT_FRESH_SAMPLES; with it, they draw until the round has spent
# the budget (at least one sample, at most MAX_FRESH_SAMPLES).
DEFAULT_FRESH_SAMPLES = 4
MAX_FRESH_SAMPLES = 32


def _candidates(round: CorrectionRound, judge: Callable[[str], object]) -> tuple[list[str], list]:
    """The previous reply and the fresh samples the round's budget pays for, each with `judge(reply)`.
    Judging as they come lets its cost (best-of-n's scoring passes) count against the budget too."""
    candidates, judged = [], []

    def add(reply: str) -> None:
        candidates.append(reply)
        judged.append(judge(reply))

    add(round.previous_reply)
    while len(candidates) <= MAX_FRESH_SAMPLES:
        if round.budget is None and len(candidates) > DEFAULT_FRESH_SAMPLES:
            break
        if round.budget is not None and len(candidates) > 1 and round.tokens_spent() >= round.budget:
            break
        add(round.sample_fresh())
    round.notes["candidates"] = candidates[1:]
    return candidates, judged


def vote_key(answer: str | None) -> str | None:
    """Answers that agree vote together: numbers by value ("14" and "14.0"), others case-blind."""
    if answer is None:
        return None
    try:
        return repr(float(answer))
    except ValueError:
        return answer.strip().lower()


@register_strategy(
    "self-consistency", "baseline: majority answer over the previous one and fresh samples (Wang et al.); --budget matches compute",
    baseline=True,
)
def self_consistency(round: CorrectionRound) -> str:
    candidates, keys = _candidates(round, lambda reply: vote_key(round.answer_of(reply)))
    votes: dict[str, int] = {}
    for key in keys:
        if key is not None:
            votes[key] = votes.get(key, 0) + 1
    round.notes["votes"] = votes
    if not votes:
        return round.previous_reply
    winner = max(votes, key=votes.get)  # ties go to the answer seen first: the previous one, if it is tied
    return candidates[keys.index(winner)]


@register_strategy(
    "best-of-n", "baseline: the previous answer and fresh samples ranked by the model's P(True) or own verdict; --budget matches compute",
    baseline=True,
)
def best_of_n(round: CorrectionRound) -> str:
    def score(reply: str) -> float:
        p_true = round.p_true(reply)
        if p_true is None:  # the backend cannot score options: ask the model for a verdict instead
            round.notes["scorer"] = "verdict"
            return _verdict_score(round, reply)
        round.notes["scorer"] = "p_true"
        return p_true

    candidates, scores = _candidates(round, score)
    round.notes["scores"] = scores
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]  # ties: the earliest


def _verdict_score(round: CorrectionRound, reply: str) -> float:
    """1 if the model calls the reply correct, 0 if incorrect, 0.5 if it does not say."""
    verdict = round.ask_fresh(
        f"Question:\n{round.question}\n\nProposed answer:\n{reply}\n\n"
        'Is the proposed answer correct? Start your reply with "Correct" or "Incorrect".'
    )
    wrong = judged_wrong(verdict)
    return 0.5 if wrong is None else float(not wrong)
