"""The command line on the real embedded model: run, report, runs, export, tasks, and bad input; the commands it
prints to paste, and a failed run listed, reported and deleted (on a scripted model and a server that is down).
Commands run in this process (`cli`); the default job runs in a process of its own."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sqlite3

import pytest

from selfcorrect import evaluate, load_run
from selfcorrect.store import RunLock, Store
from selfcorrect.tasks import TASKS, load_task

from conftest import SHARED_DATA as SHARED
from conftest import SERVED_AS, ScriptedBackend, check_turns, cli, free_port, run_cli


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """One real run through the CLI, shared by the tests that read it back."""
    db = tmp_path_factory.mktemp("cli") / "runs.sqlite"
    done = cli("run", "--limit", "8", "--rounds", "2", "--strategy", "critique", "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    return db, json.loads(done.stdout)


def test_run_json_has_the_promised_fields(arithmetic_run):
    """The figures of `run --json` are those of the stored turns, by the definitions (one sample per item)."""
    db, report = arithmetic_run
    assert report["n_items"] == 8 and report["complete"]
    assert report["generated"] == 8 * 3
    run = load_run(report["run_id"], db)
    check_turns(load_task("arithmetic"), run)
    right = {(t.item_id, t.round): t.correct for t in run.turns}
    items = sorted({t.item_id for t in run.turns})
    by_round = [[right[(i, r)] for i in items] for r in range(3)]  # first answer + 2 corrections
    assert report["acc"] == pytest.approx([sum(column) / 8 for column in by_round])
    assert [(pair["from"], pair["to"]) for pair in report["pairs"]] == [(0, 1), (1, 2)]
    for pair in report["pairs"]:
        a, b = by_round[pair["from"]], by_round[pair["to"]]
        counts = {"c->c": sum(x and y for x, y in zip(a, b)), "c->w": sum(x and not y for x, y in zip(a, b)),
                  "w->c": sum(y and not x for x, y in zip(a, b)), "w->w": sum(not x and not y for x, y in zip(a, b))}
        assert pair["counts"] == counts
        assert pair["transitions"] == pytest.approx({k: v / 8 for k, v in counts.items()})
        assert pair["cl"] == (pytest.approx(counts["c->c"] / sum(a)) if any(a) else None)
        assert pair["cs"] == (pytest.approx(counts["w->c"] / (8 - sum(a))) if not all(a) else None)
    assert report["transitions"] == report["pairs"][-1]["transitions"]
    for name in ("cl", "cs", "rss", "acc_inf"):  # acc_inf is n/a (0/0) where CL is 1 and CS 0
        assert report[name] == report["pairs"][-1][name]
    for name in ("acc_0", "acc_1", "acc_2", "cl", "cs", "rss"):
        low, high = report["ci"][name]
        assert low <= high
    # The decomposition identity on the last round pair, on real model output. CL and CS exist only when
    # some but not all second answers are right: on these 8 items the greedy replies of the pinned model
    # give such a mix (if a new model or build does not, choose other items, never drop the check).
    acc1, acc2 = report["acc"][1], report["acc"][2]
    assert 0 < acc1 < 1, f"the identity cannot be checked: {acc1:.3f} of the second answers are right"
    assert acc2 == pytest.approx(acc1 * report["cl"] + (1 - acc1) * report["cs"])


def test_report_and_resume_reproduce_the_run(arithmetic_run):
    db, report = arithmetic_run
    again = cli("report", report["run_id"][:8], "--db", str(db), "--json")
    assert again.returncode == 0, again.stderr
    shown = json.loads(again.stdout)
    for key in ("run_id", "n_items", "acc", "cl", "cs", "rss", "acc_inf", "transitions", "ci"):
        assert shown[key] == report[key]
    rerun = cli("run", "--limit", "8", "--rounds", "2", "--strategy", "critique", "--db", str(db), "--json")
    assert rerun.returncode == 0, rerun.stderr
    resumed = json.loads(rerun.stdout)
    assert resumed["run_id"] == report["run_id"] and resumed["generated"] == 0


def test_export_jsonl_one_line_per_turn_with_stored_grades(arithmetic_run):
    db, report = arithmetic_run
    done = cli("export", report["run_id"], "--format", "jsonl", "--db", str(db))
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
    csv_out = cli("export", report["run_id"], "--format", "csv", "--db", str(db))
    assert csv_out.returncode == 0 and len(csv_out.stdout.splitlines()) >= 1 + 8 * 3


def test_runs_lists_the_run(arithmetic_run):
    db, report = arithmetic_run
    done = cli("runs", "--db", str(db), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["run_id"], r["n_items"], r["n_turns"]) for r in rows] == [(report["run_id"], 8, 24)]


@pytest.mark.slow
def test_default_run_says_where_results_went(tmp_path):
    """`selfcorrect run` with no flags: the documented default job (100 arithmetic items, one reask), in a process
    of its own as a user starts it (the model loaded by the command itself)."""
    db = tmp_path / "default.sqlite"
    done = run_cli("run", env={"SELFCORRECT_DB": str(db)})
    assert done.returncode == 0, done.stderr
    assert str(db) in " ".join(done.stdout.split())
    assert "first answer" in done.stdout and "CL" in done.stdout
    report = json.loads(cli("runs", "--json", env={"SELFCORRECT_DB": str(db)}).stdout)[0]
    assert report["n_items"] == 100 and report["n_turns"] == 200
    run = load_run(report["run_id"], db)  # the default job: arithmetic, reask, greedy
    assert (run.config["task"]["task"], run.config["strategy"], run.config["temperature"]) == ("arithmetic", "reask", 0.0)


@pytest.mark.parametrize(
    "args, records",
    [
        (["--task", "gsm8k", "--data", "{shared}/gsm8k_test.jsonl", "--limit", "2"], 2),
        (["--task", "mcq", "--data", "{shared}/commonsense_qa.jsonl", "--limit", "3"], 3),
        (["--task", "mcq", "--data", "{shared}/boolq.jsonl", "--limit", "3"], 3),
    ],
)
def test_data_tasks_run_end_to_end(tmp_path, shared_data, args, records):
    """Each data task through the CLI: the items asked, each turn graded as the task grades its reply, the
    reask continuing the conversation; the first-answer accuracy is that of the stored turns."""
    args = [a.replace("{shared}", str(shared_data)) for a in args]
    done = cli("run", *args, "--db", str(tmp_path / "r.sqlite"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n_items"] == records and len(report["acc"]) == 2
    task = load_task(args[1], shared_data / args[3].rsplit("/", 1)[1])
    run = load_run(report["run_id"], tmp_path / "r.sqlite")
    asked = task.items[:records]
    assert [item["item_id"] for item in run.items] == [item.id for item in asked]
    if report["estimator"] == "sampling":
        assert len(run.turns) == 2 * records
        check_turns(task, run)
        assert report["acc"][0] == pytest.approx(sum(t.correct for t in run.turns if t.round == 0) / records)
    else:  # multiple choice on the embedded model: the exact estimator's scoring passes, one per option and one more
        assert args[1] == "mcq" and report["estimator"] == "exact"
        assert sorted((s.item_id, s.given) for s in run.scores) == sorted(
            (item.id, given) for item in asked for given in ["", *task.labels(item)])
        first = {s.item_id: s for s in run.scores if s.given == ""}
        assert report["acc"][0] == pytest.approx(
            sum(first[item.id].probs[first[item.id].labels.index(item.target)] for item in asked) / records)


def test_sampling_is_seeded_and_samples_differ(tmp_path):
    """K samples at T > 0: the samples of an item differ, and the same seed gives the same replies (48 tokens of
    them: a sampled reply differs from its sibling within its first words, or not at all)."""
    args = ["run", "--task", "mcq", "--data", str(SHARED / "boolq.jsonl"), "--limit", "3", "--samples", "4",
            "--temperature", "1.0", "--rounds", "1", "--max-tokens", "48", "--json"]
    first = cli(*args, "--db", str(tmp_path / "a.sqlite"))
    second = cli(*args, "--db", str(tmp_path / "b.sqlite"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    report = json.loads(first.stdout)
    exported = [
        [json.loads(line)["response"] for line in cli("export", report["run_id"], "--db", str(tmp_path / db)).stdout.splitlines()]
        for db in ("a.sqlite", "b.sqlite")
    ]
    assert len(exported[0]) == 3 * 4 * 2
    assert exported[0] == exported[1]
    first_answers = exported[0][0:8:2]  # the first item's samples 0..3, round 0
    assert len(set(first_answers)) > 1


def test_critic_strategy_with_the_embedded_model_as_critic(tmp_path):
    done = cli("run", "--strategy", "critic", "--critic-model", "embedded", "--limit", "2", "--db",
               str(tmp_path / "r.sqlite"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["n_items"] == 2 and report["config"]["critic"].startswith("llamacpp:SmolLM2")
    run = load_run(report["run_id"], tmp_path / "r.sqlite")
    check_turns(load_task("arithmetic"), run)
    for turn in (t for t in run.turns if t.round == 1):  # the critic's review, shown to the model, which revises
        critique = turn.notes["critique"]
        assert critique.strip() and turn.messages[2]["content"].startswith(
            f"A reviewer commented on your answer:\n{critique}\n\nRevise your answer.")
        assert turn.messages[3] == {"role": "assistant", "content": turn.response}


def test_tasks_lists_every_task():
    done = cli("tasks", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    # In this process the registry also holds the tasks test modules registered: the CLI lists every one.
    assert [row["task"] for row in rows] == sorted(TASKS)
    assert {row["task"]: row["grader"] for row in rows} == {name: entry.grader for name, entry in TASKS.items()}
    assert {row["task"] for row in rows if row["exact_estimator"]} == {"mcq"}  # on the embedded model
    shown = cli("tasks")
    assert shown.returncode == 0 and all(f"{name}:" in shown.stdout for name in TASKS)
    # A process of its own registers selfcorrect's tasks and no other.
    builtin = {name for name, entry in TASKS.items() if entry.factory.__module__.startswith("selfcorrect.")}
    fresh = run_cli("tasks", "--json")
    assert fresh.returncode == 0 and {row["task"] for row in json.loads(fresh.stdout)} == builtin, fresh.stderr


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
    (["delete", "nosuchrun"], "run nosuchrun: no such run"),
    (["export", "nosuchrun", "--format", "xml"], "--format xml: choose one of"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_bad_input_one_line_exit_2_store_untouched(tmp_path, populated_store, args, message):
    (tmp_path / "malformed.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    (tmp_path / "nofield.jsonl").write_text('{"answer": "#### 1"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    before = _digest(populated_store)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = cli(*args, "--db", str(populated_store))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert _digest(populated_store) == before


def test_report_on_a_missing_store_does_not_create_it(tmp_path):
    db = tmp_path / "never.sqlite"
    done = cli("report", "abc", "--db", str(db))
    assert done.returncode == 2 and "no run store there yet" in done.stderr
    assert not db.exists()


@pytest.mark.parametrize("command", [[], ["run"], ["improve"], ["report"]])
def test_help_shows_flags_as_flags(command):
    """A flag takes no value, so the help shows none after it (Typer's own help writes `<bool>` there), while
    an option that takes one still shows its type."""
    shown = cli(*command, "--help", env={"COLUMNS": "200"}).stdout
    rows = {line.split()[1]: line.split()[2] for line in shown.splitlines() if line.startswith("│ ") and
            len(line.split()) > 2 and line.split()[1].startswith("--")}
    flags = ["--version", "--help"] if not command else ["--json", "--help"]
    assert "<bool>" not in shown
    for flag in flags:  # the help text follows the flag at once
        assert rows[flag][0].isalpha(), (flag, rows[flag])
    if command == ["run"]:
        assert rows["--rounds"] == "<int>" and rows["--no-cache"] == "generate"


@pytest.fixture
def scripted_model(monkeypatch):
    """`--model embedded` answered by a ScriptedBackend: these tests are about the commands around a run."""
    import selfcorrect.api

    monkeypatch.setattr(selfcorrect.api, "load_model", lambda spec, **limits: ScriptedBackend())


def _pasted(line: str, marker: str) -> list[str]:
    """The words of the command printed after `marker`, as a shell splits them."""
    return shlex.split(line.split(marker, 1)[1])


def test_follow_up_commands_name_a_store_that_is_not_the_default_and_work_when_pasted(tmp_path, scripted_model):
    folder = tmp_path / "my runs [1]"  # a space and brackets: the path is shell-quoted, never read as markup
    folder.mkdir()
    db = folder / "runs.sqlite"
    done = cli("run", "--limit", "2", "--db", str(db), env={"SELFCORRECT_DB": ""})
    assert done.returncode == 0, done.stderr
    [run_id] = [row["run_id"] for row in json.loads(cli("runs", "--db", str(db), "--json").stdout)]
    words = _pasted(done.stdout, "See it again: ")
    assert words == ["selfcorrect", "report", run_id, "--db", str(db)]
    again = cli(*words[1:], "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["run_id"] == run_id, again.stderr
    # An unknown run's error names the command that lists this store's runs.
    missing = cli("report", "nosuchrun", "--db", str(db))
    assert missing.returncode == 2 and f"`selfcorrect runs --db '{db}'` lists them" in missing.stderr, missing.stderr

    # A store named by $SELFCORRECT_DB is named too: the line may be pasted where the variable is not set.
    by_env = cli("run", "--limit", "2", env={"SELFCORRECT_DB": str(db)})
    assert by_env.returncode == 0, by_env.stderr
    assert _pasted(by_env.stdout, "See it again: ") == ["selfcorrect", "report", run_id, "--db", str(db)]

    # The default location is left unnamed, and its directory is made.
    data_home = tmp_path / "data home"
    default = cli("run", "--limit", "2", env={"SELFCORRECT_DB": "", "XDG_DATA_HOME": str(data_home)})
    assert default.returncode == 0, default.stderr
    assert _pasted(default.stdout, "See it again: ") == ["selfcorrect", "report", run_id]
    assert (data_home / "selfcorrect" / "runs.sqlite").is_file()


TABLES = ("runs", "items", "turns", "option_scores", "failed_cells", "run_traffic")  # the tables of a run's rows


def _rows(db, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return connection.execute(query).fetchall()


def test_a_failed_run_is_listed_reported_and_deleted_and_the_cache_stays(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # a server that is down: nobody listens there
    db = tmp_path / "runs.sqlite"
    failed = cli("run", "--model", f"openai:{SERVED_AS}@{url}", "--limit", "2", "--db", str(db),
                 env={"SELFCORRECT_HTTP_RETRIES": "1"})
    assert failed.returncode == 2, failed.stderr
    kept = evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)  # a run that worked, cached
    [failed_id] = [row["run_id"] for row in json.loads(cli("runs", "--db", str(db), "--json").stdout)
                   if row["run_id"] != kept.run_id]
    store = Store(db, create=False)
    failures = store.failures(failed_id)
    store.close()
    assert failures and all(url in failure["error"] for failure in failures)

    # `runs` lists it with its turns (none) and its failed cells.
    rows = {row["run_id"]: row for row in json.loads(cli("runs", "--db", str(db), "--json").stdout)}
    assert (rows[failed_id]["n_turns"], rows[failed_id]["n_failed"]) == (0, len(failures))
    assert (rows[kept.run_id]["n_turns"], rows[kept.run_id]["n_failed"]) == (4, 0)
    table = cli("runs", "--db", str(db)).stdout
    assert "failed cells" in table
    [line] = [line for line in table.splitlines() if failed_id in line]
    assert [cell.strip() for cell in line.strip("│ ").split("│")][-2:] == ["0", str(len(failures))]  # turns, failed

    # `report` says how many cells failed and the first error.
    shown = cli("report", failed_id, "--db", str(db))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    first = failures[0]
    assert f"{len(failures)} cell(s) failed" in text and "running the same command again retries them" in text
    assert f"item {first['item_id']} sample 0 round 0: {' '.join(first['error'].split())}" in text
    assert json.loads(cli("report", failed_id, "--db", str(db), "--json").stdout)["failed_cells"] == {
        "count": len(failures), "first": first}

    # A run another process holds is not deleted under it: one line naming the holder, exit 2, nothing deleted.
    before = {table: _rows(db, f"SELECT * FROM {table}") for table in TABLES}
    with RunLock(db, failed_id):
        refused = cli("delete", failed_id[:8], "--db", str(db))
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run {failed_id} is already running" in lines[0], refused.stderr
    assert f"pid {os.getpid()}" in lines[0] and lines[0].endswith("then delete the run"), lines[0]
    assert {table: _rows(db, f"SELECT * FROM {table}") for table in TABLES} == before

    # A prefix is compared as text: an empty one, or SQL's wildcards, name no run (and delete nothing).
    for prefix in ("", "%", "_"):
        unknown = cli("delete", prefix, "--db", str(db))
        assert unknown.returncode == 2 and "no such run" in unknown.stderr, (prefix, unknown.stderr)
    assert {table: _rows(db, f"SELECT * FROM {table}") for table in TABLES} == before

    deleted = cli("delete", failed_id[:8], "--db", str(db))
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted run {failed_id}" in deleted.stdout and f"{len(failures)} failed cells" in deleted.stdout
    assert [row["run_id"] for row in json.loads(cli("runs", "--db", str(db), "--json").stdout)] == [kept.run_id]
    for table in TABLES:
        assert not _rows(db, f"SELECT * FROM {table} WHERE run_id = '{failed_id}'"), table
    assert load_run(kept.run_id, db).turns == kept.turns  # the other run is untouched

    # Deleting the run that worked keeps its replies in the response cache: running it again generates nothing.
    cached = _rows(db, "SELECT * FROM response_cache")
    assert cached and cli("delete", kept.run_id, "--db", str(db)).returncode == 0
    assert _rows(db, "SELECT * FROM response_cache") == cached
    assert all(not _rows(db, f"SELECT * FROM {table}") for table in TABLES)
    again = evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)
    assert again.run_id == kept.run_id and again.generated == 0 and again.cache_hits == 4
