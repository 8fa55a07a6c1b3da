"""The paper's log records (selfcorrect.paper_logs): our runs written as Yang et al. (2025)'s eval scripts
write theirs, then read by a re-implementation of their analysis scripts, must give our report's figures.

`_paper_sampling_analysis` and `_paper_logits_analysis` below re-implement, in this file, what the
authors' analysis_sampling.py and analysis_logits.py compute from a log file: per-item probabilities with
their zero conventions (P(b|a) = 0 when no first answer is right, P(b|not a) = 0 when all are; in the
logits script P(b|not a) = 0 when 1 - P(a) == 0), then Acc1, Acc2, CL, CS and RSS as their plain ratios. The
scripts print the figures as percentages to one decimal; here they are kept unrounded. Where a script
would stop with ZeroDivisionError (CL with every first answer wrong, CS with every one right, RSS with Acc1
0 or 1), the figure is None here, which is how our report shows an undefined metric.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.paper_logs import logits_log, sampling_log
from selfcorrect.tasks import load_task

from conftest import ScriptedBackend

TOLERANCE = 1e-9


# --- the authors' analysis, re-implemented -----------------------------------------------------------------

def _write_jsonl(path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _or_none(compute):
    """The figure, or None where the authors' script would stop with ZeroDivisionError."""
    try:
        return compute()
    except ZeroDivisionError:
        return None


def _figures(p_a_list, p_b_list, p_c_list) -> dict:
    """Acc1, Acc2, CL, CS, RSS from per-item P(a), P(b|a), P(b|not a), as both analysis scripts compute them."""
    acc1 = sum(p_a_list) / len(p_a_list)
    acc2 = sum(p1 * p2 + (1 - p1) * p3 for p1, p2, p3 in zip(p_a_list, p_b_list, p_c_list)) / len(p_a_list)
    cl = _or_none(lambda: sum(p1 * p2 for p1, p2 in zip(p_a_list, p_b_list)) / sum(p_a_list))
    cs = _or_none(lambda: sum((1 - p1) * p2 for p1, p2 in zip(p_a_list, p_c_list)) / (len(p_a_list) - sum(p_a_list)))
    rss = _or_none(lambda: (acc2 - acc1 * acc1) / (2 * acc1 * (1 - acc1)))
    return {"acc1": acc1, "acc2": acc2, "cl": cl, "cs": cs, "rss": rss, "n_items": len(p_a_list)}


def _paper_sampling_analysis(path) -> dict:
    """analysis_sampling.py's figures from a sampling log: samples grouped by id, per-item frequencies."""
    data = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record["id"] not in data:
                data[record["id"]] = [[], []]
            data[record["id"]][0].append(record["correct1"])
            data[record["id"]][1].append(record["correct2"])
    p_a_list, p_b_list, p_c_list = [], [], []
    for first, second in data.values():
        p_a = sum(first) / len(first)
        p_b = sum((x and y) for x, y in zip(first, second)) / sum(first) if any(first) else 0.0
        p_c = 0.0 if all(first) else sum(((not x) and y) for x, y in zip(first, second)) / (len(first) - sum(first))
        p_a_list.append(p_a)
        p_b_list.append(p_b)
        p_c_list.append(p_c)
    return _figures(p_a_list, p_b_list, p_c_list)


def _paper_logits_analysis(path) -> dict:
    """analysis_logits.py's figures from a logits log: per-item probabilities from the option distributions."""
    p_a_list, p_b_list, p_c_list = [], [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            probs1, probs2_list, answer = record["probs1"], record["probs2_list"], int(record["answer"])
            p_a = probs1[answer]
            p_b = probs2_list[answer][answer]
            p_c = 0.0
            for k in range(len(probs2_list)):
                if k != answer:
                    p_c += probs1[k] * probs2_list[k][answer]
            try:
                p_c /= (1 - p_a)
            except ZeroDivisionError:
                p_c = 0.0
            p_a_list.append(p_a)
            p_b_list.append(p_b)
            p_c_list.append(p_c)
    return _figures(p_a_list, p_b_list, p_c_list)


def _assert_agree(paper: dict, ours: dict, acc1, acc2) -> None:
    """The paper's figures equal ours (None where either calls the figure undefined)."""
    assert paper["acc1"] == pytest.approx(acc1, abs=TOLERANCE)
    assert paper["acc2"] == pytest.approx(acc2, abs=TOLERANCE)
    for name in ("cl", "cs", "rss"):
        if ours[name] is None or paper[name] is None:
            assert ours[name] is None and paper[name] is None, (name, paper[name], ours[name])
        else:
            assert paper[name] == pytest.approx(ours[name], abs=TOLERANCE), name


def _check_sampling_run(run, tmp_path) -> dict:
    """Write the run's sampling log, analyse it as the paper does, and check it against our report."""
    records = sampling_log(run)
    report = run.report(n_boot=10)
    assert all(set(r) == {"id", "answer1", "answer2", "correct1", "correct2"} for r in records)
    assert len(records) == report["n_items"] * run.config["samples"]
    path = tmp_path / "sampling.jsonl"
    _write_jsonl(path, records)
    paper = _paper_sampling_analysis(path)
    assert paper["n_items"] == report["n_items"]
    _assert_agree(paper, report["pairs"][0], report["acc"][0], report["acc"][1])
    if run.config["rounds"] == 1:
        _assert_agree(paper, report, report["acc"][0], report["acc"][1])  # the headline is that same step
    return paper


# --- (a) a scripted sampled run with every edge case -------------------------------------------------------

def _mixed_backend() -> ScriptedBackend:
    """Arithmetic answered right or wrong by item: items 0, 4, .. right at first in every sample, items 1, 5,
    .. wrong in every sample, the rest right or wrong by the sample's seed; corrections right or wrong by
    their own seed, mostly kept when the first answer was right and seldom fixed when it was wrong (so CL
    and CS differ), and every kind of transition happens."""
    task = load_task("arithmetic")
    index = {task.prompt(item): k for k, item in enumerate(task.items)}

    def reply(messages, seed):
        question = messages[0]["content"]
        value = eval(question.split("What is ")[1].split("?")[0])  # noqa: S307 - our own generated arithmetic
        k = index[question]
        coin = hashlib.sha256(f"{seed}".encode()).digest()[0]
        if not any(m["role"] == "assistant" for m in messages):  # the first answer
            right = {0: True, 1: False}.get(k % 4, coin % 2 == 0)
        elif messages[1]["content"] == f"The answer is {value}.":  # a right first answer: mostly kept
            right = coin % 4 != 0
        else:  # a wrong one: sometimes fixed
            right = coin % 3 == 0
        return f"The answer is {value if right else value + 1}."

    return ScriptedBackend(reply, identity="scripted:paper-logs-mixed")


def test_scripted_sampling_run_agrees_with_the_papers_analysis(tmp_path):
    run = evaluate(task="arithmetic", limit=8, samples=4, temperature=0.7, rounds=1, backend=_mixed_backend(),
                   db=tmp_path / "r.sqlite")
    records = sampling_log(run)
    by_item: dict[str, list[tuple[bool, bool]]] = {}
    for record in records:
        by_item.setdefault(record["id"], []).append((record["correct1"], record["correct2"]))
    assert list(by_item) == [item["item_id"] for item in run.items]  # our string ids, in item order
    firsts = [[a for a, _ in pairs] for pairs in by_item.values()]
    # The edge cases of the conventions are all present: all right, all wrong, and mixed first answers ...
    assert any(all(f) for f in firsts) and any(not any(f) for f in firsts) and any(0 < sum(f) < 4 for f in firsts)
    # ... and every transition, so CL and CS are neither 0 nor 1.
    assert {pair for pairs in by_item.values() for pair in pairs} == {(True, True), (True, False),
                                                                      (False, True), (False, False)}
    paper = _check_sampling_run(run, tmp_path)
    assert all(paper[name] is not None and 0 < paper[name] < 1 for name in ("acc1", "acc2", "cl", "cs"))
    assert abs(paper["cl"] - paper["cs"]) > 0.1  # so that a mix-up of the two cannot pass
    turns = {(t.item_id, t.sample, t.round): t for t in run.turns}
    assert [(r["answer1"], r["answer2"]) for r in records] == [
        (turns[(item["item_id"], j, 0)].response, turns[(item["item_id"], j, 1)].response)
        for item in run.items for j in range(4)]


def test_incomplete_items_and_later_rounds(tmp_path):
    run = evaluate(task="arithmetic", limit=8, samples=4, temperature=0.7, rounds=2, backend=_mixed_backend(),
                   db=tmp_path / "r.sqlite")
    _check_sampling_run(run, tmp_path)  # rounds 0 -> 1 of a two-round run: the report's first pair
    # An item with one turn missing (here its last round) is left out of the log, as the report leaves it out.
    dropped = run.items[2]["item_id"]
    partial = replace(run, turns=[t for t in run.turns if (t.item_id, t.sample, t.round) != (dropped, 3, 2)])
    assert partial.report(n_boot=10)["n_items"] == 7
    assert dropped not in {record["id"] for record in sampling_log(partial)}
    _check_sampling_run(partial, tmp_path)


def test_edge_figures_undefined_alike(tmp_path):
    """Every first answer wrong: the paper's CL and RSS divide by zero, ours are None; CS is defined."""
    backend = ScriptedBackend(lambda messages, seed: "The answer is -1.", identity="scripted:always-wrong")
    run = evaluate(task="arithmetic", limit=3, samples=2, temperature=0.7, backend=backend, db=tmp_path / "r.sqlite")
    paper = _check_sampling_run(run, tmp_path)
    assert paper["cl"] is None and paper["rss"] is None and paper["cs"] == 0.0


def test_a_run_of_the_wrong_kind_is_a_clear_error(tmp_path):
    db = tmp_path / "r.sqlite"
    no_rounds = evaluate(task="arithmetic", limit=2, rounds=0, backend=ScriptedBackend(), db=db)
    with pytest.raises(UserError, match="no correction round"):
        sampling_log(no_rounds)
    sampled = evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=db)
    with pytest.raises(UserError, match="sampling estimator.*export it as the sampling log"):
        logits_log(sampled)
    exact = replace(sampled, config={**sampled.config, "estimator": "exact"})
    with pytest.raises(UserError, match="exact estimator.*export it as the logits log"):
        sampling_log(exact)


# --- (b) and (c) the real embedded model --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.model
def test_embedded_sampling_run_agrees_with_the_papers_analysis(tmp_path, embedded):
    run = evaluate(task="arithmetic", limit=6, samples=3, temperature=0.8, rounds=1, backend=embedded,
                   db=tmp_path / "r.sqlite")
    assert run.report(n_boot=10)["n_items"] == 6
    paper = _check_sampling_run(run, tmp_path)
    print(json.dumps(paper))


@pytest.mark.slow
@pytest.mark.model
def test_embedded_exact_run_agrees_with_the_papers_logits_analysis(tmp_path, shared_data, embedded):
    data = shared_data / "commonsense_qa.jsonl"
    run = evaluate(task="mcq", data=data, limit=6, estimator="exact", backend=embedded, db=tmp_path / "r.sqlite")
    report = run.report(n_boot=10)
    assert run.estimator == "exact" and report["n_items"] == 6
    records = logits_log(run)
    assert [r["id"] for r in records] == [item["item_id"] for item in run.items]
    task = load_task("mcq", data)
    for record, item in zip(records, task.items):
        assert set(record) == {"id", "answer", "probs1", "probs2_list"}
        labels = task.labels(item)
        assert record["answer"] == labels.index(item.target)
        assert len(record["probs1"]) == len(labels) and all(len(p) == len(labels) for p in record["probs2_list"])
        assert sum(record["probs1"]) == pytest.approx(1.0, abs=1e-6)
    path = tmp_path / "probs.jsonl"
    _write_jsonl(path, records)
    paper = _paper_logits_analysis(path)
    assert paper["n_items"] == 6
    _assert_agree(paper, report, report["acc"][0], report["acc"][1])
    with pytest.raises(UserError, match="exact estimator"):
        sampling_log(run)
    print(json.dumps(paper))
