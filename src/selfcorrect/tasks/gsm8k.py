"""GSM8K grade-school maths: from a JSONL file (`question`, `answer` ending in `#### N`) or the Hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Item, Task, file_identity, read_jsonl, register_task, reject_unknown_options, require_field
from .base import require_items
from .extract import canonical_number
from .grading import grade_number
from .hub import load_hub_rows


def _target(solution: str) -> str | None:
    """The number after the final '####' of a GSM8K solution."""
    if "####" not in solution:
        return None
    return canonical_number(solution.rsplit("####", 1)[1].strip())


def _items_from_file(path: Path) -> list[Item]:
    items = []
    for line, record in read_jsonl(path):
        question = require_field(path, line, record, "question", str)
        target = _target(require_field(path, line, record, "answer", str))
        if target is None:
            raise UserError(f"{path}:{line}: field 'answer' must end with '#### <number>' as in GSM8K")
        items.append(Item(id=str(record.get("id", f"gsm8k-{line}")), question=question, target=target))
    return require_items(items, str(path))


def _items_from_hub() -> list[Item]:
    rows = load_hub_rows("openai/gsm8k", "main", "test", task="gsm8k")
    return [Item(id=f"gsm8k-{i + 1}", question=r["question"], target=_target(r["answer"]) or "") for i, r in enumerate(rows)]


@register_task(
    "gsm8k", "GSM8K maths word problems (--data JSONL, or the Hub when online)", grader="number", answer="a number"
)
def gsm8k(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("gsm8k", options, set())
    items = _items_from_file(data) if data is not None else _items_from_hub()
    identity = file_identity(data) if data is not None else {"hub": "openai/gsm8k:main:test"}
    return Task(
        name="gsm8k",
        items=items,
        instruction=lambda item: 'Solve it step by step, then end with "The answer is N." where N is a number.',
        grade=grade_number,
        max_tokens=320,
        identity={"task": "gsm8k", **identity},
    )
