"""Graders shared by task families: an extracted answer compared with the item's target."""

from __future__ import annotations

import threading

from .base import Grade, Item
from .extract import extract_number, normalise_text, numbers_equal


def _grade(item: Item, answer: str | None, correct: bool, what: str) -> Grade:
    if answer is None:
        return Grade(None, False, f"no {what} found in the reply")
    relation = "matches" if correct else "differs from"
    return Grade(answer, correct, f"{what} {answer} {relation} the target {item.target}")


def grade_number(item: Item, response: str) -> Grade:
    """The number the reply states, compared numerically with the target."""
    answer = extract_number(response)
    return _grade(item, answer, numbers_equal(answer, item.target), "number")


def grade_equal(item: Item, answer: str | None, what: str) -> Grade:
    """An already extracted answer (option letter, yes/no ...) compared exactly with the target."""
    return _grade(item, answer, answer == item.target, what)


def grade_math(item: Item, response: str) -> Grade:
    """Mathematical equivalence by math-verify: \\boxed{} and final answers in the reply, LaTeX
    fractions, radicals, intervals, units, compared symbolically with the target (a LaTeX string)."""
    from math_verify import parse, verify  # imports sympy: only when a maths task is graded

    # math-verify bounds its work with SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${item.target}$", parsing_timeout=timeout)
    found = parse(normalise_text(response), parsing_timeout=timeout)
    if not found:
        return Grade(None, False, "no mathematical answer found in the reply")
    answer = str(found[-1])
    correct = bool(gold) and verify(gold, found, timeout_seconds=timeout)
    relation = "is equivalent to" if correct else "is not equivalent to"
    return Grade(answer, correct, f"answer {answer} {relation} the target {item.target}")
