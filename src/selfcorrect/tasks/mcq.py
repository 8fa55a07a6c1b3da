"""Multiple choice (CommonsenseQA form) and yes/no questions (BoolQ form) from a JSONL file.

A record with `choices` (a list of option texts) and an integer `answer` index is multiple choice; a record
without `choices` whose `answer` is true/false is a yes/no question. Both forms may share one file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Grade, Item, Task, file_identity, read_jsonl, register_task, reject_unknown_options, require_field
from .base import require_items
from .extract import extract_choice, extract_yes_no
from .grading import grade_equal

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _item(path: Path, line: int, record: dict) -> Item:
    question = require_field(path, line, record, "question", str)
    item_id = str(record.get("id", f"mcq-{line}"))
    if "choices" in record:
        choices = require_field(path, line, record, "choices", list)
        if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{path}:{line}: field 'choices' must be a list of 2 to 26 option strings")
        answer = require_field(path, line, record, "answer", int)
        if isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f"{path}:{line}: field 'answer' must be an option index from 0 to {len(choices) - 1}")
        options = "\n".join(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices))
        return Item(id=item_id, question=f"{question}\n{options}", target=LETTERS[answer], choices=tuple(choices))
    answer = require_field(path, line, record, "answer", bool)
    return Item(id=item_id, question=question, target="yes" if answer else "no")


def _instruction(item: Item) -> str:
    if item.choices:
        return 'Pick one option and end with "The answer is X." where X is its letter.'
    return 'Answer yes or no and end with "The answer is yes." or "The answer is no."'


def _labels(item: Item) -> list[str]:
    return list(LETTERS[: len(item.choices)]) if item.choices else ["yes", "no"]


def _grade(item: Item, response: str) -> Grade:
    if item.choices:
        return grade_equal(item, extract_choice(response, list(item.choices)), "option")
    return grade_equal(item, extract_yes_no(response), "yes/no answer")


@register_task("mcq", "multiple choice (CommonsenseQA form) or yes/no (BoolQ form) from --data JSONL")
def mcq(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("mcq", options, set())
    if data is None:
        raise UserError("--task mcq needs --data PATH to a JSONL file (question, choices, answer)")
    items = require_items([_item(data, line, record) for line, record in read_jsonl(data)], str(data))
    return Task(
        name="mcq",
        items=items,
        instruction=_instruction,
        grade=_grade,
        labels=_labels,
        max_tokens=192,
        identity={"task": "mcq", **file_identity(data)},
    )
