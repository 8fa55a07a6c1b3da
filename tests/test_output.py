"""What the command line prints for people: tables that never cut an id or a figure (piped, or on a narrow
terminal), a report header that names the grader, the reason beside every n/a, progress lines when standard
error is not a terminal, and --version. Commands run in this process (`cli`: stdout and stderr apart, the console
made for each command as a new process makes it, so COLUMNS applies), --version in a process of its own; the
stores are made with the scripted backend (the CLI has no scripted model), except for the progress test, which
runs the real embedded model."""

from __future__ import annotations

import functools
import io
import json
import re
from collections import Counter
from importlib.metadata import version

import pytest

from selfcorrect import evaluate

from conftest import SHARED_DATA, ScriptedBackend, cli, run_cli

NARROW = {"COLUMNS": "40"}


class UniformScorer(ScriptedBackend):
    """Scores every option label alike: enough for the exact estimator to run."""

    def option_probs(self, messages, answer_prefix, labels):
        return [1.0 / len(labels)] * len(labels)


def _always(reply: str):
    return lambda messages, seed: reply


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding: two arithmetic runs on the same items (figures of every kind), one custom run whose every
    first answer is right and one whose every answer is wrong, two runs of two samples per item, one run of the
    exact estimator, and one custom run whose grader was inferred from the data."""
    folder = tmp_path_factory.mktemp("output")
    db = folder / "runs.sqlite"
    quiz = folder / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is 2 + 2? ({i})", "answer": "4"}) + "\n"
                            for i in range(6)))
    custom = {"task": "custom", "data": quiz, "db": db}
    runs = {
        "reask": evaluate(task="arithmetic", limit=8, rounds=2, backend=ScriptedBackend(), db=db),
        "critique": evaluate(task="arithmetic", limit=8, rounds=2, strategy="critique", backend=ScriptedBackend(), db=db),
        "right": evaluate(**custom, task_options={"grader": "number"}, rounds=2,
                          backend=ScriptedBackend(_always("The answer is 4."), identity="scripted:right")),
        "wrong": evaluate(**custom, task_options={"grader": "number"},
                          backend=ScriptedBackend(_always("The answer is 5."), identity="scripted:wrong")),
        "sampled": evaluate(task="arithmetic", limit=4, samples=2, temperature=0.7, backend=ScriptedBackend(), db=db),
        "sampled-critique": evaluate(task="arithmetic", limit=4, samples=2, temperature=0.7, strategy="critique",
                                     backend=ScriptedBackend(), db=db),
        "exact": evaluate(task="mcq", data=SHARED_DATA / "boolq.jsonl", limit=3, estimator="exact",
                          backend=UniformScorer(), db=db),
        "inferred": evaluate(**custom, backend=ScriptedBackend(_always("The answer is 4."), identity="scripted:right")),
    }
    assert runs["inferred"].config["task"].get("grader_inferred"), "the custom task no longer says it inferred"
    return db, {name: run.run_id for name, run in runs.items()}


def _cli(*args: str, env: dict | None = None) -> str:
    done = cli(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@functools.lru_cache(maxsize=None)  # the same --json answer serves both widths
def _json(*args: str):
    return json.loads(_cli(*args, "--json"))


def _figures(text: str) -> Counter:
    """Every decimal figure the text shows whole, with its sign if it shows one, and every n/a."""
    return Counter(re.findall(r"(?<![\d.])[-+]?\d+\.\d+(?![\d.])", text)) + Counter(re.findall(r"\bn/a\b", text))


def _shown(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _difference(value) -> str:
    """A difference as the tables show it: with its sign, + too (a change, not a level)."""
    return "n/a" if value is None else ("+" if value >= 0 else "-") + f"{abs(value):.3f}"


def _report_figures(report: dict) -> Counter:
    """The figures the report's tables show, formatted as the tables format them."""
    shown = [_shown(acc) for acc in report["acc"]] + [_shown(x) for ci in report["acc_ci"] for x in ci]
    for name in ("cl", "cs", "rss", "acc_inf"):
        shown += [_shown(report[name])] + [_shown(x) for x in report["ci"].get(name) or []]
    shown += [_difference(report["delta"])] + [_difference(x) for x in report["ci"].get("delta") or []]
    for pair in report["pairs"]:
        shown += [_shown(pair[name]) for name in ("cl", "cs", "rss")]
        shown += [_shown(share) for share in pair["transitions"].values()] + [_shown(pair["mcnemar_p"], 4)]
    return Counter(shown)


def _compare_figures(comparison: dict) -> Counter:
    shown = []
    for row in comparison["runs"]:
        shown += [_shown(row["acc_final"]), *(_shown(x) for x in row["acc_final_ci"]), _difference(row["delta"])]
        shown += [_shown(row[name]) for name in ("cl", "cs", "rss", "acc_per_1k_tokens")]
    for pair in comparison["pairs"]:
        shown += [_difference(pair["diff"]), *(_difference(x) for x in pair["diff_ci"]), _shown(pair["mcnemar_p"], 4)]
    return Counter(shown)


def _missing(expected: Counter, text: str) -> Counter:
    return expected - _figures(text)


@pytest.mark.parametrize("env", [None, NARROW], ids=["piped", "COLUMNS=40"])
def test_tables_show_every_run_id_and_every_figure_whole(store, env):
    """`runs`, `report`, `compare` and `tasks`, piped and at 40 columns: every full run id and every figure that
    --json gives, to the digits the table prints, and no ellipsis. (Before: ids came out as `465b9…` and figures
    as `0.…` at 80 columns piped, and worse at 40.)"""
    db, ids = store
    listed = _cli("runs", "--db", str(db), env=env)
    assert "…" not in listed, listed
    for row in _json("runs", "--db", str(db)):
        assert re.search(rf"(?<![0-9a-f]){row['run_id']}(?![0-9a-f])", listed), (row["run_id"], listed)
        assert re.search(rf"│ {row['n_turns']} ", listed)

    for name in ("reask", "right", "wrong", "sampled", "exact"):
        shown = _cli("report", ids[name], "--db", str(db), env=env)
        assert "…" not in shown and ids[name] in shown, shown
        assert not _missing(_report_figures(_json("report", ids[name], "--db", str(db))), shown), shown

    for pair in (("reask", "critique"), ("right", "wrong"), ("sampled", "sampled-critique")):
        args = ("compare", *(ids[name] for name in pair), "--db", str(db))
        shown = _cli(*args, env=env)
        assert "…" not in shown, shown
        comparison = _json(*args)
        assert not _missing(_compare_figures(comparison), shown), shown
        for row in comparison["runs"]:
            assert f"run {row['run_id']}," in shown  # the full id `compare` takes, beside the run's label
            if row["tokens_per_item"] is not None:
                assert re.search(rf"(?<!\d){row['tokens_per_item']:.0f}(?!\d)", shown)

    tasks = _cli("tasks", env=env)
    assert "…" not in tasks, tasks
    for row in _json("tasks"):
        assert re.search(rf"│ {row['task']} ", tasks) and (row["items"] is None or f" {row['items']} " in tasks), tasks


def test_the_improve_table_shows_the_difference_from_the_base_with_its_sign(store):
    """improve's table, on a comparison of two stored runs as the loop makes it (the base first): the trained
    model's "Acc2 - base" is the paired difference with its interval, each with its sign."""
    from rich.console import Console

    from selfcorrect.report import print_improvement

    db, ids = store
    comparison = _json("compare", ids["reask"], ids["critique"], "--db", str(db))
    result = {"base_run": ids["reask"], "trained_runs": {"cct": ids["critique"]}, "comparison": comparison,
              "cards": {"cct": {"data": {"rows": 3}, "seconds": 2.0}}}
    console = Console(file=io.StringIO(), record=True, width=300)
    print_improvement(result, console)
    (pair,) = comparison["pairs"]
    assert (pair["a"], pair["b"]) == (ids["reask"], ids["critique"])
    trained = next(line for line in console.export_text().splitlines() if line.startswith("│ cct "))
    low, high = pair["diff_ci"]
    assert f" {_difference(pair['diff'])} [{_difference(low)}, {_difference(high)}] " in trained, trained


def test_report_and_compare_name_the_grader(store):
    """The report header says which grader gave the verdicts: the task's own from the registry, the custom task's
    --grader, one inferred from the data (and how to choose another), or none for the exact estimator; compare says
    it for all runs and beside each run. (Before: only the grader's version was shown, never its name.)"""
    db, ids = store
    grader_lines = {
        name: [line for line in _cli("report", ids[name], "--db", str(db)).splitlines() if line.startswith("grader:")]
        for name in ("reask", "right", "inferred", "exact")
    }
    assert grader_lines == {
        "reask": ["grader: number"],  # arithmetic's grader in the task registry
        "right": ["grader: number"],  # --grader number
        "inferred": ["grader: number (inferred; pass --grader to choose)"],
        "exact": ["grader: none: the exact estimator scores option labels (their probabilities), no reply is graded"],
    }
    shown = _cli("compare", ids["reask"], ids["critique"], "--db", str(db))
    assert shown.splitlines()[0] == "2 runs on 8 common items, estimator: sampling, grader: number"
    assert f"reask: run {ids['reask']}, grader: number" in shown.splitlines()
    assert f"critique: run {ids['critique']}, grader: number" in shown.splitlines()


def _na_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("n/a ")]


def test_every_na_says_why(store):
    """Every n/a in a table has a line under it saying why: CL when no first answer was right, CS when every one
    was, RSS when the accuracy before the step is 0 or 1, Acc_inf when CL or CS is missing, McNemar's test with
    several samples per item or with the exact estimator. (Before: a bare n/a, no reason anywhere.)"""
    db, ids = store
    wrong = _cli("report", ids["wrong"], "--db", str(db))
    assert _na_lines(wrong) == [
        "n/a  CL: none of the first answers was right, so there was no right answer to keep",
        "n/a  RSS: the accuracy of the first answers is 0; RSS is defined only strictly between 0 and 1",
        "n/a  Acc_inf: it needs both CL and CS",
    ]
    right = _cli("report", ids["right"], "--db", str(db))  # two rounds: the last step and every step
    assert _na_lines(right) == [
        "n/a  CS: all of the answers after correction 1 were right, so there was no wrong answer to fix",
        "n/a  RSS: the accuracy of the answers after correction 1 is 1; RSS is defined only strictly between 0 and 1",
        "n/a  Acc_inf: it needs both CL and CS",
        "n/a  CS (0->1, 1->2): all of the answers before the step were right, so there was no wrong answer to fix",
        "n/a  RSS (0->1, 1->2): the accuracy of the answers before the step is 1; RSS is defined only strictly "
        "between 0 and 1",
    ]
    exact = _cli("report", ids["exact"], "--db", str(db))
    assert _na_lines(exact) == [
        "n/a  McNemar p (0->1): the exact estimator gives probabilities, not right/wrong outcomes to count"]

    both = _cli("compare", ids["right"], ids["wrong"], "--db", str(db))
    right_label, wrong_label = f"reask {ids['right'][:6]}", f"reask {ids['wrong'][:6]}"
    assert _na_lines(both) == [  # compare has no Acc_inf column
        f"n/a  CS ({right_label}): all of the first answers were right, so there was no wrong answer to fix",
        f"n/a  RSS ({right_label}): the accuracy of the first answers is 1; RSS is defined only strictly between 0 and 1",
        f"n/a  CL ({wrong_label}): none of the first answers was right, so there was no right answer to keep",
        f"n/a  RSS ({wrong_label}): the accuracy of the first answers is 0; RSS is defined only strictly between 0 and 1",
    ]
    sampled = _cli("compare", ids["sampled"], ids["sampled-critique"], "--db", str(db))
    assert _na_lines(sampled) == ["n/a  McNemar p (reask vs critique): with several samples per item there is no "
                                  "single right/wrong outcome per item to pair"]


@pytest.mark.model
def test_progress_lines_on_a_stderr_that_is_not_a_terminal(tmp_path):
    """A run whose standard error is a pipe writes a progress line there every SELFCORRECT_PROGRESS_SECONDS:
    first the run, its size and what was stored before, then count, share, time and time left, and a last line
    at the end; stdout stays the report alone. (Before: nothing on stderr until the end, then nothing at all.)"""
    db = tmp_path / "runs.sqlite"
    done = cli("run", "--limit", "2", "--rounds", "1", "--max-tokens", "8", "--db", str(db), "--json",
               env={"SELFCORRECT_PROGRESS_SECONDS": "0.05"})
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout)["run_id"]
    lines = done.stderr.splitlines()
    assert lines[0] == f"run {run_id} started: 4 turns, 0 already stored", done.stderr
    duration = r"(?:\d+ s|\d+ min \d\d s|\d+ h \d\d min)"  # 7 s, 1 min 05 s, 2 h 03 min
    pattern = re.compile(rf"run {run_id}: (\d)/4 turns \((\d+)%\), {duration}, "
                         rf"(about {duration} left|time left not known yet|finishing|done)")
    found = [pattern.fullmatch(line) for line in lines[1:]]
    assert all(found) and len(found) >= 2, done.stderr
    counts = [int(match[1]) for match in found]
    assert counts == sorted(counts) and all(int(m[2]) == 100 * int(m[1]) // 4 for m in found), done.stderr
    assert found[-1][1] == "4" and found[-1][3] == "done" and all(m[3] != "done" for m in found[:-1]), done.stderr


def test_a_bad_progress_interval_is_one_line_before_any_work(tmp_path):
    """(Before: the variable was not read; the run ran.)"""
    db = tmp_path / "runs.sqlite"
    done = cli("run", "--limit", "1", "--max-tokens", "1", "--db", str(db), env={"SELFCORRECT_PROGRESS_SECONDS": "soon"})
    assert done.returncode == 2 and not db.exists()
    assert done.stderr.strip() == ("error: SELFCORRECT_PROGRESS_SECONDS=soon: expected the seconds between "
                                   "progress lines, e.g. 10 (0 turns them off)")


def test_version():
    """(Before: `No such option: --version`, exit code 2.) In a process of its own: what the installed
    distribution says, through `python -m selfcorrect`."""
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"selfcorrect {version('selfcorrect')}\n" == "selfcorrect 0.1.0\n"


def test_the_training_card_line_of_a_stored_model_spec(tmp_path):
    """A report of a run of a trained model names its card; a card gone since says so, and a spec this version
    cannot read (stored by another) or of another kind says nothing, rather than failing the report."""
    from selfcorrect.report import training_card_line

    assert training_card_line("embedded") is None and training_card_line("nokind:x") is None
    line = training_card_line(f"lora:{tmp_path / 'gone'}")
    assert line.startswith("training card: not readable now (") and str(tmp_path / "gone") in line, line
