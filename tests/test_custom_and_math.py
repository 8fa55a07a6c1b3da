"""Bring-your-own data (JSONL, CSV, Parquet with a field mapping and a named or inferred grader), the MATH
task, and `selfcorrect grade`, with the edge cases graders meet in real replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfcorrect import evaluate, load_run
from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task

from conftest import ScriptedBackend, check_turns, cli

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
    """Every turn graded by math-verify as `grade` grades its reply; the reask continues the conversation."""
    run = evaluate(task="math", data=MATH, limit=2, rounds=1, backend=embedded, db=tmp_path / "r.sqlite")
    assert run.report()["n_items"] == 2 and len(run.turns) == 4
    assert all(turn.reason for turn in run.turns)
    check_turns(load_task("math", MATH), run)


def test_grade_command(tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text("Adding: 1/2 + 1/4 = \\boxed{\\frac{3}{4}}")
    done = cli("grade", "--task", "math", "--data", str(MATH), "--item", "frac", "--response", str(reply))
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["correct"] is True and verdict["answer"] == "\\frac{3}{4}" and "equivalent" in verdict["reason"]
    wrong = json.loads(cli("grade", "--task", "arithmetic", "--item", "arith-0", "--response", str(reply)).stdout)
    assert wrong["correct"] is False and wrong["answer"] == "4"  # the last number in the box
    missing = cli("grade", "--task", "math", "--data", str(MATH), "--item", "zzz", "--response", str(reply))
    assert missing.returncode == 2 and "--item zzz: no such item" in missing.stderr


QUIZ = "q,a\nHow many legs has a spider?,8\nHow many days has a leap year?,366\nWhat is 1000 + 500?,\"1,500\"\n"


def test_without_grader_numeric_answers_are_graded_as_numbers(tmp_path):
    """No silent default: numeric answers without --grader are graded as numbers, so replies that state the
    right number the way models do ("8 legs", "1500" for "1,500") are right; `exact`, the old default,
    graded every one of them wrong. The task says the grader was inferred; otherwise it is --grader number's."""
    data = tmp_path / "quiz.csv"
    data.write_text(QUIZ)
    task = load_task("custom", data, {"fields": "question=q,answer=a"})
    spider, leap, total = task.items
    assert task.grade(spider, "A spider has 8 legs.").correct
    assert task.grade(leap, "The answer is 366 days.").correct
    assert task.grade(total, "1000 + 500 = 1500. The answer is 1500.").correct
    assert not task.grade(spider, "The answer is 6.").correct
    assert (task.identity["grader"], task.identity["grader_inferred"]) == ("number", True)
    given = load_task("custom", data, {"fields": "question=q,answer=a", "grader": "number"})
    assert given.items == task.items and task.identity == {**given.identity, "grader_inferred": True}


def test_without_grader_choices_mean_choice_latex_math_and_free_text_exact(tmp_path):
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text("\n".join(json.dumps(r) for r in ROWS))
    task = load_task("custom", mapped, {"fields": "question=q,answer=text,choices=opts"})  # choices mapped
    assert (task.identity["grader"], task.identity["grader_inferred"]) == ("choice", True)
    assert task.labels(task.items[0]) == ["A", "B", "C"] and task.grade(task.items[0], "The answer is B.").correct
    column = tmp_path / "column.jsonl"  # a column named `choices`, no --field for it
    column.write_text(json.dumps({"question": "Snow is", "choices": ["green", "white"], "answer": "white"}))
    task = load_task("custom", column, {})
    assert (task.identity["grader"], task.identity["grader_inferred"]) == ("choice", True)
    assert task.grade(task.items[0], "The answer is B.").correct and not task.grade(task.items[0], "A").correct
    latex = tmp_path / "latex.jsonl"  # LaTeX answers, with plain numbers among them
    latex.write_text(json.dumps({"question": "1/2 + 1/4?", "answer": "\\frac{3}{4}"}) + "\n"
                     + json.dumps({"question": "2 + 2?", "answer": "4"}))
    task = load_task("custom", latex, {})
    assert (task.identity["grader"], task.identity["grader_inferred"]) == ("math", True)
    assert task.grade(task.items[0], "So it is \\boxed{0.75}.").correct
    words = tmp_path / "words.jsonl"  # text, and numbers among it: exact
    words.write_text("\n".join(json.dumps(r) for r in ROWS))
    task = load_task("custom", words, {"fields": "question=q,answer=a"})
    assert (task.identity["grader"], task.identity["grader_inferred"]) == ("exact", True)
    assert task.grade(task.items[1], "The answer is **White**.").correct
    assert not task.grade(task.items[1], "The answer is white and grey.").correct


def test_an_explicit_grader_wins_over_the_data(tmp_path):
    data = tmp_path / "quiz.csv"
    data.write_text(QUIZ)
    exact = load_task("custom", data, {"fields": "question=q,answer=a", "grader": "exact"})
    assert exact.identity["grader"] == "exact" and "grader_inferred" not in exact.identity
    assert not exact.grade(exact.items[0], "A spider has 8 legs.").correct  # what exact does with it
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text("\n".join(json.dumps(r) for r in ROWS))
    text = load_task("custom", mapped, {"fields": "question=q,answer=text,choices=opts", "grader": "exact"})
    assert text.identity["grader"] == "exact" and text.labels is None
    assert text.items[0].question == "How many legs has a spider?"  # the options are not shown


def test_an_inferred_grader_is_the_same_run_as_the_same_grader_given(tmp_path):
    """How the grader was chosen is in the run's config, not in its id: the same grader grades alike, so
    `--grader number` resumes the run whose grader was inferred as number; another grader is another run."""
    data = tmp_path / "quiz.csv"
    data.write_text(QUIZ)
    db = tmp_path / "r.sqlite"

    def run(**options):
        return evaluate(task="custom", data=data, task_options={"fields": "question=q,answer=a", **options},
                        backend=ScriptedBackend(), db=db)

    inferred = run()
    assert inferred.config["task"]["grader_inferred"] is True and inferred.generated == 2 * 3
    given = run(grader="number")
    assert given.run_id == inferred.run_id and given.generated == 0
    assert run(grader="exact").run_id != inferred.run_id


def test_a_run_stored_before_inference_regrades_as_it_was_graded(tmp_path):
    """A custom run without --grader from before graders were inferred was graded with exact and has no
    `grader_inferred`; on free text exact is still what the data gives, so the run loads again and regrades."""
    import sqlite3

    from selfcorrect.api import regrade

    data = tmp_path / "words.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    db = tmp_path / "r.sqlite"
    run = evaluate(task="custom", data=data, task_options={"fields": "question=q,answer=a", "grader": "exact"},
                   backend=ScriptedBackend(), db=db)
    with sqlite3.connect(db) as connection:  # as that version stored it: no --grader among the options
        spec = json.loads(connection.execute("SELECT task_spec FROM runs").fetchone()[0])
        spec["options"].pop("grader")
        connection.execute("UPDATE runs SET task_spec = ?", (json.dumps(spec),))
    connection.close()
    summary = regrade(run.run_id, db, all_turns=True)
    assert (summary["regraded"], summary["changed"]) == (4, 0)


def test_custom_csv_without_grader_runs_end_to_end_on_the_embedded_model(tmp_path, embedded):
    """Through the command line, as a user would: the grader inferred from the data is in the run's config,
    every turn is graded as the number grader grades its reply, and the same run with --grader number (here
    through the API) is the same run: nothing is generated again."""
    data = tmp_path / "quiz.csv"
    data.write_text("q,a\nWhat is 2 + 2?,4\nWhat is 3 + 3?,6\n")
    db = tmp_path / "r.sqlite"
    done = cli("run", "--task", "custom", "--data", str(data), "--field", "question=q,answer=a", "--limit", "2",
               "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["config"]["task"]["grader"], report["config"]["task"]["grader_inferred"]) == ("number", True)
    run = load_run(report["run_id"], db)
    assert report["n_items"] == 2 and len(run.turns) == 4
    assert {turn.item_id for turn in run.turns} == {"row-2", "row-3"}
    check_turns(load_task("custom", data, {"fields": "question=q,answer=a", "grader": "number"}), run)
    again = evaluate(task="custom", data=data, task_options={"fields": "question=q,answer=a", "grader": "number"},
                     limit=2, backend=embedded, db=db)
    assert again.run_id == report["run_id"] and again.generated == 0
