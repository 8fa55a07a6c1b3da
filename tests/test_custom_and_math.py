"""Bring-your-own data (JSONL, CSV, Parquet with a field mapping and a named grader), the MATH task, and
`selfcorrect grade`, with the edge cases graders meet in real replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task

from conftest import run_cli

MATH = Path(__file__).parent / "fixtures" / "math_problems.jsonl"
ROWS = [
    {"qid": "a", "q": "How many legs has a spider?", "a": "8", "opts": ["six", "eight", "ten"], "letter": "B",
     "text": "eight"},
    {"qid": "b", "q": "What colour is snow?", "a": "white", "opts": ["white", "green"], "letter": "0",
     "text": "white"},
]


def _custom(path, fields, grader):
    return load_task("custom", path, {"fields": fields, "grader": grader})


def test_jsonl_csv_and_parquet_give_the_same_items(tmp_path):
    import pyarrow
    import pyarrow.parquet

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("qid,q,a,opts,letter,text\n" + "\n".join(
        f'{r["qid"]},{r["q"]},{r["a"]},{"|".join(r["opts"])},{r["letter"]},{r["text"]}' for r in ROWS) + "\n")
    parquet = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), parquet)
    loaded = [_custom(p, "id=qid,question=q,answer=letter,choices=opts", "choice").items for p in (jsonl, csv_path, parquet)]
    assert loaded[0] == loaded[1] == loaded[2]
    assert [(i.id, i.target) for i in loaded[0]] == [("a", "B"), ("b", "A")]
    assert "\nB. eight" in loaded[0][0].question


def test_named_graders(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    exact = _custom(data, "question=q,answer=a", "exact")
    spider = exact.items[0]
    assert exact.grade(spider, "Spiders have eight legs. The answer is 8.").correct
    snow = exact.items[1]
    assert exact.grade(snow, "The answer is **White**.").correct
    assert not exact.grade(snow, "The answer is white and grey.").correct
    with pytest.raises(UserError, match=r"d.jsonl:2: answer 'white' is not a number"):
        _custom(data, "question=q,answer=a", "number")
    numbers = tmp_path / "n.jsonl"
    numbers.write_text(json.dumps(ROWS[0]))
    number = _custom(numbers, "question=q,answer=a", "number")
    assert number.grade(number.items[0], "The answer is 8 legs").correct
    choice = _custom(data, "question=q,answer=text,choices=opts", "choice")
    assert choice.labels(choice.items[0]) == ["A", "B", "C"]
    assert choice.grade(choice.items[0], "The answer is B.").correct  # answer given as the option's text


@pytest.mark.parametrize(
    "fields, grader, message",
    [
        ("question=nope", "exact", "d.jsonl:1: no value in column 'nope' for question; map it with --field question=COLUMN"),
        ("question=q,answer=a", "choice", "d.jsonl:1: --grader choice needs options"),
        ("question=q,answer=q,choices=opts", "choice", "d.jsonl:1: answer 'How many legs has a spider?' is not an option index"),
        ("colour=q", "exact", "--field colour=q: expected NAME=COLUMN"),
        ("question=q,answer=a", "fuzzy", "--grader fuzzy: choose one of"),
    ],
)
def test_custom_errors_name_the_place(tmp_path, fields, grader, message):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(UserError) as raised:
        _custom(data, fields, grader)
    assert message in str(raised.value)


def test_unknown_file_type_and_offline_hub(tmp_path, monkeypatch):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown file type '.xlsx'"):
        _custom(tmp_path / "d.xlsx", "", "exact")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="pass --data PATH"):
        _custom(Path("hf:allenai/ai2_arc:ARC-Easy@test"), "", "choice")


@pytest.mark.parametrize(
    "item, reply, correct",
    [
        ("frac", "So the sum is \\boxed{\\frac34}.", True),
        ("frac", "The answer is 0.75.", True),
        ("frac", "The answer is $\\frac{3}{5}$", False),
        ("sqrt", "$\\sqrt{8} = \\boxed{2\\sqrt2}$", True),
        ("interval", "The answer is $(-2, 2)$.", True),
        ("interval", "\\boxed{[-2,2]}", False),  # closed is not open
        ("neg", "The answer is \u22122.", True),  # unicode minus; target from the solution's \boxed{}
        ("units", "The perimeter is \\boxed{12 \\text{ cm}}.", True),
        ("big", "The answer is 1,000.", True),
        ("big", "I don't know.", False),
        ("big", "", False),
    ],
)
def test_math_equivalence(item, reply, correct):
    task = load_task("math", MATH)
    items = {i.id: i for i in task.items}
    verdict = task.grade(items[item], reply)
    assert verdict.correct is correct, verdict.reason


def test_math_runs_end_to_end_on_the_embedded_model(tmp_path, embedded):
    run = evaluate(task="math", data=MATH, limit=2, rounds=1, backend=embedded, db=tmp_path / "r.sqlite")
    assert run.report()["n_items"] == 2 and len(run.turns) == 4
    assert all(turn.reason for turn in run.turns)


def test_grade_command(tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text("Adding: 1/2 + 1/4 = \\boxed{\\frac{3}{4}}")
    done = run_cli("grade", "--task", "math", "--data", str(MATH), "--item", "frac", "--response", str(reply))
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["correct"] is True and verdict["answer"] == "\\frac{3}{4}" and "equivalent" in verdict["reason"]
    wrong = json.loads(run_cli("grade", "--task", "arithmetic", "--item", "arith-0", "--response", str(reply)).stdout)
    assert wrong["correct"] is False and wrong["answer"] == "4"  # the last number in the box
    missing = run_cli("grade", "--task", "math", "--data", str(MATH), "--item", "zzz", "--response", str(reply))
    assert missing.returncode == 2 and "--item zzz: no such item" in missing.stderr


def test_custom_csv_runs_end_to_end_on_the_embedded_model(tmp_path, embedded):
    data = tmp_path / "quiz.csv"
    data.write_text("q,a\nWhat is 2 + 2?,4\nWhat is 3 + 3?,6\n")
    run = evaluate(task="custom", data=data, task_options={"fields": "question=q,answer=a", "grader": "number"},
                   limit=2, backend=embedded, db=tmp_path / "r.sqlite")
    assert run.report()["n_items"] == 2 and len(run.turns) == 4
    assert {turn.item_id for turn in run.turns} == {"row-2", "row-3"}
