"""GSM8K grade-school maths: from a JSONL file (`question`, `answer` ending in `#### N`) or the Hub."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .base import Item, Task, answer_sentence, file_identity, read_jsonl, register_task, reject_unknown_options
from ..protocols import YANG2025, YANG2025_SYSTEM, prompt_style
from .base import require_field, require_items
from .extract import canonical_number
from .grading import grade_number
from .hub import load_hub_rows


def _target(solution: str) -> str | None:
    """The number after the final '####' of a GSM8K solution."""
    if "####" not in solution:
        return None
    return canonical_number(solution.rsplit("####", 1)[1].strip())


# GSM8K's calculator annotations, "<<16-3-4=9>>" before the result they computed: not text a model writes.
_CALCULATOR = re.compile(r"<<.*?>>")


def _solution(reference: str) -> str | None:
    """The reference solution as a reply in the answer format the instruction asks for: its calculator
    annotations removed and the final '#### N' line turned into "The answer is N."."""
    if "####" not in reference:
        return None
    working, _, final = reference.rpartition("####")
    working = _CALCULATOR.sub("", working).strip()
    return f"{working}\n{answer_sentence(final.strip())}" if working else answer_sentence(final.strip())


def _items_from_file(path: Path) -> list[Item]:
    items = []
    for line, record in read_jsonl(path):
        question = require_field(path, line, record, "question", str)
        reference = require_field(path, line, record, "answer", str)
        target = _target(reference)
        if target is None:
            raise UserError(f"{path}:{line}: field 'answer' must end with '#### <number>' as in GSM8K")
        items.append(Item(str(record.get("id", f"gsm8k-{line}")), question, target, solution=_solution(reference)))
    return require_items(items, str(path))


def _items_from_hub() -> list[Item]:
    rows = load_hub_rows("openai/gsm8k", "main", "test", task="gsm8k")
    return [
        Item(f"gsm8k-{i + 1}", r["question"], _target(r["answer"]) or "", solution=_solution(r["answer"]))
        for i, r in enumerate(rows)
    ]


@register_task(
    "gsm8k", "GSM8K maths word problems (--data JSONL, or the Hub when online)", grader="number", answer="a number"
)
def gsm8k(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("gsm8k", options, {"prompt"})
    style = prompt_style("gsm8k", options)
    items = _items_from_file(data) if data is not None else _items_from_hub()
    identity = file_identity(data) if data is not None else {"hub": "openai/gsm8k:main:test"}
    if style == YANG2025:  # the question alone (selfcorrect.protocols)
        return Task(name="gsm8k", items=items, instruction=lambda item: "", grade=grade_number, max_tokens=2048,
                    identity={"task": "gsm8k", **identity, "prompt": style}, system=YANG2025_SYSTEM)
    return Task(
        name="gsm8k",
        items=items,
        instruction=lambda item: 'Solve it step by step, then end with "The answer is N." where N is a number.',
        grade=grade_number,
        max_tokens=320,
        identity={"task": "gsm8k", **identity},
    )
