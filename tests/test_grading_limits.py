"""Grading cannot hang a run: every grade has a time limit, enforced by killing a grading child process;
every grade carries the version of the graders that gave it; `selfcorrect regrade` grades stored replies
again with today's graders."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA, ScriptedBackend, cli, run_cli
from grading_plugin import HANG, RAISE, grade_by_sympy_loaded, grade_or_hang
from selfcorrect.api import evaluate, load_run
from selfcorrect.grader_pool import GraderPool
from selfcorrect.tasks import Grade, Item, grader_version
from selfcorrect.tasks.code import grade_code_with_tests, grade_humaneval
from selfcorrect.tasks.grading import grade_math, grade_number

FIXTURES = Path(__file__).parent / "fixtures"
ITEM = Item("sum-2", "What is 2 + 2?", "4")
# math-verify issue #65: parsing this never returns, and its own SIGALRM timeout cannot stop it (sympy
# raises 5 to a huge power inside C code, where no signal handler runs).
TOWER = r"The answer is \boxed{\dfrac{5^{\left(5^{\left(5^{\left(5^5\right)}\right)} - 4\right)} - 5}{16}}"


def _grading_children() -> list[int]:
    """Live child processes of this test process that are grading children."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"selfcorrect.grader_pool" in command:
            found.append(int(entry.name))
    return found


def _verdicts(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT item_id, sample, round, answer, correct, reason, extra FROM turns ORDER BY item_id, sample, round"
        ).fetchall()


def test_a_hanging_grade_is_a_timeout_the_run_completes_and_the_child_is_gone(tmp_path):
    pid_file = tmp_path / "grader.pid"

    def reply(messages, seed):
        n = int(messages[0]["content"].split()[2])
        if n == 1 and len(messages) == 1:  # the first answer to sum-1
            return f"{HANG} {pid_file}"
        return f"The answer is {2 * n}."

    db = tmp_path / "runs.sqlite"
    run = evaluate(task="hang-test", rounds=1, backend=ScriptedBackend(reply, identity="scripted:hang"), db=db,
                   grader_timeout=1.0)

    report = run.report()
    assert report["complete"] and report["grading"]["timeouts"] == 1
    turns = {(turn.item_id, turn.round): turn for turn in run.turns}
    hung = turns[("sum-1", 0)]
    assert (hung.answer, hung.correct, hung.reason, hung.extra) == (None, False, "grader timeout", {"grader_timeout": True})
    # The limit, not forever: a time limit, so time is checked, loosely above (a busy machine is slow to kill
    # and start a grading child), and the run above ended, which is what matters.
    assert 1.0 <= hung.latency_s < 30.0, hung.latency_s
    assert all(turn.correct for key, turn in turns.items() if key != ("sum-1", 0))
    assert {turn.grader_version for turn in run.turns} == {grader_version()}
    # The child that hung was killed, and the run closed the others.
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()
    assert _grading_children() == []
    shown = cli("report", run.run_id, "--db", str(db))
    assert shown.returncode == 0 and "1 grade timed out" in shown.stdout, shown.stdout + shown.stderr


def test_the_pool_re_raises_a_graders_error_and_grades_on():
    with GraderPool(10.0) as pool:
        grade = pool.limit(grade_or_hang)
        with pytest.raises(ValueError, match="gave up"):
            grade(ITEM, RAISE)
        assert grade(ITEM, "The answer is 4.").correct
    assert _grading_children() == []


def test_graders_a_child_cannot_run_and_the_code_graders_grade_in_the_calling_thread():
    with GraderPool(1.0) as pool:
        with pytest.warns(RuntimeWarning, match="without a time limit"):
            grade = pool.limit(lambda item, reply: Grade(reply, True, "graded here"))
        assert grade(ITEM, "4") == Grade("4", True, "graded here")
        # The sandbox bounds these itself, and kills the program at its own timeout.
        assert pool.limit(grade_humaneval) is grade_humaneval
        assert pool.limit(grade_code_with_tests) is grade_code_with_tests
    assert _grading_children() == []


def test_a_child_loads_the_maths_libraries_before_its_first_grade_and_only_for_maths():
    """sympy takes a second to import: a child of a pool that grades maths has it before it says it is ready
    (so the first grade's limit does not count it), and a child of one that does not is spared it."""
    with GraderPool(10.0) as pool:
        pool.limit(grade_number)
        assert pool.limit(grade_by_sympy_loaded)(ITEM, "").reason == "sympy not loaded"
    with GraderPool(10.0) as pool:
        pool.limit(grade_math)
        assert pool.limit(grade_by_sympy_loaded)(ITEM, "").reason == "sympy loaded"
    assert _grading_children() == []


def _maths_data(tmp_path: Path) -> Path:
    data = tmp_path / "maths.jsonl"
    rows = [{"id": "half", "question": "Write 1/2 as a fraction.", "answer": "\\frac{1}{2}"},
            {"id": "tower", "question": "Simplify the tower.", "answer": "1"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


# The engine grades in worker threads, where math-verify had no limit at all. Run in a process of its own,
# so that a regression fails the test at its timeout instead of hanging the test session.
ENGINE_RUN = """
import json, sys
from conftest import ScriptedBackend
from selfcorrect.api import evaluate

data, db, tower = sys.argv[1:]
replies = lambda messages, seed: tower if "tower" in messages[0]["content"] else "So the answer is \\\\boxed{0.5}."
run = evaluate(task="custom", data=data, task_options={"grader": "math"}, rounds=0, grader_timeout=5,
               backend=ScriptedBackend(replies, identity="scripted:tower"), db=db)
print(json.dumps({turn.item_id: [turn.correct, turn.reason] for turn in run.turns}))
"""


def test_math_verify_on_a_tower_of_powers_times_out_in_a_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_RUN, str(_maths_data(tmp_path)), str(tmp_path / "runs.sqlite"), TOWER],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The first grade (math-verify's import in the child included) fits in the limit; the tower does not.
    assert json.loads(done.stdout) == {"half": [True, "answer \\frac{1}{2} is equivalent to the target \\frac{1}{2}"],
                                       "tower": [False, "grader timeout"]}


def test_selfcorrect_grade_bounds_math_verify_too(tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text(TOWER)
    started = time.monotonic()  # in a process of its own: a regression fails at its timeout, not by hanging here
    done = run_cli("grade", "--task", "custom", "--data", str(_maths_data(tmp_path)), "--grader", "math",
                   "--item", "tower", "--response", str(reply), "--grader-timeout", "5", timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    verdict = json.loads(done.stdout)
    # Not "not equivalent": math-verify's own limit used to cut the check short and call that a verdict.
    assert (verdict["correct"], verdict["reason"], verdict["extra"]) == (False, "grader timeout", {"grader_timeout": True})
    # The behaviour is a time limit, so time is what is checked: the grade took the 5 s asked for (a verdict
    # sooner would not have been the limit's), and ended long before the tower's parse would (never): 60 s leaves
    # a loaded 2-core machine 55 s to start and kill the grading child.
    assert 5 <= elapsed < 60


def test_regrade_puts_back_todays_verdicts_and_counts_the_changes(tmp_path):
    db = tmp_path / "runs.sqlite"
    run = evaluate(task="arithmetic", limit=3, rounds=1, backend=ScriptedBackend(), db=db)
    today = _verdicts(db)
    with sqlite3.connect(db) as connection:  # as an older grader would have left them
        connection.execute("UPDATE turns SET correct = 1 - correct, reason = 'an older grader', "
                           "grader_version = 'a0a0a0a0a0a0' WHERE item_id = 'arith-0'")
        connection.execute("UPDATE turns SET grader_version = NULL WHERE item_id = 'arith-1' AND round = 0")
    shown = cli("report", run.run_id, "--db", str(db))
    # The command to paste names the store, which is not the default one.
    assert f"selfcorrect regrade {run.run_id} --db {db} grades them again" in shown.stdout, shown.stdout + shown.stderr

    done = cli("regrade", run.run_id[:8], "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert (summary["regraded"], summary["skipped"], summary["changed"]) == (3, 3, 2)
    assert summary["now_right"] + summary["now_wrong"] == 2 and summary["grader_version"] == grader_version()
    assert _verdicts(db) == today
    grading = load_run(run.run_id, db).report()["grading"]
    assert (grading["versions"], grading["outdated"], grading["unversioned"]) == ({grader_version(): 6}, 0, 0)

    again = cli("regrade", run.run_id, "--all", "--db", str(db))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "regraded 6 turn(s)" in again.stdout and "0 verdict(s) changed" in again.stdout, again.stdout
    assert _verdicts(db) == today


def test_regrade_refuses_a_run_whose_data_file_changed(tmp_path):
    data = tmp_path / "quiz.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 2?", "answer": "4"}, {"id": "b", "question": "What is 3 + 3?", "answer": "6"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    db = tmp_path / "runs.sqlite"
    run = evaluate(task="custom", data=data, task_options={"grader": "number"}, rounds=0, backend=ScriptedBackend(), db=db)
    rows[1]["answer"] = "7"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = _verdicts(db)

    done = cli("regrade", run.run_id, "--db", str(db))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "changed" in lines[0], done.stderr
    assert _verdicts(db) == before


def test_regrade_of_a_run_stored_before_task_specs_were_kept_needs_its_task(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as connection:  # a store made by selfcorrect 0.1.0
        connection.executescript((FIXTURES / "store_0.1.0.sql").read_text())
    before = _verdicts(db)
    shown = cli("report", "ceb590", "--db", str(db))
    assert "6 verdict(s) from before grader versions were kept" in shown.stdout, shown.stdout + shown.stderr

    done = cli("regrade", "ceb590", "--db", str(db))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "stored before" in lines[0] and "--task" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and _verdicts(db) == before
    # Told how the run was made, regrade reloads its task, checks its items and grades them with today's graders.
    wrong = cli("regrade", "ceb590", "--task", "arithmetic", "--task-opt", "digits=2", "--db", str(db))
    assert wrong.returncode == 2 and "digits" in wrong.stderr and _verdicts(db) == before
    done = cli("regrade", "ceb590", "--task", "arithmetic", "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["regraded"], summary["skipped"]) == (6, 0)
    assert summary["changed"] == sum(old[4] != new[4] for old, new in zip(before, _verdicts(db)))  # correct
    assert "before grader versions were kept" not in cli("report", "ceb590", "--db", str(db)).stdout


class UniformScorer(ScriptedBackend):
    """Scores every option label alike: enough for the exact estimator to run."""

    def option_probs(self, messages, answer_prefix, labels):
        return [1.0 / len(labels)] * len(labels)


def test_regrade_of_an_exact_estimator_run_says_there_is_nothing_to_grade(tmp_path):
    db = tmp_path / "runs.sqlite"
    run = evaluate(task="mcq", data=SHARED_DATA / "boolq.jsonl", limit=1, estimator="exact", backend=UniformScorer(), db=db)
    done = cli("regrade", run.run_id, "--db", str(db))
    assert done.returncode == 0 and "nothing to regrade" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("command", [("run",), ("regrade", "abc"), ("grade", "--task", "arithmetic", "--item", "arith-0",
                                                                     "--response", "-")])
def test_a_grader_timeout_that_is_not_positive_is_refused(tmp_path, command):
    db = tmp_path / "runs.sqlite"
    done = cli(*command, "--grader-timeout", "0", *(("--db", str(db)) if command[0] != "grade" else ()))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --grader-timeout 0: must be more than 0 and at most 86400 seconds"
    assert not db.exists()
