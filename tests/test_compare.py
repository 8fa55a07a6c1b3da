"""`compare`: runs paired by item, hand-checkable differences, McNemar where outcomes are binary, and
the command line on real runs of the embedded model."""

from __future__ import annotations

import json
from math import comb

import pytest

from selfcorrect import evaluate, load_run
from selfcorrect.compare import compare_runs
from selfcorrect.errors import UserError

from conftest import ScriptedBackend, cli


def _fixed(right_items: set[int]):
    """A scripted model that answers item k right exactly when k is in `right_items`, in every round."""

    def reply(messages, seed):
        question = messages[0]["content"]
        expression = question.split("What is ")[1].split("?")[0]
        value = eval(expression)  # noqa: S307 - our own generated arithmetic
        k = _item_index[question]
        return f"The answer is {value if k in right_items else value + 1}."

    return ScriptedBackend(reply, identity=f"scripted:right={sorted(right_items)}")


_item_index: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _index_items():
    from selfcorrect.tasks import load_task

    task = load_task("arithmetic")
    _item_index.update({task.prompt(item): k for k, item in enumerate(task.items)})


def test_differences_and_mcnemar_by_hand(tmp_path):
    db = tmp_path / "r.sqlite"
    # Run a gets items 0-5 right; run b gets 0-3 and 6-9 right: b fixes 6-9 (4) and breaks 4-5 (2).
    a = evaluate(task="arithmetic", limit=10, backend=_fixed(set(range(6))), db=db, seed=1)
    b = evaluate(task="arithmetic", limit=10, backend=_fixed({0, 1, 2, 3, 6, 7, 8, 9}), db=db, seed=2)
    result = compare_runs([a, b], n_boot=500)
    assert result["n_items"] == 10
    row_a, row_b = result["runs"]
    assert (row_a["acc_final"], row_b["acc_final"]) == (0.6, 0.8)
    assert row_a["cl"] == 1.0 and row_a["delta"] == 0.0  # the scripted model never changes its answer
    pair = result["pairs"][0]
    assert (pair["a"], pair["b"]) == (a.run_id, b.run_id)
    assert pair["diff"] == pytest.approx(0.2)
    assert pair["mcnemar_p"] == pytest.approx(2 * (1 + 6 + 15) / 64)  # 2 * P(X <= 2), X ~ Bin(6, 1/2)
    low, high = pair["diff_ci"]
    assert low <= 0.2 <= high  # a seeded bootstrap of fixed outcomes: the same interval on every machine
    assert row_a["tokens_per_item"] > 0 and row_a["acc_per_1k_tokens"] == pytest.approx(
        0.6 / (row_a["tokens_per_item"] / 1000))


def test_only_common_items_count(tmp_path):
    db = tmp_path / "r.sqlite"
    a = evaluate(task="arithmetic", limit=10, backend=_fixed(set(range(10))), db=db)
    b = evaluate(task="arithmetic", limit=4, backend=_fixed(set()), db=db)
    result = compare_runs([a, b], n_boot=200)
    assert result["n_items"] == 4 and result["left_out"] == {a.run_id: 6, b.run_id: 0}
    assert result["pairs"][0]["diff"] == -1.0


def test_no_common_items_is_an_error(tmp_path, shared_data):
    db = tmp_path / "r.sqlite"
    a = evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)
    b = evaluate(task="gsm8k", data=shared_data / "gsm8k_test.jsonl", limit=2, backend=ScriptedBackend(), db=db)
    with pytest.raises(UserError, match="share no complete items"):
        compare_runs([a, b])
    with pytest.raises(UserError, match="at least two runs"):
        compare_runs([a])


def test_compare_cli_on_real_runs(tmp_path):
    db = str(tmp_path / "r.sqlite")
    ids = []
    for strategy in ("reask", "critical", "oracle-stop"):
        done = cli("run", "--strategy", strategy, "--limit", "6", "--db", db, "--json")
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["run_id"])
    shown = cli("compare", *ids, "--db", db, "--json")
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    assert result["n_items"] == 6 and result["left_out"] == {run_id: 0 for run_id in ids}
    # Every figure is that of the stored turns: final correctness per item, paired by item.
    final = {}
    for run_id in ids:
        run = load_run(run_id, db)
        final[run_id] = {t.item_id: t.correct for t in run.turns if t.round == 1}
        first = {t.item_id: t.correct for t in run.turns if t.round == 0}
        row = next(row for row in result["runs"] if row["run_id"] == run_id)
        assert row["acc_final"] == pytest.approx(sum(final[run_id].values()) / 6)
        assert row["acc_first"] == pytest.approx(sum(first.values()) / 6)
    # The three strategies share their first turn (greedy, from the response cache): the same first answers.
    assert len({row["acc_first"] for row in result["runs"]}) == 1
    assert [(pair["a"], pair["b"]) for pair in result["pairs"]] == [(ids[0], ids[1]), (ids[0], ids[2]), (ids[1], ids[2])]
    for pair in result["pairs"]:
        a, b = final[pair["a"]], final[pair["b"]]
        assert pair["diff"] == pytest.approx((sum(b.values()) - sum(a.values())) / 6)
        low, high = pair["diff_ci"]
        assert low <= pair["diff"] + 1e-9 and pair["diff"] - 1e-9 <= high
        only_a, only_b = sum(a[i] and not b[i] for i in a), sum(b[i] and not a[i] for i in a)
        n = only_a + only_b  # McNemar's exact test: the smaller discordant count is Binomial(n, 1/2)
        expected = min(1.0, 2 * sum(comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n) if n else 1.0
        assert pair["mcnemar_p"] == pytest.approx(expected)
    assert [row["upper_bound"] for row in result["runs"]] == [False, False, True]
    assert result["runs"][2]["transitions"]["c->w"] == 0  # oracle-stop never changes a right answer
    table = cli("compare", *ids, "--db", db)
    assert "oracle-stop*" in table.stdout and "UPPER BOUND" in table.stdout
    bad = cli("compare", ids[0], "--db", db)
    assert bad.returncode == 2 and "at least two runs" in bad.stderr


def test_runs_of_other_task_options_are_not_paired(tmp_path):
    """`arith-3` under digits=2 is another question than under the default digits=1: refused, in one line."""
    db = tmp_path / "r.sqlite"
    a = evaluate(task="arithmetic", limit=5, backend=ScriptedBackend(), db=db)
    b = evaluate(task="arithmetic", limit=5, task_options={"digits": "2"}, backend=ScriptedBackend(), db=db)
    assert {t.item_id for t in a.turns} == {t.item_id for t in b.turns}  # the same ids...
    with pytest.raises(UserError, match=r"hold different items under the id 'arith-0'.*\"digits\": \"2\""):
        compare_runs([a, b])
    before = (tmp_path / "r.sqlite").read_bytes()
    shown = cli("compare", a.run_id, b.run_id, "--db", str(db))
    assert shown.returncode == 2 and shown.stdout == ""
    assert shown.stderr.count("\n") == 1 and "different items under the id" in shown.stderr
    assert (tmp_path / "r.sqlite").read_bytes() == before


def test_runs_pair_by_item_content_not_by_file_path(tmp_path):
    """A copy of a data file elsewhere holds the same items and pairs; an edited question does not."""
    rows = [{"question": f"What is {k} + {k}?", "answer": str(2 * k)} for k in range(4)]
    first, copy, edited = tmp_path / "a.jsonl", tmp_path / "copy" / "a.jsonl", tmp_path / "b.jsonl"
    copy.parent.mkdir()
    for path, records in ((first, rows), (copy, rows), (edited, [*rows[:3], {"question": "What is 9 + 9?", "answer": "18"}])):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    db = tmp_path / "r.sqlite"

    def run(data, answer_shift):
        backend = ScriptedBackend(lambda m, s: f"The answer is {int(m[0]['content'].split()[2]) * 2 + answer_shift}.",
                                  identity=f"scripted:shift{answer_shift}")
        return evaluate(task="custom", data=data, task_options={"grader": "number"}, backend=backend, db=db)

    a, b = run(first, 0), run(copy, 1)
    assert a.run_id != b.run_id  # the path is part of the run, not of the items
    result = compare_runs([a, b], n_boot=100)
    assert result["n_items"] == 4 and result["pairs"][0]["diff"] == -1.0
    with pytest.raises(UserError, match="different items under the id 'row-4'"):
        compare_runs([a, run(edited, 0)])


def test_runs_of_one_strategy_on_different_models_are_named_by_their_model():
    from selfcorrect.report import _run_labels

    rows = [{"run_id": "aaaaaa111", "strategy": "reask", "model": "embedded", "upper_bound": False},
            {"run_id": "bbbbbb222", "strategy": "reask", "model": "lora:/tmp/out/cct", "upper_bound": False},
            {"run_id": "cccccc333", "strategy": "critique", "model": "embedded", "upper_bound": True}]
    assert _run_labels(rows) == {"aaaaaa111": "reask embedded", "bbbbbb222": "reask lora:cct", "cccccc333": "critique*"}
    same_model = [dict(rows[0]), dict(rows[0], run_id="dddddd444")]
    assert _run_labels(same_model) == {"aaaaaa111": "reask aaaaaa", "dddddd444": "reask dddddd"}
    # Two adapters in folders of one name (an experiment's arms) would read alike: named by run id.
    arms = [rows[0], rows[1], dict(rows[1], run_id="eeeeee555", model="lora:/tmp/repeat/cct")]
    assert _run_labels(arms) == {"aaaaaa111": "reask embedded", "bbbbbb222": "reask bbbbbb",
                                 "eeeeee555": "reask eeeeee"}
    # A stored spec this version cannot read is named as stored, not an error.
    assert _run_labels([rows[0], dict(rows[0], run_id="ffffff666", model="oldkind:m")])["ffffff666"] == "reask oldkind:m"
