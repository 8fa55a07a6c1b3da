"""Loading tasks: the shared data files, the arithmetic generator, and a clear error for each bad input."""

from __future__ import annotations

import pytest

from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task
from selfcorrect.tasks.arithmetic import generate_items


def test_gsm8k_file_loads_with_numeric_targets(shared_data):
    task = load_task("gsm8k", shared_data / "gsm8k_test.jsonl")
    assert len(task.items) == 1319
    first = task.items[0]
    # The first GSM8K test problem (Janet's ducks) has answer 18.
    assert "Janet" in first.question and first.target == "18"
    assert all(item.target.lstrip("-").replace(".", "").isdigit() for item in task.items)
    grade = task.grade(first, "So she makes $18 every day. The answer is 18.")
    assert (grade.answer, grade.correct) == ("18", True)
    assert task.grade(first, "No idea.").reason == "no number found in the reply"


def test_commonsense_qa_items_carry_lettered_options(shared_data):
    task = load_task("mcq", shared_data / "commonsense_qa.jsonl")
    assert len(task.items) == 1221
    item = task.items[0]
    assert len(item.choices) == 5 and item.target in "ABCDE"
    assert "\nA. " in item.question and "\nE. " in item.question
    right = item.choices["ABCDE".index(item.target)]
    assert task.grade(item, f"The answer is {item.target}.").correct
    assert task.grade(item, f"I would say {right}.").correct


def test_boolq_items_are_yes_no(shared_data):
    task = load_task("mcq", shared_data / "boolq.jsonl")
    assert len(task.items) == 3270
    targets = {item.target for item in task.items}
    assert targets == {"yes", "no"}
    item = task.items[0]
    grade = task.grade(item, f"{item.target.capitalize()}, that is right.")
    assert (grade.answer, grade.correct) == (item.target, True)


def test_arithmetic_targets_are_computed_and_seeded():
    items = generate_items(n=200, digits=2, operands=3, operators="+-*", seed=5)
    for item in items:
        expression = item.question.removeprefix("What is ").removesuffix("?")
        terms = expression.split()
        assert len(terms) == 5 and all(10 <= int(t) <= 99 for t in terms[::2])
        # Recompute by hand-rolled precedence rather than eval, to check the generator's ground truth.
        values, ops = [int(terms[0])], []
        for op, num in zip(terms[1::2], terms[2::2]):
            if op == "*":
                values[-1] *= int(num)
            else:
                ops.append(op)
                values.append(int(num))
        total = values[0]
        for op, value in zip(ops, values[1:]):
            total = total + value if op == "+" else total - value
        assert item.target == str(total)
    assert generate_items(200, 2, 3, "+-*", 5) == items
    assert generate_items(200, 2, 3, "+-*", 6) != items


def test_arithmetic_options_change_the_items():
    default = load_task("arithmetic")
    harder = load_task("arithmetic", options={"digits": "3", "n": "10"})
    assert len(default.items) == 100 and len(harder.items) == 10
    assert default.identity != harder.identity


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("nope", {}, "--task nope: unknown task"),
        ("arithmetic", {"digits": "x"}, "--task-opt digits=x: must be a whole number"),
        ("arithmetic", {"operators": "/"}, "--task-opt operators=/"),
        ("arithmetic", {"colour": "red"}, "--task-opt colour: task 'arithmetic' has no such option"),
        ("mcq", {}, "--task mcq needs --data"),
    ],
)
def test_bad_task_arguments(name, options, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("*", r"\*")):
        load_task(name, None, options)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "task, lines, message",
    [
        ("gsm8k", ['{"question": "a", "answer": "#### 1"}', '{"question": "b", "answer": '], ":2: not valid JSON"),
        ("gsm8k", ['{"question": "a", "answer": "#### 1"}', '{"answer": "#### 2"}'], ":2: record has no field 'question'"),
        ("gsm8k", ['{"question": "a", "answer": "no marker"}'], ":1: field 'answer' must end with '#### <number>'"),
        ("gsm8k", ['{"question": 5, "answer": "#### 1"}'], ":1: field 'question' must be str"),
        ("gsm8k", ["[1, 2]"], ":1: expected a JSON object"),
        ("gsm8k", ["", "  "], "no items found"),
        ("mcq", ['{"question": "q", "choices": ["x", "y"], "answer": 2}'], ":1: field 'answer' must be an option index from 0 to 1"),
        ("mcq", ['{"question": "q", "answer": "yes"}'], ":1: field 'answer' must be bool"),
        ("mcq", ['{"id": "a", "question": "q", "answer": true}', '{"id": "a", "question": "r", "answer": false}'], "item id 'a' appears twice"),
    ],
)
def test_bad_data_names_file_line_and_field(tmp_path, task, lines, message):
    path = _write(tmp_path / "data.jsonl", lines)
    with pytest.raises(UserError) as raised:
        load_task(task, path)
    text = str(raised.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_task("gsm8k", tmp_path / "absent.jsonl")


def test_gsm8k_without_data_offline_says_to_pass_data(monkeypatch):
    # Force the Hub path to fail the way it does offline, whether or not `datasets` is installed.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="pass --data PATH"):
        load_task("gsm8k")


def test_arithmetic_questions_are_distinct_and_bounded():
    items = generate_items(n=162, digits=1, operands=2, operators="+-", seed=0)  # every possible one
    assert len({item.question for item in items}) == 162
    with pytest.raises(UserError, match="only 162 distinct problems"):
        load_task("arithmetic", options={"n": "163"})
