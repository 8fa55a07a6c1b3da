"""The HTML report (`selfcorrect report RUN... --html`) of real runs of the embedded model, opened in
headless Chromium: no console errors, every plot drawn, the flipped-items table lists exactly the flips
the stored turns hold, the oracle run marked as an upper bound, and replies shown as text, never run."""

from __future__ import annotations

import dataclasses
import json

import pytest
from selenium.webdriver.common.by import By

from selfcorrect import evaluate, load_run
from selfcorrect.html_report import render_html

from conftest import browser_helpers, cli

pytestmark = [pytest.mark.model, pytest.mark.slow]  # its fixtures run real runs and start Chromium: ~60 s


browser = browser_helpers()
SAMPLED = ("reask", "critique", "oracle-stop")


@pytest.fixture(scope="module")
def stored(tmp_path_factory, embedded, shared_data):
    """A store with three sampled arithmetic runs and one exact-estimator multiple-choice run. Greedy, the
    small model rarely changes an answer; three samples at temperature 1 make flips both ways likely."""
    db = tmp_path_factory.mktemp("html_runs") / "runs.sqlite"
    sampled = {
        name: evaluate(strategy=name, limit=4, samples=3, temperature=1.0, max_tokens=64, db=db, backend=embedded).run_id
        for name in SAMPLED
    }
    exact = evaluate(task="mcq", data=shared_data / "commonsense_qa.jsonl", strategy="confident", limit=2,
                     db=db, backend=embedded)
    assert exact.estimator == "exact"
    return db, sampled, exact.run_id


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    with browser.headless_chromium(tmp_path_factory.mktemp("chromium_profile")) as driver:
        yield driver


def expected_flips(db, run_id: str) -> dict[tuple, tuple[str, str]]:
    """From the exported turns, independently of the report: (run, item, sample, round) of every turn whose
    grade differs from the same conversation's previous turn -> (change, reply after)."""
    exported = cli("export", run_id, "--format", "jsonl", "--db", str(db))
    assert exported.returncode == 0, exported.stderr
    turns = {(t["item_id"], t["sample"], t["round"]): t for t in map(json.loads, exported.stdout.splitlines())}
    flips = {}
    for (item, sample, round_), turn in turns.items():
        before = turns.get((item, sample, round_ - 1))
        if before is not None and before["correct"] != turn["correct"]:
            change = "right → wrong" if before["correct"] else "wrong → right"
            flips[(run_id, item, str(sample), str(round_))] = (change, turn["response"])
    return flips


def legend_texts(driver, div_id: str) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, f"#{div_id} .legendtext")]


def test_html_report_of_real_runs_renders_in_chromium(stored, chromium, tmp_path):
    db, sampled, exact_id = stored
    page = tmp_path / "report.html"
    written = cli("report", *sampled.values(), exact_id, "--db", str(db), "--html", str(page))
    assert written.returncode == 0, written.stderr
    assert str(page) in written.stdout

    browser.open_report(chromium, page)
    severe = [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []

    # Every plot is drawn: the accuracy plot, the CL-CS plane, and one flow per sampled run (none for exact).
    plots = chromium.find_elements(By.CSS_SELECTOR, ".plotly-graph-div")
    ids = {div.get_attribute("id") for div in plots}
    assert ids == {"accuracy-by-round", "cl-cs-plane", *(f"flow-{run_id}" for run_id in sampled.values())}
    for div in plots:
        assert chromium.execute_script("return arguments[0]._fullLayout !== undefined", div)
        assert div.find_elements(By.CSS_SELECTOR, ".main-svg")
    for run_id in sampled.values():
        assert chromium.find_elements(By.CSS_SELECTOR, f"#flow-{run_id} .sankey-link")
    assert "Exact estimator" in chromium.find_element(By.TAG_NAME, "body").text

    # The plane has a point for every run, the exact one included; only the oracle run is an upper bound.
    plane = legend_texts(chromium, "cl-cs-plane")
    for name in (*SAMPLED, "confident"):
        assert any(text.startswith(name) for text in plane), (name, plane)
    for div_id in ("accuracy-by-round", "cl-cs-plane"):
        marked = [text for text in legend_texts(chromium, div_id) if "UPPER BOUND" in text]
        assert marked == ["oracle-stop* UPPER BOUND"]
    run_cells = [e.text for e in chromium.find_elements(By.CSS_SELECTOR, "table tr td:first-child")]
    assert "oracle-stop*" in run_cells and "reask" in run_cells

    # The flipped-items table holds exactly the stored flips, each with the reply after it.
    expected = {}
    for run_id in sampled.values():
        expected.update(expected_flips(db, run_id))
    assert expected, "these runs should hold at least one flip for the table to be checked"
    rows = chromium.find_elements(By.CSS_SELECTOR, "tr[data-run]")
    shown = {}
    for row in rows:
        key = tuple(row.get_attribute(f"data-{name}") for name in ("run", "item", "sample", "round"))
        cells = row.find_elements(By.TAG_NAME, "td")
        shown[key] = (cells[2].text, cells[-1].find_elements(By.TAG_NAME, "pre")[-1].get_attribute("textContent"))
    assert len(rows) == len(shown)
    assert shown == expected


def test_markup_in_replies_and_questions_is_shown_not_run(stored, chromium, tmp_path):
    db, sampled, _ = stored
    run = load_run(sampled["critique"], db)
    payload = '</pre></td><script>window.injected = true;</script><img src="x" onerror="window.injected = true">'
    first = next(turn for turn in run.turns if turn.round == 0)
    # Turn the first item's correction into a flip whose reply is markup, and put markup in its question.
    turns = [dataclasses.replace(turn, response=payload, correct=not first.correct)
             if (turn.item_id, turn.sample, turn.round) == (first.item_id, first.sample, 1) else turn
             for turn in run.turns]
    items = [{**item, "question": "<b>bold?</b> " + item["question"]} for item in run.items]
    page = tmp_path / "hostile.html"
    page.write_text(render_html([dataclasses.replace(run, turns=turns, items=items)]), encoding="utf-8")

    browser.open_report(chromium, page)
    assert chromium.execute_script("return window.injected === undefined")
    row = chromium.find_element(By.CSS_SELECTOR, f'tr[data-item="{first.item_id}"]')
    reply_after = row.find_elements(By.TAG_NAME, "td")[-1].find_elements(By.TAG_NAME, "pre")[-1]
    assert reply_after.get_attribute("textContent") == payload
    assert row.find_elements(By.TAG_NAME, "b") == []
    assert "<b>bold?</b>" in row.text


def test_report_of_several_runs_as_json_and_bad_html_path(stored, tmp_path):
    db, sampled, _ = stored
    listed = cli("report", *sampled.values(), "--db", str(db), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [report["run_id"] for report in json.loads(listed.stdout)] == list(sampled.values())

    missing = tmp_path / "no_such_dir" / "report.html"
    refused = cli("report", sampled["reask"], "--db", str(db), "--html", str(missing))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--html" in refused.stderr
    assert not missing.parent.exists()
