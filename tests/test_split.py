"""The seeded split by question content (`--split train|test`) through `evaluate` and the command line."""

from __future__ import annotations

import pytest

from selfcorrect.api import evaluate
from selfcorrect.errors import UserError
from selfcorrect.tasks import load_task
from selfcorrect.split import question_key

from conftest import ScriptedBackend, cli

OPTIONS = {"n": "200", "digits": "2"}


def _questions(run) -> set[str]:
    return {item["question"] for item in run.items}


def test_parts_are_disjoint_by_content_and_cover_the_task(tmp_path):
    db = tmp_path / "runs.sqlite"
    train = evaluate(task_options=OPTIONS, split="train", rounds=0, backend=ScriptedBackend(), db=db)
    test = evaluate(task_options=OPTIONS, split="test", rounds=0, backend=ScriptedBackend(), db=db)
    everything = {item.question for item in load_task("arithmetic", None, OPTIONS).items}
    assert not _questions(train) & _questions(test)
    assert _questions(train) | _questions(test) == everything
    assert 60 < len(_questions(test)) < 140  # about half of 200 at the default share
    assert train.run_id != test.run_id
    assert test.config["split"] == {"part": "test", "seed": 0, "test_share": 0.5}
    # The split is part of the config: the same command resumes, another seed is another run with other items.
    again = evaluate(task_options=OPTIONS, split="test", rounds=0, backend=ScriptedBackend(), db=db)
    assert again.run_id == test.run_id and again.generated == 0
    other = evaluate(task_options=OPTIONS, split="test", split_seed=1, rounds=0, backend=ScriptedBackend(), db=db)
    assert _questions(other) != _questions(test)


def test_limit_applies_after_the_split_and_a_share_moves_items(tmp_path):
    db = tmp_path / "runs.sqlite"
    small = evaluate(task_options=OPTIONS, split="test", test_share=0.2, rounds=0, backend=ScriptedBackend(), db=db)
    large = evaluate(task_options=OPTIONS, split="test", test_share=0.8, rounds=0, backend=ScriptedBackend(), db=db)
    assert len(small.items) < len(large.items)
    assert _questions(small) <= _questions(large)  # one hash per question: a larger share only adds questions
    limited = evaluate(task_options=OPTIONS, split="test", limit=7, rounds=0, backend=ScriptedBackend(), db=db)
    assert [item["question"] for item in limited.items] == [
        item["question"] for item in evaluate(task_options=OPTIONS, split="test", rounds=0,
                                               backend=ScriptedBackend(), db=db).items
    ][:7]


def test_the_same_question_under_two_ids_falls_in_one_part(tmp_path):
    data = tmp_path / "qa.jsonl"
    lines = [f'{{"id": "q{i}", "question": "What is {i % 40} plus one?", "answer": "{i % 40 + 1}"}}' for i in range(80)]
    data.write_text("\n".join(lines) + "\n")
    db = tmp_path / "runs.sqlite"
    options = {"grader": "number"}
    train = evaluate(task="custom", data=data, task_options=options, split="train", rounds=0, backend=ScriptedBackend(), db=db)
    test = evaluate(task="custom", data=data, task_options=options, split="test", rounds=0, backend=ScriptedBackend(), db=db)
    assert len(train.items) + len(test.items) == 80
    assert not {question_key(q) for q in _questions(train)} & {question_key(q) for q in _questions(test)}


@pytest.mark.parametrize("kwargs, flag", [
    ({"split": "dev"}, "--split dev"),
    ({"split": "test", "test_share": 1.0}, "--test-share 1"),
    ({"split": "test", "test_share": 0.0}, "--test-share 0"),
])
def test_bad_split_arguments_are_refused_before_the_store_opens(tmp_path, kwargs, flag):
    db = tmp_path / "runs.sqlite"
    with pytest.raises(UserError, match=flag):
        evaluate(task_options=OPTIONS, rounds=0, backend=ScriptedBackend(), db=db, **kwargs)
    assert not db.exists()


def test_cli_split_flag_and_bad_value(tmp_path):
    db = tmp_path / "runs.sqlite"
    bad = cli("run", "--split", "validation", "--db", str(db))
    assert bad.returncode == 2 and "--split validation" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not db.exists()


def test_improve_refuses_bad_settings_before_it_measures_anything(tmp_path):
    db, output = tmp_path / "runs.sqlite", tmp_path / "out"
    for args, flag in ((["--epochs", "0"], "--epochs"), (["--recipe", "nope"], "--recipe nope"),
                       (["--test-share", "1.5"], "--test-share")):
        bad = cli("improve", "--output", str(output), *args, "--db", str(db))
        # One error line, last (the loop may have named its first step before the step found the error).
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and flag in lines[-1] and len(lines) <= 2, bad.stderr
    assert not db.exists() and not output.exists()
