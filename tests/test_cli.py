"""The command line on the real embedded model: run, report, runs, export, tasks, and bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from selfcorrect import evaluate
from selfcorrect.tasks import load_task

from conftest import SHARED_DATA as SHARED
from conftest import ScriptedBackend, run_cli


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """One real run through the CLI, shared by the tests that read it back."""
    db = tmp_path_factory.mktemp("cli") / "runs.sqlite"
    done = run_cli("run", "--limit", "8", "--rounds", "2", "--strategy", "critique", "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    return db, json.loads(done.stdout)


def test_run_json_has_the_promised_fields(arithmetic_run):
    _, report = arithmetic_run
    assert report["n_items"] == 8 and report["complete"]
    assert len(report["acc"]) == 3  # first answer + 2 corrections
    assert sum(report["transitions"].values()) == pytest.approx(1.0)
    for name in ("cl", "cs", "rss", "acc_inf"):
        assert name in report
    for name in ("cl", "cs", "acc_0", "acc_2"):
        low, high = report["ci"][name]
        assert low <= high
    # The decomposition identity on the last round pair, on real model output.
    acc1, acc2 = report["acc"][1], report["acc"][2]
    if report["cl"] is not None and report["cs"] is not None:
        assert acc2 == pytest.approx(acc1 * report["cl"] + (1 - acc1) * report["cs"])
    assert report["generated"] == 8 * 3


def test_report_and_resume_reproduce_the_run(arithmetic_run):
    db, report = arithmetic_run
    again = run_cli("report", report["run_id"][:8], "--db", str(db), "--json")
    assert again.returncode == 0, again.stderr
    shown = json.loads(again.stdout)
    for key in ("run_id", "n_items", "acc", "cl", "cs", "rss", "acc_inf", "transitions", "ci"):
        assert shown[key] == report[key]
    rerun = run_cli("run", "--limit", "8", "--rounds", "2", "--strategy", "critique", "--db", str(db), "--json")
    assert rerun.returncode == 0, rerun.stderr
    resumed = json.loads(rerun.stdout)
    assert resumed["run_id"] == report["run_id"] and resumed["generated"] == 0


def test_export_jsonl_one_line_per_turn_with_stored_grades(arithmetic_run):
    db, report = arithmetic_run
    done = run_cli("export", report["run_id"], "--format", "jsonl", "--db", str(db))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 8 * 3
    task = load_task("arithmetic")
    items = {item.id: item for item in task.items}
    for line in lines:
        assert {"item_id", "sample", "round", "correct", "answer", "response", "prompt_tokens", "completion_tokens"} <= set(line)
        assert isinstance(line["correct"], bool)
        # The stored grade is what grading the stored response gives.
        grade = task.grade(items[line["item_id"]], line["response"])
        assert (grade.answer, grade.correct, grade.reason) == (line["answer"], line["correct"], line["reason"])
        if line["round"] > 0:
            assert len(line["feedback"]) == 1  # critique: the review reply
    csv_out = run_cli("export", report["run_id"], "--format", "csv", "--db", str(db))
    assert csv_out.returncode == 0 and len(csv_out.stdout.splitlines()) >= 1 + 8 * 3


def test_runs_lists_the_run(arithmetic_run):
    db, report = arithmetic_run
    done = run_cli("runs", "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["run_id"], r["n_items"], r["n_turns"]) for r in rows] == [(report["run_id"], 8, 24)]


def test_default_run_says_where_results_went(tmp_path):
    """`selfcorrect run` with no flags: the documented default job (100 arithmetic items, one reask)."""
    db = tmp_path / "default.sqlite"
    done = run_cli("run", env={"SELFCORRECT_DB": str(db)})
    assert done.returncode == 0, done.stderr
    assert str(db) in " ".join(done.stdout.split())
    assert "first answer" in done.stdout and "CL" in done.stdout
    report = json.loads(run_cli("runs", "--json", env={"SELFCORRECT_DB": str(db)}).stdout)[0]
    assert report["n_items"] == 100 and report["n_turns"] == 200


@pytest.mark.parametrize(
    "args, records",
    [
        (["--task", "gsm8k", "--data", "{shared}/gsm8k_test.jsonl", "--limit", "2"], 2),
        (["--task", "mcq", "--data", "{shared}/commonsense_qa.jsonl", "--limit", "3"], 3),
        (["--task", "mcq", "--data", "{shared}/boolq.jsonl", "--limit", "3"], 3),
    ],
)
def test_data_tasks_run_end_to_end(tmp_path, shared_data, args, records):
    args = [a.replace("{shared}", str(shared_data)) for a in args]
    done = run_cli("run", *args, "--db", str(tmp_path / "r.sqlite"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n_items"] == records and len(report["acc"]) == 2


def test_sampling_is_seeded_and_samples_differ(tmp_path):
    """K samples at T > 0: the samples of an item differ, and the same seed gives the same replies."""
    args = ["run", "--task", "mcq", "--data", str(SHARED / "boolq.jsonl"), "--limit", "3", "--samples", "4",
            "--temperature", "1.0", "--rounds", "1", "--json"]
    first = run_cli(*args, "--db", str(tmp_path / "a.sqlite"))
    second = run_cli(*args, "--db", str(tmp_path / "b.sqlite"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    report = json.loads(first.stdout)
    exported = [
        [json.loads(line)["response"] for line in run_cli("export", report["run_id"], "--db", str(tmp_path / db)).stdout.splitlines()]
        for db in ("a.sqlite", "b.sqlite")
    ]
    assert len(exported[0]) == 3 * 4 * 2
    assert exported[0] == exported[1]
    first_answers = exported[0][0:8:2]  # the first item's samples 0..3, round 0
    assert len(set(first_answers)) > 1


def test_critic_strategy_with_the_embedded_model_as_critic(tmp_path):
    done = run_cli("run", "--strategy", "critic", "--critic-model", "embedded", "--limit", "2", "--db",
                   str(tmp_path / "r.sqlite"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n_items"] == 2 and report["config"]["critic"].startswith("llamacpp:SmolLM2")


def test_tasks_lists_every_task():
    done = run_cli("tasks")
    assert done.returncode == 0
    for name in ("arithmetic", "gsm8k", "mcq"):
        assert name in done.stdout


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def populated_store(tmp_path):
    db = tmp_path / "store.sqlite"
    evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)
    return db


BAD_INPUT = [
    (["run", "--task", "nope"], "--task nope: unknown task"),
    (["run", "--model", "gpt-17"], "--model gpt-17: unknown model spec"),
    (["run", "--model", "llamacpp:/no/such/model.gguf"], "no such file"),
    (["run", "--model", "llamacpp:{tmp}/empty.jsonl"], "llama.cpp cannot load it"),
    (["run", "--strategy", "pray"], "--strategy pray: unknown strategy"),
    (["run", "--task", "gsm8k", "--data", "{tmp}/absent.jsonl"], "absent.jsonl: no such file"),
    (["run", "--task", "gsm8k", "--data", "{tmp}/malformed.jsonl"], "malformed.jsonl:2: not valid JSON"),
    (["run", "--task", "gsm8k", "--data", "{tmp}/nofield.jsonl"], "nofield.jsonl:1: record has no field 'question'"),
    (["run", "--task", "mcq", "--data", "{tmp}/empty.jsonl"], "empty.jsonl: no items found"),
    (["run", "--rounds", "-1"], "--rounds -1: must be 0 or more"),
    (["run", "--samples", "0"], "--samples 0: must be at least 1"),
    (["run", "--limit", "0"], "--limit 0: must be at least 1"),
    (["run", "--temperature", "-1"], "--temperature -1.0: must be between 0 and 2"),
    (["run", "--task-opt", "digits"], "--task-opt digits: expected KEY=VALUE"),
    (["report", "nosuchrun"], "run nosuchrun: no such run"),
    (["export", "nosuchrun", "--format", "xml"], "--format xml: choose one of"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_bad_input_one_line_exit_2_store_untouched(tmp_path, populated_store, args, message):
    (tmp_path / "malformed.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    (tmp_path / "nofield.jsonl").write_text('{"answer": "#### 1"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    before = _digest(populated_store)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = run_cli(*args, "--db", str(populated_store))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert _digest(populated_store) == before


def test_report_on_a_missing_store_does_not_create_it(tmp_path):
    db = tmp_path / "never.sqlite"
    done = run_cli("report", "abc", "--db", str(db))
    assert done.returncode == 2 and "no run store there yet" in done.stderr
    assert not db.exists()
