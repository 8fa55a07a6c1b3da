"""Your own data: a JSONL, CSV or Parquet file (or a Hugging Face dataset id) with a field mapping and
a grader chosen by name, or inferred from the data when none is named (`infer_grader`).

An item's gold solution (the target of training rows) is its `solution` column, taken as written, when the data
has one (`--field solution=COLUMN` names another); else the answer stated as the grader's instruction asks ("The
answer is X.", or in \\boxed{} for math); code items without a solution column have none.

    selfcorrect run --task custom --data quiz.csv --field question=q,answer=a --grader number
    selfcorrect run --task custom --data hf:allenai/ai2_arc:ARC-Easy@test \\
        --field question=question,choices=choices.text,answer=answerKey --grader choice
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from .base import Grade, Item, Task, answer_sentence, file_identity, read_records, register_task
from .base import reject_unknown_options, require_items
from .code import run_alone_feedback
from .extract import canonical_number
from .grading import grade_math, grade_number
from .hub import load_hub_rows
from .math_problems import boxed_answer
from .mcq import LETTERS, format_options, grade_option, option_labels

GRADERS = ("exact", "number", "math", "choice", "code")
DEFAULT_FIELDS = {"question": "question", "answer": "answer", "choices": "choices", "id": "id"}
# The gold solution's column: optional, and not part of the task's identity (a solution changes no item and no
# grade), so it is kept out of DEFAULT_FIELDS, whose mapping is in every custom run's id.
SOLUTION_FIELD = "solution"
INSTRUCTIONS = {
    "exact": 'End with "The answer is X." where X is your answer.',
    "number": 'End with "The answer is N." where N is a number.',
    "math": "Put the final answer in \\boxed{}.",
    "choice": 'Pick one option and end with "The answer is X." where X is its letter.',
    "code": "Write the solution as one Python code block.",
}


def parse_fields(spec: str) -> dict[str, str]:
    """'question=q,answer=a' -> the full mapping, unnamed fields keeping their default column names; `solution`
    is in it only when named."""
    fields = dict(DEFAULT_FIELDS)
    names = [*DEFAULT_FIELDS, SOLUTION_FIELD]
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, column = pair.partition("=")
        if not sep or name not in names or not column:
            raise UserError(f"--field {pair}: expected NAME=COLUMN with NAME one of {', '.join(names)}")
        fields[name] = column
    return fields


def _value(record: dict, column: str):
    """record[column], where 'a.b' reaches into nested records (Hub datasets nest choices)."""
    value = record
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _choices(raw, where: str, column: str) -> tuple[str, ...]:
    if isinstance(raw, str) and raw.strip().startswith("["):  # CSV: a JSON list or options separated by |
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}: field '{column}' (the choices) starts with '[' but is not a JSON list ({err.msg}); "
                'write it as ["a", "b", "c"] or as a|b|c'
            ) from None
    elif isinstance(raw, str):
        raw = raw.split("|")
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
        raise UserError(f"{where}: choices must be a list of 2 to 26 options (in CSV: a JSON list or a|b|c)")
    return tuple(str(choice).strip() for choice in raw)


def _choice_target(answer, choices: tuple[str, ...], where: str) -> str:
    """An answer given as an index, a letter or the option's text, as the option's letter."""
    text = str(answer).strip()
    if text.isdigit() and int(text) < len(choices):
        return LETTERS[int(text)]
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return text.upper()
    if text in choices:
        return LETTERS[choices.index(text)]
    raise UserError(f"{where}: answer {text!r} is not an option index, letter or option text")


# A LaTeX-ish answer: a command (\\frac, \\sqrt, \\pi ...), a power, a subscript, $...$, or a bare fraction 3/4.
_MATH_MARK = re.compile(r"\\[A-Za-z]+|\^|_\{|\$[^$]+\$|^\s*-?\d+\s*/\s*\d+\s*$")


def _is_number(answer) -> bool:
    """A plain number such as 8, -3.5, 1,000, $5 or 40% (not nan, inf or 1e5, which float() also reads)."""
    text = str(answer).strip()
    return bool(re.search(r"\d", text)) and not re.search(r"[A-Za-z]", text) and canonical_number(text) is not None


def infer_grader(records: list[dict], fields: dict[str, str], choices_mapped: bool) -> str:
    """The grader for data given without --grader, from all its records (not only the first --limit):
    `choice` when choices are mapped with --field or any record has a value in the `choices` column; else
    `number` when every answer is a number; else `math` when every answer is a number or LaTeX-ish (\\frac,
    \\sqrt, ^, $ ...) and some are LaTeX-ish; else `exact`. Never `code`: running model-written code is asked for."""
    if choices_mapped or any(str(_value(record, fields["choices"]) or "").strip() for record in records):
        return "choice"
    answers = [answer for answer in (_value(record, fields["answer"]) for record in records)
               if answer is not None and str(answer).strip() != ""]
    if not answers:
        return "exact"  # nothing to infer from; the items' own checks name what is missing
    if all(_is_number(answer) for answer in answers):
        return "number"
    if all(_is_number(answer) or _MATH_MARK.search(str(answer)) for answer in answers):
        return "math"
    return "exact"


def _named(grader: str, inferred: bool) -> str:
    return f"the {grader} grader (inferred from the data; --grader chooses another)" if inferred else f"--grader {grader}"


def _solution(record: dict, column: str, grader: str, target: str) -> str | None:
    """The record's solution column as written, else the target stated as the grader's instruction asks (None for
    code: its target is tests, not a solution)."""
    given = _value(record, column)
    if given is not None and str(given).strip():
        return str(given)
    if grader == "code":
        return None
    return boxed_answer(target) if grader == "math" else answer_sentence(target)


def _item(number: int, record: dict, fields: dict[str, str], grader: str, source: str, inferred: bool = False) -> Item:
    item = _question_and_target(number, record, fields, grader, f"{source}:{number}", inferred)
    return replace(item, solution=_solution(record, fields.get(SOLUTION_FIELD, SOLUTION_FIELD), grader, item.target))


def _question_and_target(number: int, record: dict, fields: dict[str, str], grader: str, where: str,
                         inferred: bool) -> Item:
    question, answer = _value(record, fields["question"]), _value(record, fields["answer"])
    for name, value in (("question", question), ("answer", answer)):
        if value is None or str(value).strip() == "":
            raise UserError(f"{where}: no value in column '{fields[name]}' for {name}; map it with --field {name}=COLUMN")
    raw_id = _value(record, fields["id"])
    item_id = str(raw_id) if raw_id is not None and str(raw_id) != "" else f"row-{number}"
    if grader == "choice":
        raw = _value(record, fields["choices"])
        if raw is None:
            raise UserError(f"{where}: {_named(grader, inferred)} needs options; map them with --field choices=COLUMN")
        choices = _choices(raw, where, fields["choices"])
        target = _choice_target(answer, choices, where)
        return Item(item_id, f"{question}\n{format_options(choices)}", target, choices)
    if grader == "number":
        target = canonical_number(str(answer))
        if target is None:
            raise UserError(f"{where}: answer {answer!r} is not a number, which {_named(grader, inferred)} needs")
        return Item(item_id, str(question), target)
    if grader == "code":
        return Item(item_id, str(question), _code_target(answer, where, fields["answer"]))
    return Item(item_id, str(question), str(answer).strip())


def _code_target(answer, where: str, column: str) -> str:
    """The tests of a --grader code item: the test code, or a JSON object {"setup": CODE, "tests": CODE} (as text
    starting with "{", or the object itself in JSONL and Parquet), checked here so a bad one fails before the run."""
    shape = 'a JSON object {"setup": CODE, "tests": CODE} ("setup" optional), or the test code itself'
    if isinstance(answer, list):  # MBPP's test_list: one assert per entry
        if not answer or not all(isinstance(test, str) for test in answer):
            raise UserError(f"{where}: field '{column}' (the tests) is a list: it must hold test code strings")
        return "\n".join(answer)
    if not isinstance(answer, (str, dict)):  # a number's text would run as a statement that asserts nothing
        raise UserError(f"{where}: field '{column}' (the tests) is a {type(answer).__name__}; give {shape}")
    if isinstance(answer, dict):
        spec, text = answer, None
    else:
        text = str(answer).strip()
        if not text.startswith("{"):
            return text
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}: field '{column}' (the tests) starts with '{{' but is not valid JSON ({err.msg}); "
                f"give {shape}"
            ) from None
    if not isinstance(spec.get("tests"), str) or not isinstance(spec.get("setup", ""), str):
        raise UserError(f"{where}: field '{column}' (the tests) needs string values in {shape}")
    if text is not None and "setup" in spec:
        return text
    return json.dumps({"setup": spec.get("setup", ""), "tests": spec["tests"]})  # the grader reads both keys


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".\"'`*").casefold())


def _stated_answer(response: str) -> str | None:
    """The text after the last "answer is"/"answer:", else the last non-empty line."""
    statements = re.findall(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", response, re.IGNORECASE)
    if statements:
        return statements[-1]
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else None


def grade_exact(item: Item, response: str) -> Grade:
    """The stated answer equals the target, ignoring case, runs of spaces and outer punctuation."""
    stated = _stated_answer(response)
    if stated is None:
        return Grade(None, False, "no answer found in the reply")
    answer, target = _normalise(stated), _normalise(item.target)
    relation = "equals" if answer == target else "differs from"
    return Grade(answer, answer == target, f"answer {answer!r} {relation} the target {item.target!r}")


def _grader(name: str):
    if name == "code":
        from .code import grade_code_with_tests

        return grade_code_with_tests
    return {"exact": grade_exact, "number": grade_number, "math": grade_math, "choice": grade_option}[name]


def _defining(fields: dict[str, str]) -> dict[str, str]:
    """The mapping of the fields that define the items: all but the solution's column."""
    return {name: column for name, column in fields.items() if name != SOLUTION_FIELD}


@register_task(
    "custom", "your own JSONL/CSV/Parquet or hf:DATASET, with --field and --grader",
    grader="--grader", answer="as the grader expects",
)
def custom(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("custom", options, {"fields", "grader"})
    grader = options.get("grader")
    if grader is not None and grader not in GRADERS:
        raise UserError(f"--grader {grader}: choose one of {', '.join(GRADERS)}")
    fields = parse_fields(options.get("fields", ""))
    if data is None:
        raise UserError("--task custom needs --data PATH (JSONL, CSV, Parquet) or --data hf:DATASET[:CONFIG][@SPLIT]")
    if str(data).startswith("hf:"):
        name, _, split = str(data).removeprefix("hf:").partition("@")
        dataset, _, config = name.partition(":")
        rows = load_hub_rows(dataset, config or None, split or "test", task="custom")
        source, identity = str(data), {"hub": str(data)}
        records = list(enumerate(rows, start=1))
    else:
        source, identity = str(data), file_identity(data) if data.is_file() else {}
        records = list(read_records(data))
    # No silent default: without --grader the data chooses it, and the run's config says it was inferred (the
    # report's header shows it). The flag changes no grade, so it is left out of the run id (tasks.NOT_DEFINING).
    inferred = grader is None
    if inferred:
        choices_mapped = any(pair.strip().startswith("choices=") for pair in options.get("fields", "").split(","))
        grader = infer_grader([record for _, record in records], fields, choices_mapped)
        identity = {**identity, "grader_inferred": True}
    items = require_items(
        [_item(number, record, fields, grader, source, inferred) for number, record in records], source
    )
    return Task(
        name="custom",
        items=items,
        instruction=lambda item: INSTRUCTIONS[grader],
        grade=_grader(grader),
        max_tokens=512 if grader in ("math", "code") else 256,
        labels=option_labels if grader == "choice" else None,
        # The tests are the hidden target, not shown in the question: feedback can only run the code alone.
        execution_feedback=run_alone_feedback if grader == "code" else None,
        identity={"task": "custom", "grader": grader, "fields": _defining(fields), **identity},
    )
