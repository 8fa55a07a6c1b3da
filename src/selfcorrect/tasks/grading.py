"""Graders shared by task families: an extracted answer compared with the item's target."""

from __future__ import annotations

from .base import Grade, Item
from .extract import extract_number, numbers_equal


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
