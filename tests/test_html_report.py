"""The HTML report (`selfcorrect report RUN... --html`) opened in headless Chromium. Of real runs of the embedded
model: no console errors, every plot drawn, the flipped-items table lists exactly the flips the stored turns hold,
the oracle run marked as an upper bound, and replies shown as text, never run. Of scripted runs on different
items: figures over their common items with compare's own numbers, the warnings of the terminal report, every
point visible above every interval, the first conversation of each run; and the training card of a trained model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest
from selenium.webdriver.common.by import By

from selfcorrect import evaluate, load_run
from selfcorrect.compare import compare_runs
from selfcorrect.errors import UserError
from selfcorrect.html_report import render_html
from selfcorrect.models.base import BackendError
from selfcorrect.store import Store
from selfcorrect.tasks import load_task

from conftest import ScriptedBackend, browser_helpers, cli


browser = browser_helpers()
SAMPLED = ("reask", "critique", "oracle-stop")
LIMITS = {"critique": 4}  # the others on 5


# The fixture `stored` runs the embedded model, so the tests on it are marked model and slow (~60 s with Chromium).
@pytest.fixture(scope="module")
def stored(tmp_path_factory, embedded, shared_data):
    """A store with three sampled arithmetic runs and one exact-estimator multiple-choice run. Greedy, the
    small model rarely changes an answer; three samples at temperature 1 make flips both ways likely."""
    db = tmp_path_factory.mktemp("html_runs") / "runs.sqlite"
    # critique on fewer items than the others: the report pairs the runs on the items they share.
    sampled = {
        name: evaluate(strategy=name, limit=LIMITS.get(name, 5), samples=3, temperature=1.0, max_tokens=64, db=db,
                       backend=embedded).run_id
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


def runs_table(driver) -> dict[str, dict[str, str]]:
    """The runs table as shown: run id -> column header -> cell text."""
    head = [th.text.replace("\n", " ") for th in driver.find_elements(By.CSS_SELECTOR, "table.runs th")]
    return {row.get_attribute("data-run-id"): dict(zip(head, [td.text for td in row.find_elements(By.TAG_NAME, "td")]))
            for row in driver.find_elements(By.CSS_SELECTOR, "table.runs tr[data-run-id]")}


def legend_texts(driver, div_id: str) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, f"#{div_id} .legendtext")]


@pytest.mark.model
@pytest.mark.slow
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

    # The three arithmetic runs are paired (three differences), the multiple-choice run of another task is not;
    # every run, the exact one included, shows what it sent.
    assert "NOT ALL PAIRED" in chromium.find_element(By.TAG_NAME, "body").text
    assert len(chromium.find_elements(By.CSS_SELECTOR, "table.pairs tr[data-a]")) == 3
    shown = chromium.find_elements(By.CSS_SELECTOR, "details.conversation")
    assert {e.get_attribute("data-run-id") for e in shown} == {*sampled.values(), exact_id}
    assert all(e.find_elements(By.CLASS_NAME, "message") for e in shown)

    # Paired on critique's four items: reask and oracle-stop each lose their fifth, and the page says so.
    text = " ".join(chromium.find_element(By.TAG_NAME, "body").text.split())
    assert "every figure of these runs is over the 4 items complete in each of them" in text
    assert "Left out: reask 1 of its 5 complete items; oracle-stop* 1 of its 5 complete items." in text

    # The flipped-items table holds exactly the stored flips of the common items, each with the reply after it.
    common = {item["item_id"] for item in load_run(sampled["critique"], db).items}
    expected = {}
    for run_id in sampled.values():
        expected.update({key: flip for key, flip in expected_flips(db, run_id).items() if key[1] in common})
    assert expected, "these runs should hold at least one flip for the table to be checked"
    rows = chromium.find_elements(By.CSS_SELECTOR, "tr[data-run]")
    shown = {}
    for row in rows:
        key = tuple(row.get_attribute(f"data-{name}") for name in ("run", "item", "sample", "round"))
        cells = row.find_elements(By.TAG_NAME, "td")
        shown[key] = (cells[2].text, cells[-1].find_elements(By.TAG_NAME, "pre")[-1].get_attribute("textContent"))
    assert len(rows) == len(shown)
    assert shown == expected


@pytest.mark.model
@pytest.mark.slow
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


@pytest.mark.model
@pytest.mark.slow
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


class ScriptedCorrections(ScriptedBackend):
    """Arithmetic answered by script: the first answer is right on the items in FIRST_RIGHT; re-asked, the model
    repeats it; under critique it breaks its right answer on arith-3 and fixes nothing, and every reply of the
    critique round says it was cut at --max-tokens."""

    FIRST_RIGHT = {0, 3, 6, 7, 8, 9}  # of the first six items two, of the next six four

    def __init__(self):
        super().__init__(self.answer, identity="scripted:corrections-v1")
        self.index = {question: k for k, question in enumerate(item.question for item in load_task("arithmetic").items)}

    def answer(self, messages, seed):
        question = messages[0]["content"]
        k = next(index for text, index in self.index.items() if text in question)
        value = eval(question.split("What is ")[1].split("?")[0])  # noqa: S307 - our own generated arithmetic
        right = k in self.FIRST_RIGHT and not (self.critique(messages) and k == 3)
        return f"The answer is {value if right else value + 1}."

    @staticmethod
    def critique(messages) -> bool:
        return any("find problems" in m["content"] for m in messages if m["role"] == "user")

    def complete(self, messages, max_tokens, temperature, seed):
        reply = super().complete(messages, max_tokens, temperature, seed)
        return dataclasses.replace(reply, finish_reason="length" if self.critique(messages) else "stop")


# elementsFromPoint at the centre of each of a plot's points: is the first data element there the point itself, or
# an interval (or another point) drawn over it? Plotly's layers ignore the pointer; hit-testing needs them back.
POINTS_ON_TOP = """
const div = document.getElementById(arguments[0]);
const style = document.createElement("style");
style.textContent = "#" + div.id + " .scatterlayer * { pointer-events: all !important; }";
document.head.appendChild(style);
const hidden = [];
div.querySelectorAll(".scatterlayer .trace").forEach((trace, index) => {
    const name = div._fullData[index].name;
    if (!div._fullData[index].showlegend || !trace.querySelector("path.point")) return;
    trace.querySelectorAll("path.point").forEach(point => {
        point.scrollIntoView({block: "center"});  // elementsFromPoint sees only the viewport
        const box = point.getBoundingClientRect();
        const top = document.elementsFromPoint(box.x + box.width / 2, box.y + box.height / 2)
            .find(element => element.closest(".scatterlayer"));
        if (top !== point) hidden.push(name);
    });
});
style.remove();
return hidden;
"""


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    """reask on 12 arithmetic items and critique on the first 6, one scripted model: their first answers are the
    same, right on 2 of the 6 common items and on 6 of reask's 12."""
    db = tmp_path_factory.mktemp("paired_runs") / "runs.sqlite"
    model = ScriptedCorrections()
    reask = evaluate(strategy="reask", limit=12, backend=model, db=db)
    critique = evaluate(strategy="critique", limit=6, backend=model, db=db)
    return db, reask.run_id, critique.run_id


def test_report_of_runs_on_different_items_is_paired_as_compare_pairs_them(paired_runs, chromium, tmp_path):
    db, reask, critique = paired_runs
    compared = cli("compare", reask, critique, "--db", str(db), "--json")
    assert compared.returncode == 0, compared.stderr
    comparison = json.loads(compared.stdout)
    # By hand: critique holds the first 6 items, all complete, so 6 are common and 6 of reask's are left out.
    assert comparison["n_items"] == 6 and comparison["left_out"] == {reask: 6, critique: 0}
    page = tmp_path / "paired.html"
    written = cli("report", reask, critique, "--db", str(db), "--html", str(page))
    assert written.returncode == 0, written.stderr
    browser.open_report(chromium, page)
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []
    text = chromium.find_element(By.TAG_NAME, "body").text

    # Every figure is over the common items, and the page says how many of each run's were left out.
    assert f"over the {comparison['n_items']} items complete in each of them" in text
    assert f"Left out: reask {comparison['left_out'][reask]} of its 12 complete items." in text
    table = runs_table(chromium)
    for row in comparison["runs"]:
        shown = table[row["run_id"]]
        assert shown["items figured"] == str(comparison["n_items"])
        assert (shown["first acc"], shown["final acc"]) == (f"{row['acc_first']:.3f}", f"{row['acc_final']:.3f}")
        assert (shown["CL"], shown["CS"]) == (f"{row['cl']:.3f}", f"{row['cs']:.3f}")
        assert shown["tokens / item"] == f"{row['tokens_per_item']:.0f}"
    # By hand: on the common items both runs' first answers are right on arith-0 and arith-3 (on all of reask's, 6 of 12).
    assert [row["acc_first"] for row in comparison["runs"]] == [pytest.approx(2 / 6)] * 2
    # The plane's lines of equal Acc2 are for the mean Acc1 over the common items, not over each run's own.
    acc1 = sum(row["acc_first"] for row in comparison["runs"]) / len(comparison["runs"])
    assert f"drawn for Acc1 = {acc1:.3f}" in text

    # compare's paired difference, interval and McNemar p, as compare gives them.
    pair = comparison["pairs"][0]
    cells = [td.text for td in chromium.find_elements(By.CSS_SELECTOR, f'tr[data-a="{pair["a"]}"][data-b="{pair["b"]}"] td')]
    assert cells == ["reask", "critique", f"{pair['diff']:+.3f}", f"[{pair['diff_ci'][0]:+.3f}, {pair['diff_ci'][1]:+.3f}]",
                     f"{pair['mcnemar_p']:.4f}"]

    # The terminal report's warnings and grader, the same words in the HTML.
    terminal = cli("report", critique, "--db", str(db))
    cut = next(line for line in terminal.stdout.splitlines() if line.startswith("replies cut short"))
    # By hand: 6 items, each with 3 replies of which the critique round's 2 were cut.
    assert cut.startswith("replies cut short: 12 of 18 at --max-tokens, 0 at the model's context window")
    notices = [li.text for li in chromium.find_elements(By.CSS_SELECTOR, "ul.notices li.warning")]
    assert notices == [f"critique: {cut}"]
    grader = re.search(r"^grader: (.+)$", terminal.stdout, re.M).group(1)
    assert [shown["grader"] for shown in table.values()] == [grader, grader]

    # Critique's CL interval spans the whole axis through reask's point: both points are still on top.
    assert chromium.execute_script(POINTS_ON_TOP, "cl-cs-plane") == []

    # The first conversation of each run is on the first common item, message for message as stored.
    for run_id in (reask, critique):
        exported = cli("export", run_id, "--format", "jsonl", "--db", str(db)).stdout.splitlines()
        last = max((t for t in map(json.loads, exported) if t["item_id"] == comparison["items"][0] and t["sample"] == 0),
                   key=lambda t: t["round"])
        shown = chromium.find_element(By.CSS_SELECTOR, f'details.conversation[data-run-id="{run_id}"]')
        messages = [{"role": m.find_element(By.CLASS_NAME, "role").get_attribute("textContent"),
                     "content": m.find_element(By.TAG_NAME, "pre").get_attribute("textContent")}
                    for m in shown.find_elements(By.CLASS_NAME, "message")]
        assert messages == last["messages"]


def test_report_names_the_training_card_of_a_trained_model(paired_runs, chromium, tmp_path):
    db, reask, _ = paired_runs
    run = load_run(reask, db)
    adapter = tmp_path / "cct"
    adapter.mkdir()
    card = {"base_model": "embedded", "data": {"recipe": "cct", "rows": 12}, "seconds": 3.4}
    (adapter / "training_card.json").write_text(json.dumps(card))
    # The same turns as if a trained model had made them, and a second whose adapter has since been deleted.
    trained = dataclasses.replace(run, config={**run.config, "model": f"lora:{adapter}"})
    moved = dataclasses.replace(run, run_id="moved0000000", config={**run.config, "model": f"lora:{tmp_path / 'gone'}"})
    page = tmp_path / "trained.html"
    page.write_text(render_html([trained, moved]), encoding="utf-8")

    browser.open_report(chromium, page)
    notices = [li.text for li in chromium.find_elements(By.CSS_SELECTOR, "ul.notices li")]
    assert f"reask lora:cct: training card: {adapter / 'training_card.json'} (base embedded, recipe cct, 12 rows, 3 s of training)" in notices
    assert any(text.startswith("reask lora:gone: training card: not readable now") and "no such directory" in text
               for text in notices), notices


def test_a_run_with_no_complete_item_is_left_out_and_the_others_still_pair(paired_runs, tmp_path):
    """A run whose correction requests all failed has no complete item: it pairs with nothing, and the other runs
    of its task are still paired on their common items, as compare pairs them without it."""
    db, reask, critique = paired_runs

    def first_answers_only(messages, seed):
        if len(messages) > 1:
            raise BackendError("scripted: the server went away after the first answers")
        return ScriptedBackend.default_reply(messages, seed)

    with pytest.raises(UserError, match="went away"):
        evaluate(strategy="critical", limit=3, backend=ScriptedBackend(first_answers_only), db=db)
    broken = next(run["run_id"] for run in Store(db).runs() if run["config"]["strategy"] == "critical")
    runs = [load_run(run_id, db=db) for run_id in (reask, broken, critique)]
    assert runs[1].estimation.per_item(runs[1]) == {}  # what the test is about: no item of it is complete
    page = render_html(runs, n_boot=200)
    assert "NOT PAIRED" not in page
    comparison = compare_runs([runs[0], runs[2]], n_boot=200)
    assert f"over the {comparison['n_items']} items complete in each of them" in page
    assert "Left out: reask 6 of its 12 complete items; critical, which has no complete item." in page


def test_a_lone_incomplete_run_costs_tokens_per_item_of_its_complete_items(tmp_path):
    """tokens / item is over the items figured: of a run stopped part way, the turns of items it did not finish
    are not counted."""
    db = tmp_path / "runs.sqlite"
    calls = itertools.count()

    def fails_after_eleven(messages, seed):  # the server goes away mid-run: the run stops starting new turns
        if next(calls) >= 11:
            raise BackendError("scripted: the server went away")
        return ScriptedBackend.default_reply(messages, seed)

    with pytest.raises(UserError, match="went away"):
        evaluate(strategy="reask", limit=8, backend=ScriptedBackend(fails_after_eleven), db=db)
    run = load_run(Store(db).runs()[0]["run_id"], db=db)
    complete = set(run.estimation.per_item(run))
    assert 0 < len(complete) < 8  # what the test is about: some items complete, some not
    expected = sum(t.prompt_tokens + t.completion_tokens for t in run.turns if t.item_id in complete) / len(complete)
    row = re.search(f'<tr data-run-id="{run.run_id}">(.*?)</tr>', render_html([run], n_boot=200)).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row)[-1] == f"{expected:.0f}"
