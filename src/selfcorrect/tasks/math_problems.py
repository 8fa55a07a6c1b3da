"""MATH-style competition problems with LaTeX answers, graded for equivalence by math-verify.

From a JSONL file whose records have `problem` and either `answer` (LaTeX) or `solution` (with the answer
in its last \\boxed{}), or from the Hub (HuggingFaceH4/MATH-500) when online.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Item, Task, file_identity, read_jsonl, register_task, reject_unknown_options, require_field
from .base import require_items
from .extract import last_boxed
from .grading import grade_math
from .hub import load_hub_rows

INSTRUCTION = "Solve it step by step and put the final answer in \\boxed{}."


def _target(record: dict) -> str | None:
    if isinstance(record.get("answer"), str) and record["answer"].strip():
        return record["answer"].strip()
    if isinstance(record.get("solution"), str):
        return last_boxed(record["solution"])
    return None


def boxed_answer(target: str) -> str:
    """A gold answer stated as the instruction asks, for data that holds no worked solution."""
    return f"The answer is $\\boxed{{{target}}}$."


def _solution(record: dict, target: str) -> str:
    """The reference solution (its answer is in its last \\boxed{}, as the instruction asks), else the answer alone."""
    if isinstance(record.get("solution"), str) and record["solution"].strip():
        return record["solution"].strip()
    return boxed_answer(target)


def _items_from_file(path: Path) -> list[Item]:
    items = []
    for line, record in read_jsonl(path):
        problem = require_field(path, line, record, "problem", str)
        target = _target(record)
        if target is None:
            raise UserError(f"{path}:{line}: needs a field 'answer' (LaTeX) or a 'solution' with a \\boxed{{}} answer")
        item_id = str(record.get("id", record.get("unique_id", f"math-{line}")))
        items.append(Item(item_id, problem, target, solution=_solution(record, target)))
    return require_items(items, str(path))


def _items_from_hub() -> list[Item]:
    rows = load_hub_rows("HuggingFaceH4/MATH-500", None, "test", task="math")
    return [Item(r["unique_id"], r["problem"], r["answer"], solution=_solution(r, r["answer"])) for r in rows]


@register_task(
    "math", "MATH-style problems with LaTeX answers (--data JSONL, or MATH-500 from the Hub)",
    grader="math (math-verify)", answer="LaTeX, \\boxed{} preferred",
)
def math_problems(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("math", options, set())
    items = _items_from_file(data) if data is not None else _items_from_hub()
    identity = file_identity(data) if data is not None else {"hub": "HuggingFaceH4/MATH-500:test"}
    return Task(
        name="math",
        items=items,
        instruction=lambda item: INSTRUCTION,
        grade=grade_math,
        max_tokens=512,
        identity={"task": "math", **identity},
    )
