"""The closed loop through the command line, on the real embedded model: measure the training part, build data,
train, measure base and trained model on the held-out part; then the trained model refused its training items."""

from __future__ import annotations

import json
import shlex

import pytest

from selfcorrect.api import load_run
from selfcorrect.models.identity import file_digest
from selfcorrect.split import question_key

from conftest import browser_helpers, cli

pytestmark = [pytest.mark.model, pytest.mark.slow]

TASK = ["--task-opt", "n=120", "--task-opt", "digits=2"]


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("improve")
    db, output = folder / "runs.sqlite", folder / "out"
    done = cli("improve", "--output", str(output), "--recipe", "cct", *TASK, "--train-limit", "16",
               "--test-limit", "8", "--json", "--db", str(db))
    assert done.returncode == 0, done.stderr
    return db, output, json.loads(done.stdout)


def test_the_loop_trains_on_one_part_and_measures_on_the_other(loop):
    db, output, result = loop
    train_run, base = load_run(result["train_run"], db), load_run(result["base_run"], db)
    trained = load_run(result["trained_runs"]["cct"], db)
    assert train_run.config["split"]["part"] == "train" and base.config["split"]["part"] == "test"
    assert base.config["model"] == "embedded" and trained.config["model"] == f"lora:{output / 'cct'}"
    assert base.config["strategy"] == trained.config["strategy"] == "reask"
    # The trained model's identity is its base's plus the adapter: its replies are never cached as the base's.
    adapter = file_digest(output / "cct" / "adapter.gguf")
    assert trained.config["backend"] == base.config["backend"].replace(":llama.cpp-", f":lora={adapter}:llama.cpp-", 1)
    rows = [json.loads(line) for line in (output / "cct.jsonl").read_text().splitlines()]
    card = json.loads((output / "cct" / "training_card.json").read_text())
    assert card["data"]["rows"] == len(rows) and card["base_model"] == "embedded"
    assert {row["source"]["run"] for row in rows} == {train_run.run_id}
    trained_keys = {question_key(item["question"]) for item in train_run.items}
    assert set(card["trained_questions"]) <= trained_keys
    assert not trained_keys & {question_key(item["question"]) for item in base.items}
    # Both held-out runs hold the same items, every one of them complete, and the comparison pairs them all.
    assert [i["item_id"] for i in base.items] == [i["item_id"] for i in trained.items]
    assert result["comparison"]["n_items"] == len(base.items) == 8


def test_the_same_command_again_resumes_every_step_and_its_follow_up_works_when_pasted(loop):
    db, output, result = loop
    again = cli("improve", "--output", str(output), "--recipe", "cct", *TASK, "--train-limit", "16",
                "--test-limit", "8", "--db", str(db))
    assert again.returncode == 0, again.stderr
    runs = (f"runs: base {result['base_run']}, cct {result['trained_runs']['cct']}; training items measured in "
            f"{result['train_run']}. Every pair: ")
    [line] = [line for line in again.stdout.splitlines() if line.startswith("runs: ")]
    assert line.startswith(runs), line  # the same runs, resumed
    assert "step 1/" not in again.stderr  # the finished training is not run again
    # The printed command names the store the loop used (not the default one), and pasted, it compares the runs.
    pasted = shlex.split(line.removeprefix(runs))
    assert pasted == ["selfcorrect", "compare", result["base_run"], result["trained_runs"]["cct"], "--db", str(db)]
    compared = cli(*pasted[1:], "--json")
    assert compared.returncode == 0 and json.loads(compared.stdout)["n_items"] == 8, compared.stderr
    # ... and the loop says what it reused: the training, and every turn of the three runs from the store.
    assert f"3. train cct: found the finished training in {output / 'cct'}, not repeated" in again.stderr
    for run_id in (result["train_run"], result["base_run"], result["trained_runs"]["cct"]):
        turns = len(load_run(run_id, db).turns)
        line = f"run {run_id}: {turns} turns, {turns} already stored, 0 from the response cache, 0 generated"
        assert line in again.stderr, again.stderr


def _cl_cs(run) -> tuple[float, float]:
    """CL and CS counted from the stored turns (one sample, one round): the page must plot these."""
    pairs = {}
    for turn in run.turns:
        pairs.setdefault(turn.item_id, {})[turn.round] = turn.correct
    right = [p[1] for p in pairs.values() if p[0]]
    wrong = [p[1] for p in pairs.values() if not p[0]]
    return sum(right) / len(right), sum(wrong) / len(wrong)


def test_the_improve_page_draws_each_model_and_the_training_curve(loop, tmp_path):
    browser = browser_helpers()
    db, output, result = loop
    assert result["page"] == str(output / "improve.html")
    with browser.headless_chromium(tmp_path / "profile") as chromium:
        browser.open_report(chromium, output / "improve.html")
        assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []

        def traces(div_id):
            return chromium.execute_script(
                f"return document.getElementById('{div_id}').data.map(t => [t.name, t.x, t.y])")

        plane = {name: (x, y) for name, x, y in traces("improve-plane")}
        for name, run_id in (("base", result["base_run"]), ("cct", result["trained_runs"]["cct"])):
            cl, cs = _cl_cs(load_run(run_id, db))
            assert plane[name][0][0] == pytest.approx(cs) and plane[name][1][0] == pytest.approx(cl), name
            assert f"{name}: RSS = 0.5" in plane  # its own no-change line
        card = json.loads((output / "cct" / "training_card.json").read_text())
        (name, steps, losses), = traces("curve-loss")
        assert name == "cct" and losses == [log["loss"] for log in card["losses"]]
        assert steps == [log["step"] for log in card["losses"]]
        text = chromium.find_element("tag name", "body").text
        assert result["base_run"] in text and "McNemar" in text


def test_a_trained_model_is_refused_its_training_questions(loop):
    db, output, result = loop
    before = load_run(result["train_run"], db)
    refused = cli("run", "--model", f"lora:{output / 'cct'}", *TASK, "--split", "train", "--limit", "16",
                  "--db", str(db))
    assert refused.returncode == 2
    assert "questions it was trained on" in refused.stderr and "--allow-train-items" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # Without a split, the whole task holds the training questions too.
    whole = cli("run", "--model", f"lora:{output / 'cct'}", *TASK, "--db", str(db))
    assert whole.returncode == 2 and "questions it was trained on" in whole.stderr
    assert len(load_run(result["train_run"], db).turns) == len(before.turns)


def test_data_from_a_held_out_run_is_refused(loop):
    db, output, result = loop
    made = cli("data", result["base_run"], "--recipe", "cct", "--output", str(output / "leak.jsonl"), "--db", str(db))
    assert made.returncode == 2 and "--split train" in made.stderr
    assert not (output / "leak.jsonl").exists()
