"""Multiple choice (CommonsenseQA form) and yes/no questions (BoolQ form) from a JSONL file.

A record with `choices` (a list of option texts) and an integer `answer` index is multiple choice; a record
without `choices` whose `answer` is true/false is a yes/no question. Both forms may share one file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..protocols import (YANG2025, YANG2025_ANSWER_PREFIX, YANG2025_SYSTEM, boxed_letter, first_true_or_false, prompt_style,
                         yang2025_multiple_choice, yang2025_stated_answer, yang2025_true_false)
from .base import Grade, Item, Task, answer_sentence, file_identity, read_jsonl, register_task, reject_unknown_options
from .base import require_field, require_items
from .extract import extract_choice, extract_yes_no
from .grading import grade_equal

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_options(choices) -> str:
    """'A. first\nB. second ...': how options are shown under the question."""
    return "\n".join(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices))


def _item(path: Path, line: int, record: dict) -> Item:
    question = require_field(path, line, record, "question", str)
    item_id = str(record.get("id", f"mcq-{line}"))
    if "choices" not in record:
        target = "yes" if require_field(path, line, record, "answer", bool) else "no"
        return Item(item_id, question, target, solution=answer_sentence(target))
    choices, answer_index = _choices_and_answer(path, line, record)
    target = LETTERS[answer_index]
    return Item(item_id, f"{question}\n{format_options(choices)}", target, tuple(choices), answer_sentence(target))


def _choices_and_answer(path: Path, line: int, record: dict) -> tuple[list[str], int]:
    """Options and the gold index from the CommonsenseQA/MMLU form (`choices` list, `answer` index or
    letter) or the ARC form (`choices` {"text": [...], "label": [...]}, `answerKey` label)."""
    raw = require_field(path, line, record, "choices", (list, dict))
    if isinstance(raw, dict):  # ARC
        choices, labels = raw.get("text"), raw.get("label")
        key = require_field(path, line, record, "answerKey", str)
        if not isinstance(labels, list) or key not in labels:
            raise UserError(f"{path}:{line}: field 'answerKey' {key!r} is not one of choices.label")
        answer = labels.index(key)
    else:
        choices, answer = raw, require_field(path, line, record, "answer", (int, str))
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
            answer = LETTERS.index(answer.upper())
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{path}:{line}: field 'choices' must be a list of 2 to 26 option strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise UserError(f"{path}:{line}: field 'answer' must be an option index from 0 to {len(choices) - 1} or its letter")
    return choices, answer


def _instruction(item: Item) -> str:
    if item.choices:
        return 'Pick one option and end with "The answer is X." where X is its letter.'
    return 'Answer yes or no and end with "The answer is yes." or "The answer is no."'


def option_labels(item: Item) -> list[str]:
    return list(LETTERS[: len(item.choices)]) if item.choices else ["yes", "no"]


def grade_option(item: Item, response: str) -> Grade:
    if item.choices:
        return grade_equal(item, extract_choice(response, list(item.choices)), "option")
    return grade_equal(item, extract_yes_no(response), "yes/no answer")


@register_task(
    "mcq", "multiple choice (CommonsenseQA, MMLU/ARC form) or yes/no (BoolQ form) from --data JSONL",
    grader="choice", answer="option letter, or yes/no", multiple_choice=True,
)
def mcq(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("mcq", options, {"prompt"})
    style = prompt_style("mcq", options)
    if data is None:
        raise UserError("--task mcq needs --data PATH to a JSONL file (question, choices, answer)")
    if style == YANG2025:
        return _yang2025_task(data)
    items = require_items([_item(data, line, record) for line, record in read_jsonl(data)], str(data))
    return Task(
        name="mcq",
        items=items,
        instruction=_instruction,
        grade=grade_option,
        labels=option_labels,
        max_tokens=192,
        identity={"task": "mcq", **file_identity(data)},
    )


# ----- Yang et al.'s wording (selfcorrect.protocols): their prompts, BoolQ as true/false, "The answer is: X" -----


def _yang2025_item(path: Path, line: int, record: dict) -> Item:
    question = require_field(path, line, record, "question", str)
    item_id = str(record.get("id", f"mcq-{line}"))
    if "choices" not in record:
        target = "true" if require_field(path, line, record, "answer", bool) else "false"
        return Item(item_id, yang2025_true_false(question), target, solution=yang2025_stated_answer(target))
    choices, answer_index = _choices_and_answer(path, line, record)
    subject = record.get("subject") if isinstance(record.get("subject"), str) else None
    target = LETTERS[answer_index]
    return Item(item_id, yang2025_multiple_choice(question, choices, subject), target, tuple(choices),
                yang2025_stated_answer(target))


def _yang2025_labels(item: Item) -> list[str]:
    return list(LETTERS[: len(item.choices)]) if item.choices else ["false", "true"]  # the paper's order


def _yang2025_grade(item: Item, response: str) -> Grade:
    if item.choices:  # the paper's \boxed{X} first, then the forms our own grader reads
        letter = boxed_letter(response, LETTERS[: len(item.choices)]) or extract_choice(response, list(item.choices))
        return grade_equal(item, letter, "option")
    return grade_equal(item, first_true_or_false(response), "true/false answer")


def _yang2025_task(data: Path) -> Task:
    items = require_items([_yang2025_item(data, line, record) for line, record in read_jsonl(data)], str(data))
    return Task(
        name="mcq",
        items=items,
        instruction=lambda item: "",  # the question carries the paper's own request
        grade=_yang2025_grade,
        labels=_yang2025_labels,
        max_tokens=2048,
        identity={"task": "mcq", **file_identity(data), "prompt": YANG2025},
        system=YANG2025_SYSTEM,
        answer_prefix=YANG2025_ANSWER_PREFIX,
        stated_answer=yang2025_stated_answer,
    )
