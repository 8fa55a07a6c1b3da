"""selfcorrect inside Inspect AI (selfcorrect.inspect_ext): `inspect eval` (the real command line) runs the
selfcorrect_rounds solver and selfcorrect_scorer on llama.cpp's OpenAI-compatible server, and the metrics it
reports must equal those selfcorrect computes from the transcripts in its log; a stored run exported with
`selfcorrect export --format inspect` must read back, through inspect_ai's reader, as the store holds it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("inspect_ai", reason="inspect_ai is not installed (pip install -e '.[inspect]')")

from inspect_ai.log import read_eval_log  # noqa: E402
from inspect_ai.model import ModelOutput  # noqa: E402
from inspect_ai.scorer import SampleScore, Score, Target, match, value_to_float  # noqa: E402
from inspect_ai.solver import TaskState  # noqa: E402

from selfcorrect import evaluate, metrics  # noqa: E402
from selfcorrect.errors import UserError  # noqa: E402
from selfcorrect.inspect_ext import cl, cs, round_accuracy, rss, selfcorrect_rounds, selfcorrect_scorer  # noqa: E402
from selfcorrect.inspect_ext.log_export import eval_log  # noqa: E402
from selfcorrect.inspect_ext.solver import ROUNDS_KEY  # noqa: E402
from selfcorrect.strategies import CorrectionRound, get_strategy  # noqa: E402
from selfcorrect.tasks import load_task  # noqa: E402

from conftest import API_KEY, SERVED_AS, ScriptedBackend, cli  # noqa: E402

INSPECT = str(Path(sys.executable).with_name("inspect"))
LIMIT = 6  # the first 6 arithmetic problems: the model gets some right (1 here), so CL, CS and RSS are defined
MAX_TOKENS = 48  # short replies keep the eval quick on a loaded machine; the comparison needs no more

# An Inspect user's task file: a selfcorrect task's items, graded twice per round, by the task's grader and by
# Inspect's match(); the solver comes from the command line, by its registered name (the entry point).
TASK_FILE = '''
from inspect_ai import Task, task
from inspect_ai.scorer import match
from selfcorrect.inspect_ext import selfcorrect_dataset, selfcorrect_scorer

@task
def arithmetic_corrected():
    return Task(dataset=selfcorrect_dataset("arithmetic"),
                scorer=[selfcorrect_scorer(task="arithmetic"), selfcorrect_scorer(match(numeric=True))])
'''


def _same(logged: float, computed: float | None) -> bool:
    """A logged metric equals selfcorrect's figure, NaN standing for one that is undefined (None)."""
    return math.isnan(logged) if computed is None else math.isclose(logged, computed, abs_tol=1e-12)


def _printed(stdout: str, name: str) -> list[str]:
    """The values `inspect eval` printed for metric `name` (one per scorer column)."""
    return [words[1 + 2 * i] for line in stdout.splitlines() if (words := line.split()) and words[0] == name
            for i in range(len(words) // 2)]


@pytest.fixture(scope="module")
def inspect_run(llama_server, tmp_path_factory):
    """`inspect eval` of the task file against the server: (its stdout, its log)."""
    where = tmp_path_factory.mktemp("inspect")
    (where / "task.py").write_text(TASK_FILE)
    done = subprocess.run(
        [INSPECT, "eval", "task.py",
         "--solver", "selfcorrect/selfcorrect_rounds", "-S", "strategy=reask", "-S", "rounds=1",
         "--model", f"llama-cpp-python/{SERVED_AS}", "--model-base-url", f"{llama_server}/v1", "-M", f"api_key={API_KEY}",
         "--limit", str(LIMIT), "--max-tokens", str(MAX_TOKENS), "--max-connections", "1", "--temperature", "0",
         "--log-dir", str(where / "logs"), "--display", "plain"],
        capture_output=True, text=True, timeout=600, cwd=where, env={**os.environ, "COLUMNS": "200"},  # no wrapping
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [log_file] = (where / "logs").glob("*.eval")
    return done.stdout, read_eval_log(str(log_file))


@pytest.mark.slow
def test_inspect_eval_reports_selfcorrects_metrics_of_its_own_transcripts(inspect_run):
    stdout, log = inspect_run
    assert log.status == "success" and len(log.samples) == LIMIT
    task = load_task("arithmetic")
    items = {item.id: item for item in task.items}
    reask = get_strategy("reask")
    correct = []
    for sample in log.samples:
        kept = sample.store[ROUNDS_KEY]
        replies = [message.text for message in sample.messages if message.role == "assistant"]
        asked = [message.text for message in sample.messages if message.role == "user"]
        # Round 0 answers the task's prompt; round 1 is reask's own correction prompt; both replies are kept.
        assert asked[0] == task.prompt(items[sample.id]) and len(asked) == 2
        assert [round_["response"] for round_ in kept] == replies
        prompts: list[str] = []  # what reask itself asks, given this conversation
        reask.correct(CorrectionRound(question=asked[0], instruction="", previous_reply=replies[0],
                                      ask=lambda prompt: prompts.append(prompt) or ""))
        assert asked[1:] == prompts
        correct.append([task.grade(items[sample.id], reply).correct for reply in replies])
        assert sample.scores["selfcorrect_scorer"].value == {f"round_{t}": int(r) for t, r in enumerate(correct[-1])}
    expected = metrics.summarize(np.array(correct, dtype=bool)[:, None, :], n_boot=1)
    logged = {score.name: score.metrics for score in log.results.scores}["selfcorrect_scorer"]
    figures = {"cl": expected["pairs"][0]["cl"], "cs": expected["pairs"][0]["cs"], "rss": expected["pairs"][0]["rss"],
               "acc_0": expected["acc"][0], "acc_1": expected["acc"][1]}
    for name, value in figures.items():
        assert _same(logged[name].value, value), (name, logged[name].value, value)
        printed = _printed(stdout, name)[0]  # the first column: the selfcorrect task's grader
        assert printed == ("nan" if value is None else f"{value:.3f}"), (name, printed, stdout)


@pytest.mark.slow
def test_a_wrapped_inspect_scorer_grades_every_round_as_it_grades_an_output(inspect_run):
    _, log = inspect_run
    grader, as_float = match(numeric=True), value_to_float()
    verdicts = []
    for sample in log.samples:
        graded = []
        for round_ in sample.store[ROUNDS_KEY]:
            state = TaskState(model=log.eval.model, sample_id=sample.id, epoch=sample.epoch, input=sample.input,
                              messages=sample.messages)
            state.output = ModelOutput.from_content(log.eval.model, round_["response"])
            graded.append(int(as_float(asyncio.run(grader(state, Target(sample.target))).value) == 1.0))
        assert sample.scores["selfcorrect_scorer1"].value == {f"round_{t}": right for t, right in enumerate(graded)}
        verdicts.append(graded)
    acc = [float(np.mean(column)) for column in zip(*verdicts)]
    logged = {score.name: score.metrics for score in log.results.scores}["selfcorrect_scorer1"]
    assert [logged["acc_0"].value, logged["acc_1"].value] == acc


# --- the export ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A small sampled run of the embedded model: 2 items, 2 samples each, 1 correction (with these options and
    seeds one first answer of the four is right here, so CL, CS and RSS are defined)."""
    db = tmp_path_factory.mktemp("export") / "runs.sqlite"
    return evaluate(task="arithmetic", task_options={"operators": "+", "n": "20"}, limit=2, samples=2, rounds=1,
                    temperature=0.7, max_tokens=32, db=db), db


@pytest.mark.model
@pytest.mark.slow  # its run of the embedded model takes 20-40 s here
@pytest.mark.parametrize("suffix", [".eval", ".json"])
def test_export_reads_back_as_the_store_holds_the_run(stored_run, tmp_path, suffix):
    run, db = stored_run
    output = tmp_path / f"run{suffix}"
    done = cli("export", run.run_id, "--db", str(db), "--format", "inspect", "--output", str(output))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    if suffix == ".json":
        assert json.loads(output.read_text())["eval"]["run_id"] == run.run_id  # plain JSON, not the .eval archive
    log = read_eval_log(str(output))
    assert log.status == "success" and log.eval.solver_args == {"strategy": "reask", "rounds": 1}
    turns = {(turn.item_id, turn.sample, turn.round): turn for turn in run.turns}
    assert sorted((sample.id, sample.epoch) for sample in log.samples) == sorted(
        (item["item_id"], sample + 1) for item in run.items for sample in range(2))
    for sample in log.samples:
        first, last = (turns[(sample.id, sample.epoch - 1, round_)] for round_ in (0, 1))
        assert [(m.role, m.text) for m in sample.messages] == [(m["role"], m["content"]) for m in last.messages]
        assert [(m.role, m.text) for m in sample.input] == [(m["role"], m["content"]) for m in first.messages[:-1]]
        assert sample.output.completion == last.response and sample.target == next(
            item["target"] for item in run.items if item["item_id"] == sample.id)
        assert sample.scores["selfcorrect_scorer"].value == {"round_0": int(first.correct),
                                                             "round_1": int(last.correct)}
        assert [r["response"] for r in sample.store[ROUNDS_KEY]] == [first.response, last.response]
    report = run.report()
    logged = log.results.scores[0].metrics
    for name, value in {"cl": report["cl"], "cs": report["cs"], "rss": report["rss"],
                        "acc_0": report["acc"][0], "acc_1": report["acc"][1]}.items():
        assert _same(logged[name].value, value), (name, logged[name].value, value)


@pytest.mark.model
@pytest.mark.slow
def test_export_refusals_are_one_line(stored_run, tmp_path):
    run, db = stored_run
    done = cli("export", run.run_id, "--db", str(db), "--format", "inspect")
    assert done.returncode == 2 and "--output" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="exact estimator"):
        eval_log(replace(run, config={**run.config, "estimator": "exact"}))


def test_export_spans_the_run_from_its_start_to_its_latest_turn(tmp_path):
    """The log's stats start when the run was made and end when its latest turn was stored (here one turn
    is dated a year on, as a run resumed then would be), so `inspect view` shows how long it took."""
    db = tmp_path / "runs.sqlite"
    run = evaluate(task="arithmetic", limit=3, rounds=1, backend=ScriptedBackend(), db=db)
    with sqlite3.connect(db) as store:
        store.execute("UPDATE turns SET created_at = '2031-05-06T07:08:09+00:00' WHERE item_id = ? AND round = 1",
                      (run.items[1]["item_id"],))
        (created,) = store.execute("SELECT created_at FROM runs").fetchone()
    done = cli("export", run.run_id, "--db", str(db), "--format", "inspect", "--output", str(tmp_path / "run.eval"))
    assert done.returncode == 0, done.stderr
    stats = read_eval_log(str(tmp_path / "run.eval")).stats
    assert (stats.started_at, stats.completed_at) == (created, "2031-05-06T07:08:09+00:00")


# --- the solver's and scorer's arguments, and the metrics' grouping of epochs -------------------------------

@pytest.mark.parametrize("name", ["critic", "exec-feedback", "exec-feedback-oracle", "oracle-stop", "best-of-n",
                                  "self-consistency"])
def test_strategies_needing_more_than_a_model_are_refused(name):
    with pytest.raises(UserError) as refused:
        selfcorrect_rounds(strategy=name)
    message = str(refused.value)
    assert "\n" not in message and name in message and "reask" in message and "critique" in message


@pytest.mark.parametrize("name", ["reask", "critique", "confident", "critical", "self-refine", "verify-then-revise"])
def test_strategies_that_only_talk_to_the_model_are_accepted(name):
    assert callable(selfcorrect_rounds(strategy=name, rounds=2))


REFUSED_TASK_FILE = '''
from inspect_ai import Task, task
from selfcorrect.inspect_ext import selfcorrect_dataset, selfcorrect_scorer

@task
def arithmetic():
    return Task(dataset=selfcorrect_dataset("arithmetic"), scorer=selfcorrect_scorer(task="arithmetic"))

@task
def unknown():
    return Task(dataset=selfcorrect_dataset("arithmetic-2"), scorer=selfcorrect_scorer(task="arithmetic"))
'''


@pytest.mark.parametrize("task, arguments, refused", [
    ("arithmetic", ["--solver", "selfcorrect/selfcorrect_rounds", "-S", "strategy=critic"],
     lambda: selfcorrect_rounds(strategy="critic")),
    ("unknown", [], lambda: load_task("arithmetic-2")),
], ids=["solver", "dataset"])
def test_inspect_eval_prints_a_refusal_as_one_line_without_a_traceback(tmp_path, task, arguments, refused):
    """`inspect eval` of a task whose solver (from the command line) or dataset (in the task file) we refuse:
    the refusal is our one line, as Inspect prints its own (no model is asked: the mock model is never reached)."""
    with pytest.raises(UserError) as caught:
        refused()
    (tmp_path / "task.py").write_text(REFUSED_TASK_FILE)
    done = subprocess.run(
        [INSPECT, "eval", f"task.py@{task}", *arguments, "--model", "mockllm/model", "--limit", "1",
         "--log-dir", str(tmp_path / "logs"), "--display", "plain"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    # The list of known tasks is left out of the comparison: plugins other tests registered in this process are
    # not known to Inspect's.
    [line] = [line for line in done.stdout.splitlines() if line.strip()]
    assert line.split("; choose one of")[0] == f"error: {caught.value}".split("; choose one of")[0], done.stdout


def test_bad_rounds_and_scorer_arguments_are_refused():
    with pytest.raises(UserError, match="rounds"):
        selfcorrect_rounds(rounds=0)
    with pytest.raises(UserError, match="either grader"):
        selfcorrect_scorer()
    with pytest.raises(UserError, match="either grader"):
        selfcorrect_scorer(match(), task="arithmetic")


def test_metrics_group_epochs_by_sample_and_leave_out_incomplete_items():
    # (sample id, round 0 right, round 1 right), epochs interleaved; "c" was scored in one epoch only.
    rows = [("c", 1, 1), ("a", 1, 1), ("b", 0, 1), ("a", 1, 0), ("b", 0, 0)]
    scores = [SampleScore(score=Score(value={"round_0": r0, "round_1": r1}), sample_id=sid) for sid, r0, r1 in rows]
    table = np.array([[[1, 1], [1, 0]], [[0, 1], [0, 0]]], dtype=bool)  # items a, b x 2 epochs x 2 rounds
    pair = metrics.pair_metrics(table[:, :, 0], table[:, :, 1], n_boot=1)
    assert (cl()(scores), cs()(scores), rss()(scores)) == (pair["cl"], pair["cs"], pair["rss"])
    assert round_accuracy()(scores) == {"acc_0": pair["acc1"], "acc_1": pair["acc2"]}
