"""Bad input is one line naming the file and line, the field or the flag, exit code 2, no traceback, and
the run store untouched: data that is not UTF-8, damaged gzip, malformed CSV choices and code-task tests,
an --output in a missing directory, flags that would give a misleading measurement, and a backend that
dies in the middle of the exact estimator."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.models.base import BackendError
from selfcorrect.tasks import load_task
from selfcorrect.tasks.code import grade_code_with_tests

from conftest import SHARED_DATA, ScriptedBackend, cli, run_cli

HUMANEVAL_RECORD = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(f):\n    assert f() == 1\n",
                    "entry_point": "f"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_files(tmp: Path) -> None:
    """Every bad file the CLI cases below name."""
    good = json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"})
    (tmp / "latin1.jsonl").write_bytes(f"{good}\n".encode() + b'{"question": "Caf\xe9?", "answer": "#### 1"}\n')
    (tmp / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (tmp / "latin1.csv").write_bytes(b"question,answer\n2 + 2?,4\nCaf\xe9 au lait?,1\n")
    (tmp / "choices.csv").write_text('question,answer,choices\nPick one,A,"[red, blue]"\n')
    code = {"question": "Write f", "answer": "{'tests': 'assert f() == 1'}"}  # a Python dict's repr, not JSON
    (tmp / "code.jsonl").write_text(json.dumps(code) + "\n")
    (tmp / "code_no_tests.jsonl").write_text(json.dumps({"question": "Write f", "answer": '{"setup": ""}'}) + "\n")
    records = [{**HUMANEVAL_RECORD, "task_id": f"t/{i}", "test": "x" * 200 * i} for i in range(40)]
    whole = gzip.compress("".join(json.dumps(record) + "\n" for record in records).encode())
    (tmp / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp / "plain.jsonl.gz").write_text(json.dumps(HUMANEVAL_RECORD) + "\n")
    (tmp / "badjson.jsonl.gz").write_bytes(gzip.compress(f"{json.dumps(HUMANEVAL_RECORD)}\n{{oops\n".encode()))
    (tmp / "number.jsonl.gz").write_bytes(gzip.compress(b"5\n"))
    (tmp / "latin1.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "caf\xe9"}\n'))


@pytest.fixture
def store(tmp_path):
    """A store holding one finished run, to check that bad input leaves it byte for byte as it was."""
    db = tmp_path / "store.sqlite"
    run = evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)
    return db, run.run_id


def _case(case_id: str, args: str, message: str):
    return pytest.param(args.split(), message, id=case_id)


# The cases that load a model bound what today's code would generate before failing (--limit 1 --max-tokens 1).
BOOLQ = SHARED_DATA / "boolq.jsonl"
CLI_CASES = [
    _case("latin1-jsonl", "run --task gsm8k --data {tmp}/latin1.jsonl",
          "{tmp}/latin1.jsonl:2: not UTF-8 text (byte 18 of the line is 0xe9)"),
    _case("binary-jsonl", "run --task gsm8k --data {tmp}/binary.jsonl", "{tmp}/binary.jsonl:1: not UTF-8 text"),
    _case("latin1-csv", "run --task custom --grader number --data {tmp}/latin1.csv",
          "{tmp}/latin1.csv:3: not UTF-8 text (byte 4 of the line is 0xe9)"),
    _case("csv-choices-not-json", "run --task custom --grader choice --data {tmp}/choices.csv",
          "{tmp}/choices.csv:2: field 'choices' (the choices) starts with '[' but is not a JSON list"),
    _case("code-tests-not-json", "run --task custom --grader code --data {tmp}/code.jsonl --limit 1 --max-tokens 1",
          "{tmp}/code.jsonl:1: field 'answer' (the tests) starts with '{' but is not valid JSON"),
    _case("code-tests-without-tests",
          "run --task custom --grader code --data {tmp}/code_no_tests.jsonl --limit 1 --max-tokens 1",
          "{tmp}/code_no_tests.jsonl:1: field 'answer' (the tests) needs string values"),
    _case("gz-missing", "run --task humaneval --data {tmp}/missing.jsonl.gz", "{tmp}/missing.jsonl.gz: no such file"),
    _case("gz-not-gzip", "run --task humaneval --data {tmp}/plain.jsonl.gz",
          "{tmp}/plain.jsonl.gz:1: not readable as gzip (Not a gzipped file"),
    _case("gz-truncated", "run --task humaneval --data {tmp}/truncated.jsonl.gz", "the gzip data ends early"),
    _case("gz-bad-json", "run --task humaneval --data {tmp}/badjson.jsonl.gz",
          "{tmp}/badjson.jsonl.gz:2: not valid JSON"),
    _case("gz-not-an-object", "run --task humaneval --data {tmp}/number.jsonl.gz",
          "{tmp}/number.jsonl.gz:1: expected a JSON object per line"),
    _case("gz-latin1", "run --task humaneval --data {tmp}/latin1.jsonl.gz", "{tmp}/latin1.jsonl.gz:1: not UTF-8 text"),
    _case("export-missing-dir", "export {run} --output {tmp}/missing/x.jsonl",
          "--output {tmp}/missing/x.jsonl: no such directory {tmp}/missing"),
    _case("export-to-a-dir", "export {run} --output {tmp}", "--output {tmp}: is a directory"),
    _case("samples-at-t0", "run --samples 3 --limit 1 --max-tokens 1", "--samples 3 needs --temperature > 0"),
    _case("exact-at-t0.7", f"run --task mcq --data {BOOLQ} --estimator exact --temperature 0.7 --limit 1",
          "--temperature 0.7 would be ignored"),
]


def _refused(invoke, tmp_path, store, args, message) -> None:
    """`invoke` (cli or run_cli) refuses the case in one line, exit code 2, with nothing written anywhere."""
    db, run_id = store
    _write_files(tmp_path)
    files = lambda: sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(db.name))
    listing = files()
    before = _digest(db)
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{run}", run_id)
    done = invoke(*map(fill, args), "--db", str(db))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(message) in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert _digest(db) == before
    assert files() == listing  # nothing written beside the data either


@pytest.mark.parametrize("args, message", CLI_CASES)
def test_cli_bad_input_is_one_line_and_leaves_the_store_alone(tmp_path, store, args, message):
    _refused(cli, tmp_path, store, args, message)


@pytest.mark.parametrize("args, message", [case for case in CLI_CASES
                                           if case.id in ("latin1-jsonl", "gz-truncated", "samples-at-t0")])
def test_the_one_line_contract_in_a_process_of_its_own(tmp_path, store, args, message):
    """A few of the cases as a user meets them from a shell: the interpreter's exit code and streams, nothing
    else printed (no warning or traceback from the package's import or its exit)."""
    _refused(run_cli, tmp_path, store, args, message)


def test_line_of_a_bad_byte_deep_in_a_csv(tmp_path):
    """CSV is decoded a block at a time; the line named is still the one that holds the byte."""
    path = tmp_path / "long.csv"
    path.write_bytes(b"question,answer\n" + b"2 + 2?,4\n" * 5000 + b"ok?,1\n" * 3 + b"na\xefve?,1\n")
    with pytest.raises(UserError, match=r"long\.csv:5005: not UTF-8 text \(byte 3 of the line is 0xef\)"):
        load_task("custom", path, {"grader": "number"})


def test_a_spreadsheets_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfquestion,answer\n2 + 2?,4\n")
    assert [item.question for item in load_task("custom", path, {"grader": "number"}).items] == ["2 + 2?"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "#### 3"}\n')
    assert [item.target for item in load_task("gsm8k", jsonl).items] == ["3"]


def test_code_tests_given_as_a_json_object_are_graded(tmp_path):
    """In JSONL the tests may be the object itself, not a string holding it; a valid string is kept as it is."""
    path = tmp_path / "code.jsonl"
    as_object = {"question": "Write f", "answer": {"tests": "assert f() == 1"}}
    as_text = {"question": "Write g", "answer": json.dumps({"setup": "x = 2", "tests": "assert g() == x"}), "id": "g"}
    path.write_text(json.dumps(as_object) + "\n" + json.dumps(as_text) + "\n")
    first, second = load_task("custom", path, {"grader": "code"}).items
    assert grade_code_with_tests(first, "```python\ndef f():\n    return 1\n```").correct
    assert not grade_code_with_tests(first, "```python\ndef f():\n    return 2\n```").correct
    assert second.target == as_text["answer"]
    assert grade_code_with_tests(second, "```python\ndef g():\n    return 2\n```").correct


class DyingScorer(ScriptedBackend):
    """Scores option labels (uniformly) until `after` passes, then fails as a server that went away does."""

    def __init__(self, after: int | None = None):
        super().__init__()
        self.after, self.passes = after, 0

    def option_probs(self, messages, answer_prefix, labels):
        if self.after is not None and self.passes >= self.after:
            raise BackendError(f"{self.identity}: the server went away (connection refused)")
        self.passes += 1
        return [1.0 / len(labels)] * len(labels)


def _stored_passes(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT COUNT(*) FROM option_scores").fetchone()[0]


def test_backend_error_in_the_exact_estimator_keeps_the_passes_and_a_rerun_resumes(tmp_path):
    options = dict(task="mcq", data=SHARED_DATA / "commonsense_qa.jsonl", limit=3, estimator="exact", cache=False)
    db = tmp_path / "r.sqlite"
    with pytest.raises(UserError, match=r"the server went away .*the finished scoring passes are stored: run the "
                                        r"same command again"):
        evaluate(**options, backend=DyingScorer(after=8), db=db)
    assert _stored_passes(db) == 8
    resumed = evaluate(**options, backend=DyingScorer(), db=db)
    assert resumed.generated == 3 * 6 - 8 and _stored_passes(db) == 3 * 6
    whole = evaluate(**options, backend=DyingScorer(), db=tmp_path / "whole.sqlite")
    assert resumed.run_id == whole.run_id and resumed.report()["acc"] == whole.report()["acc"]


def test_backend_error_in_the_exact_estimator_through_the_cli(tmp_path, monkeypatch):
    """The CLI with its model loader made to return a backend that dies after 4 passes (no model spec gives a
    scoring backend that can be made to fail on purpose)."""
    import selfcorrect.api

    db = tmp_path / "r.sqlite"
    args = ["run", "--task", "mcq", "--data", str(SHARED_DATA / "commonsense_qa.jsonl"), "--limit", "2",
            "--db", str(db)]
    monkeypatch.setattr(selfcorrect.api, "load_model", lambda spec: DyingScorer(after=4))
    done = cli(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: scripted:v1: the server went away"), done.stderr[-3000:]
    assert "run the same command again" in lines[0] and done.stdout == ""
    assert _stored_passes(db) == 4
    monkeypatch.setattr(selfcorrect.api, "load_model", lambda spec: DyingScorer())
    again = cli(*args, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout)
    assert report["estimator"] == "exact" and report["generated"] == 2 * 6 - 4 and report["complete"]
    assert _stored_passes(db) == 2 * 6


def test_auto_estimator_samples_when_a_temperature_is_asked_for(tmp_path):
    data = SHARED_DATA / "boolq.jsonl"
    sampled = evaluate(task="mcq", data=data, limit=1, temperature=0.7, backend=DyingScorer(), db=tmp_path / "a.sqlite")
    assert sampled.estimator == "sampling" and sampled.report()["estimator"] == "sampling"
    greedy = evaluate(task="mcq", data=data, limit=1, backend=DyingScorer(), db=tmp_path / "b.sqlite")
    assert greedy.estimator == "exact"
    with pytest.raises(UserError, match=r"--estimator exact: not possible here: it samples nothing, so --temperature "
                                        r"0\.7 would be ignored"):
        evaluate(task="mcq", data=data, estimator="exact", temperature=0.7, backend=DyingScorer(),
                 db=tmp_path / "c.sqlite")
    assert not (tmp_path / "c.sqlite").exists()


def test_several_samples_at_temperature_zero_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"^--samples 4 needs --temperature > 0"):
        evaluate(task="arithmetic", limit=1, samples=4, backend=ScriptedBackend(), db=tmp_path / "r.sqlite")
    assert not (tmp_path / "r.sqlite").exists()
    run = evaluate(task="arithmetic", limit=1, samples=4, temperature=0.7, backend=ScriptedBackend(),
                   db=tmp_path / "r.sqlite")
    assert len(run.turns) == 4 * 2


def test_a_reply_to_grade_that_is_not_utf8_is_one_line(tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_bytes(b"The answer is 14, caf\xe9.")
    done = cli("grade", "--task", "arithmetic", "--item", "arith-0", "--response", str(reply))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: --response {reply}: not UTF-8 text (byte 21 is 0xe9); save the reply as UTF-8"


def test_code_tests_given_as_a_list_run_and_other_types_are_refused(tmp_path):
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps({"question": "Write f", "answer": ["assert f(1) == 2", "assert f(2) == 3"]}) + "\n")
    task = load_task("custom", listed, {"grader": "code"})
    assert not task.grade(task.items[0], "```python\ndef f(x):\n    return 0\n```").correct  # the asserts run
    assert task.grade(task.items[0], "```python\ndef f(x):\n    return x + 1\n```").correct
    number = tmp_path / "number.jsonl"
    number.write_text(json.dumps({"question": "Write f", "answer": 7}) + "\n")
    with pytest.raises(UserError, match=r"number.jsonl:1: field 'answer' \(the tests\) is a int"):
        load_task("custom", number, {"grader": "code"})


def test_a_store_in_a_missing_directory_is_one_line_and_nothing_is_made(tmp_path, monkeypatch):
    """A typo in --db or $SELFCORRECT_DB does not start an empty store somewhere else (the default location's
    directory is made: tests/test_cli.py)."""
    import selfcorrect.api

    monkeypatch.setattr(selfcorrect.api, "load_model", lambda spec, **limits: ScriptedBackend())
    db = tmp_path / "no such dir" / "runs.sqlite"
    for args, env, named in [
        (["run", "--limit", "1", "--db", str(db)], {}, f"--db {db}"),
        (["run", "--limit", "1"], {"SELFCORRECT_DB": str(db)}, f"SELFCORRECT_DB={db}"),
        (["runs", "--db", str(db)], {}, f"--db {db}"),
    ]:
        done = cli(*args, env=env)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.strip() == f"error: {named}: no directory {db.parent}; create it, or fix the path"
    with pytest.raises(UserError, match="no directory"):
        evaluate(task="arithmetic", limit=1, backend=ScriptedBackend(), db=db)
    assert not db.parent.exists()
