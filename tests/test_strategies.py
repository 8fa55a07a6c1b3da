"""Correction strategies with a scripted model: what each sends, when each stops, what it records,
that none but the labelled oracle can see the gold answer, and that a user's own strategy plugs in."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.strategies import STRATEGIES, get_strategy
from selfcorrect.strategies.builtin import judged_wrong, vote_key
from selfcorrect.tasks import load_task

from conftest import ScriptedBackend, check_turns


def _last_user(messages):
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def test_self_refine_stops_when_its_feedback_finds_nothing(tmp_path):
    def reply(messages, seed):
        prompt = _last_user(messages)
        if prompt.startswith("Give feedback"):
            return "NO CHANGES NEEDED" if "5" in messages[-2]["content"] else "The sum is wrong."
        if prompt.startswith("Refine"):
            return "The answer is 5."
        return "The answer is 4."

    backend = ScriptedBackend(reply)
    run = evaluate(task="arithmetic", limit=1, rounds=2, strategy="self-refine", backend=backend, db=tmp_path / "r.sqlite")
    first, refined, kept = run.turns
    assert refined.response == "The answer is 5." and refined.feedback == ["The sum is wrong."]
    assert kept.notes == {"stopped": True} and kept.response == refined.response and kept.answer == "5"
    assert kept.feedback == ["NO CHANGES NEEDED"]
    assert len(backend.calls) == 1 + 2 + 1


@pytest.mark.parametrize(
    "verdict, expected", [("Correct. 3 + 4 = 7.", False), ("Incorrect, it is 8.", True), ("Hmm.", None)]
)
def test_judged_wrong(verdict, expected):
    assert judged_wrong(verdict) is expected


def test_verify_then_revise_records_the_verifier(tmp_path):
    """The model says 'Correct' about item 0 and 'Incorrect' about the rest; the report scores those
    verdicts against the grades of the answers they judged."""

    def reply(messages, seed):
        prompt = _last_user(messages)
        if prompt.startswith("Is your previous answer correct?"):
            return "Correct." if "arith-0" in messages[0]["content"] or "7 + 7" in messages[0]["content"] else "Incorrect."
        return "The answer is 0."

    backend = ScriptedBackend(reply)
    run = evaluate(task="arithmetic", limit=4, rounds=1, strategy="verify-then-revise", backend=backend,
                   db=tmp_path / "r.sqlite")
    corrections = [t for t in run.turns if t.round == 1]
    judged = [t.notes["judged_wrong"] for t in corrections]
    assert judged == [False, True, True, True]  # arith-0 asks "What is 7 + 7?"
    assert corrections[0].notes["stopped"] and len(corrections[0].feedback) == 1
    verifier = run.report()["verifier"]
    first_wrong = [not t.correct for t in run.turns if t.round == 0]
    true_positives = sum(j and w for j, w in zip(judged, first_wrong))
    assert verifier["verdicts"] == 4
    assert verifier["precision_wrong"] == pytest.approx(true_positives / 3)
    assert verifier["recall_wrong"] == pytest.approx(true_positives / sum(first_wrong))


def test_exec_feedback_shows_the_sandbox_verdict_and_stops_on_pass(tmp_path):
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps({"text": "Write double(x).", "test_list": ["assert double(3) == 6"]}) + "\n")

    def reply(messages, seed):
        if _last_user(messages).startswith("Running your code gave:"):
            return "```python\ndef double(x):\n    return 2 * x\n```"
        return "```python\ndef double(x):\n    return x\n```"

    backend = ScriptedBackend(reply)
    run = evaluate(task="mbpp", data=data, rounds=2, strategy="exec-feedback", backend=backend, db=tmp_path / "r.sqlite")
    first, fixed, kept = run.turns
    assert not first.correct and first.reason.startswith("AssertionError")
    # MBPP's question shows the tests the grade runs, so their verdict is what the model is shown.
    assert _last_user(fixed.messages) == (
        f"Running your code gave: {first.reason}\nFix the code. Write the complete function in one Python code block."
    )
    assert fixed.notes == {"execution_feedback": f"Running your code gave: {first.reason}"}
    assert fixed.correct and kept.correct
    assert kept.notes == {"execution_feedback": "Your code passes the tests in the question.", "stopped": True}
    assert len(backend.calls) == 2


HIDDEN = "918273645"  # what hidden tests and gold answers assert: it cannot occur in a message by chance


def _humaneval_file(path, expected):
    """HumanEval-format data whose hidden tests assert `candidate(2) == expected`; the docstring of `magic`
    shows a different example (magic(3) is 6), that of `plain` none."""
    test = f"def check(candidate):\n    assert candidate(2) == {expected}\n"
    records = [
        {"task_id": "he/magic", "entry_point": "magic", "test": test,
         "prompt": 'def magic(x):\n    """The magic number of x.\n    >>> magic(3)\n    6\n    """\n'},
        {"task_id": "he/plain", "entry_point": "plain", "test": test,
         "prompt": 'def plain(x):\n    """The plain number of x."""\n'},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_exec_feedback_on_humaneval_shows_the_docstring_examples_never_the_hidden_tests(tmp_path):
    """The model is shown its code run on the docstring's example and stops once that passes, though the
    hidden test (never shown) still fails; without an example the code is run alone and it never stops."""
    data = _humaneval_file(tmp_path / "he.jsonl", HIDDEN)

    def reply(messages, seed):
        if "def magic" in messages[0]["content"]:
            fixed = "Expected: 6" in _last_user(messages)
            return f"```python\ndef magic(x):\n    return {'x * 2' if fixed else 'x'}\n```"
        return f"```python\ndef plain(x):\n    return x{' +' if len(messages) == 1 else ''}\n```"  # first a SyntaxError

    backend = ScriptedBackend(reply)
    run = evaluate(task="humaneval", data=data, rounds=3, strategy="exec-feedback", backend=backend,
                   db=tmp_path / "r.sqlite")
    assert HIDDEN not in json.dumps([messages for messages, _ in backend.calls])
    instruction = "Write the complete function in one Python code block."

    magic = [t for t in run.turns if t.item_id == "he/magic"]
    shown = "Running your code on the examples in the docstring, 1 of 1 fail:\n>>> magic(3)\nExpected: 6\nGot: 3"
    assert magic[1].notes == {"execution_feedback": shown}
    assert _last_user(magic[1].messages) == f"{shown}\nFix the code. {instruction}"
    passed = "Your code gives the expected output for every example in the docstring."
    assert magic[2].notes == magic[3].notes == {"execution_feedback": passed, "stopped": True}
    assert magic[3].response == magic[1].response and "x * 2" in magic[1].response
    # Grading still runs the hidden test, which no reply passes.
    assert not any(t.correct for t in magic) and HIDDEN in magic[3].reason

    plain = [t for t in run.turns if t.item_id == "he/plain"]
    assert not any(t.notes.get("stopped") for t in plain) and len(backend.calls) == 2 + 4
    assert plain[1].notes["execution_feedback"].startswith("Running your code (the question shows no tests) gave: SyntaxError")
    alone = "Your code runs without errors; the question shows no tests to check it with."
    assert plain[2].notes == plain[3].notes == {"execution_feedback": alone}
    assert _last_user(plain[3].messages) == f"{alone}\nReview your code for mistakes and fix any you find. {instruction}"


def test_exec_feedback_needs_a_code_task(tmp_path):
    with pytest.raises(UserError, match="--strategy exec-feedback: needs execution feedback"):
        evaluate(task="arithmetic", strategy="exec-feedback", backend=ScriptedBackend(), db=tmp_path / "r.sqlite")
    assert not (tmp_path / "r.sqlite").exists()


def test_oracle_stop_is_an_upper_bound_that_never_breaks_a_right_answer(tmp_path):
    run = evaluate(task="arithmetic", limit=20, rounds=1, strategy="oracle-stop", backend=ScriptedBackend(),
                   db=tmp_path / "r.sqlite")
    report = run.report()
    assert report["upper_bound"] is True and report["config"]["upper_bound"] is True
    assert report["transitions"]["c->w"] == 0 and report["cl"] == 1.0
    first = {t.item_id: t.correct for t in run.turns if t.round == 0}
    assert any(first.values()) and not all(first.values())
    for turn in (t for t in run.turns if t.round == 1):
        assert turn.notes.get("stopped", False) is first[turn.item_id]
    assert evaluate(task="arithmetic", limit=2, backend=ScriptedBackend(), db=tmp_path / "r.sqlite").report()["upper_bound"] is False


def _sent_to_models(tmp_path, strategy, gold):
    """Everything `strategy` sent to the model and the critic over two correction rounds on questions whose
    gold answer is `gold`: HumanEval-format items (hidden tests asserting it) for strategies that need
    execution feedback, GSM8K items for the others. The model always answers 4 (its code: 2 * x)."""
    if get_strategy(strategy).needs_execution_feedback:
        task, data = "humaneval", _humaneval_file(tmp_path / f"he-{gold}.jsonl", gold)
        answer = "```python\ndef magic(x):\n    return 2 * x\n\n\ndef plain(x):\n    return 2 * x\n```"
    else:
        task, data = "gsm8k", tmp_path / f"gsm-{gold}.jsonl"
        data.write_text("\n".join(
            json.dumps({"question": f"Question {k}: how many apples?", "answer": f"work\n#### {gold}"}) for k in range(3)
        ))
        answer = "I think the answer is 4."
    backend = ScriptedBackend(lambda messages, seed: answer)
    critic = ScriptedBackend(lambda messages, seed: "Looks wrong to me.", identity="scripted:critic")
    evaluate(task=task, data=data, rounds=2, strategy=strategy, backend=backend, db=tmp_path / f"{gold}.sqlite",
             critic_model="embedded", critic_backend=critic)
    assert backend.calls
    return json.dumps([(messages, seed) for messages, seed in backend.calls + critic.calls])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_gold_answer_steers_no_strategy_but_an_oracle(tmp_path, strategy):
    """The same questions twice, with the model's answer as the gold and with a number that cannot occur by
    chance: a strategy that the gold does not steer sends the same messages both times and never that
    number. An oracle must fail this check (so the check can catch a leak): its stops differ, and hidden
    tests shown as feedback quote the number."""
    wrong, right = _sent_to_models(tmp_path, strategy, HIDDEN), _sent_to_models(tmp_path, strategy, "4")
    if not get_strategy(strategy).oracle:
        assert HIDDEN not in wrong and wrong == right
    else:
        assert wrong != right
        assert (HIDDEN in wrong) is get_strategy(strategy).needs_execution_feedback


def test_a_users_strategy_plugs_in_through_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent('''
        from selfcorrect.strategies import register_strategy

        @register_strategy("shout", "ask again, loudly")
        def shout(round):
            return round.ask(round.question.upper())
    '''))
    dist = tmp_path / "my_strategies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[selfcorrect.strategies]\nshout = my_strategies\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(STRATEGIES, "shout", raising=False)
    try:
        assert get_strategy("shout").description == "ask again, loudly"
        backend = ScriptedBackend()
        run = evaluate(task="arithmetic", limit=1, strategy="shout", backend=backend, db=tmp_path / "r.sqlite")
        assert _last_user(run.turns[1].messages) == run.turns[0].messages[0]["content"].upper()
    finally:
        STRATEGIES.pop("shout", None)
        sys.modules.pop("my_strategies", None)


def test_critic_reviews_and_the_model_revises(tmp_path):
    backend = ScriptedBackend(lambda messages, seed: f"The answer is {len(messages)}.")
    critic = ScriptedBackend(lambda messages, seed: "You added wrongly.", identity="scripted:critic")
    run = evaluate(task="arithmetic", limit=2, strategy="critic", backend=backend, critic_model="embedded",
                   critic_backend=critic, db=tmp_path / "r.sqlite")
    assert len(critic.calls) == 2
    review_request = critic.calls[0][0]
    assert len(review_request) == 1 and "Question:\nWhat is 7 + 7?" in review_request[0]["content"]
    assert "Answer:\nThe answer is 1." in review_request[0]["content"]
    revision = [t for t in run.turns if t.round == 1][0]
    assert revision.notes == {"critique": "You added wrongly."}
    assert _last_user(revision.messages).startswith("A reviewer commented on your answer:\nYou added wrongly.")
    assert run.config["critic"] == "scripted:critic"
    with pytest.raises(UserError, match="--strategy critic: needs a second model; pass --critic-model"):
        evaluate(task="arithmetic", strategy="critic", backend=backend, db=tmp_path / "s.sqlite")
    assert not (tmp_path / "s.sqlite").exists()


def _answer_with(values):
    """A scripted model whose fresh samples (one-message conversations) state `values` in turn."""
    fresh = iter(values)

    def reply(messages, seed):
        if len(messages) == 1 and messages[0]["content"].startswith("What is"):
            return "The answer is 9." if seed == _first_seed[0] else f"The answer is {next(fresh)}."
        return "The answer is 9."

    return reply


_first_seed = [None]


def test_self_consistency_takes_the_majority_of_previous_and_fresh_answers(tmp_path):
    from selfcorrect.engine import cell_seed

    _first_seed[0] = cell_seed(0, "arith-0", 0, 0, 0)
    backend = ScriptedBackend(_answer_with(["14", "14.0", "9", "14"]))
    run = evaluate(task="arithmetic", limit=1, strategy="self-consistency", backend=backend, db=tmp_path / "r.sqlite")
    first, voted = run.turns
    assert first.answer == "9" and not first.correct  # 7 + 7
    # Four fresh samples by default: 14, 14.0, 9, 14 plus the previous 9 -> 14 wins 3 to 2.
    assert voted.notes["votes"] == {repr(9.0): 2, repr(14.0): 3}
    assert voted.correct and voted.response == "The answer is 14."
    assert len(voted.notes["candidates"]) == 4 and len(backend.calls) == 1 + 4
    fresh_calls = backend.calls[1:]
    assert all(len(messages) == 1 for messages, _ in fresh_calls)
    assert len({seed for _, seed in fresh_calls}) == 4  # each fresh sample has its own seed
    assert voted.prompt_tokens == sum(len(m[0]["content"]) for m, _ in fresh_calls)


def test_self_consistency_keeps_the_previous_answer_on_a_tie(tmp_path):
    from selfcorrect.engine import cell_seed

    _first_seed[0] = cell_seed(0, "arith-0", 0, 0, 0)
    backend = ScriptedBackend(_answer_with(["14", "3", "9", "14"]))
    run = evaluate(task="arithmetic", limit=1, strategy="self-consistency", backend=backend, db=tmp_path / "r.sqlite")
    assert run.turns[1].response == "The answer is 9."  # 9 and 14 both have two votes; 9 came first


def test_budget_bounds_the_fresh_samples(tmp_path):
    """The scripted model's tokens are characters: each fresh sample costs a known amount, so the number of
    samples a budget buys can be worked out by hand."""
    backend = ScriptedBackend()
    one_sample = len("What is 7 + 7?\n" + 'Give the result as a number and end with "The answer is N."') + len("The answer is 0.")
    run = evaluate(task="arithmetic", limit=1, strategy="self-consistency", budget=2 * one_sample + 1, backend=backend,
                   db=tmp_path / "r.sqlite")
    voted = run.turns[1]
    assert len(voted.notes["candidates"]) == 3  # after two samples the round has spent less than the budget
    assert voted.prompt_tokens + voted.completion_tokens > 2 * one_sample + 1
    assert run.config["budget"] == 2 * one_sample + 1
    with pytest.raises(UserError, match="--budget: only the compute-matched baselines"):
        evaluate(task="arithmetic", strategy="reask", budget=100, backend=backend, db=tmp_path / "s.sqlite")


def test_best_of_n_without_scores_asks_for_verdicts(tmp_path):
    def reply(messages, seed):
        prompt = messages[-1]["content"]
        if prompt.startswith("Question:"):  # a verdict on a candidate
            return "Correct." if "The answer is 14." in prompt else "Incorrect."
        if len(messages) == 1 and seed != cell_seed(0, "arith-0", 0, 0, 0):
            return "The answer is 14."
        return "The answer is 9."

    from selfcorrect.engine import cell_seed

    backend = ScriptedBackend(reply)
    run = evaluate(task="arithmetic", limit=1, strategy="best-of-n", backend=backend, db=tmp_path / "r.sqlite")
    chosen = run.turns[1]
    assert chosen.notes["scorer"] == "verdict" and chosen.notes["scores"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert chosen.correct and chosen.response == "The answer is 14."
    verdicts = [messages[0]["content"] for messages, _ in backend.calls if messages[0]["content"].startswith("Question:")]
    assert len(verdicts) == 5 and "Proposed answer:\nThe answer is 9." in verdicts[0]


def test_in_context_examples_come_from_other_items(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(
        json.dumps({"question": f"Question {k}: how many apples?", "answer": f"work\n#### {98765 + 100 * k}00"}) for k in range(6)
    ))
    backend = ScriptedBackend(lambda messages, seed: "I think the answer is 12.")
    run = evaluate(task="gsm8k", data=data, strategy="critical", icl_confident=2, icl_critical=1, backend=backend,
                   db=tmp_path / "r.sqlite")
    targets = {item["item_id"]: item["target"] for item in run.items}
    for turn in (t for t in run.turns if t.round == 1):
        prompt = turn.messages[2]["content"]
        assert prompt.startswith("Here are examples of checking an answer again.")
        assert prompt.endswith("Now check your own answer.\n\n" + turn.messages[2]["content"].split("\n\n")[-1])
        assert prompt.count("Question ") == 3 and prompt.count("it is right, so I keep it") == 2
        assert targets[turn.item_id] not in json.dumps(turn.messages)  # never its own gold answer
        shown = [line for line in prompt.splitlines() if line.startswith("Previous answer:")]
        stated = [line for line in prompt.splitlines() if line.startswith("Checked again:")]
        wrong = [s for s, c in zip(shown, stated) if s.split("is ")[1] != c.split("is ")[-1]]
        assert len(wrong) == 1  # the critical example shows a wrong answer and states the right one
    assert run.config["icl"] == {"confident": 2, "critical": 1}
    with pytest.raises(UserError, match="need at least 7 items"):
        evaluate(task="gsm8k", data=data, icl_confident=6, backend=backend, db=tmp_path / "s.sqlite")
    with pytest.raises(UserError, match="cannot be stated in one word"):
        evaluate(task="math", data=Path(__file__).parent / "fixtures" / "math_problems.jsonl",
                 icl_critical=1, backend=backend, db=tmp_path / "s.sqlite")
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.model
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_on_the_embedded_model(tmp_path, embedded, strategy):
    """Each strategy end to end on the real model: two items, every turn graded as the task grades its reply,
    each correction continuing its conversation (or keeping the answer where the strategy stopped), tokens
    counted."""
    # The execution-feedback strategies on HumanEval, whose first two prompts show docstring examples.
    needs_feedback = get_strategy(strategy).needs_execution_feedback
    task = "humaneval" if needs_feedback else "arithmetic"
    run = evaluate(task=task, limit=2, strategy=strategy, backend=embedded, critic_model="embedded",
                   critic_backend=embedded, db=tmp_path / "r.sqlite", max_tokens=48)
    report = run.report()
    assert report["complete"] and report["n_items"] == 2 and len(run.turns) == 4
    assert report["upper_bound"] is get_strategy(strategy).oracle
    corrections = [t for t in run.turns if t.round == 1]
    assert all(t.prompt_tokens > 0 for t in run.turns if t.round == 0)
    assert all(t.notes.get("stopped") or t.prompt_tokens > 0 for t in corrections)
    check_turns(load_task(task), run)
    assert report["acc"] == pytest.approx([sum(t.correct for t in run.turns if t.round == r) / 2 for r in (0, 1)])
    if needs_feedback:
        shown = [t.notes["execution_feedback"] for t in corrections]
        about = "Running your code gave:" if get_strategy(strategy).oracle else "docstring"
        assert all(about in text for text in shown), shown
    if strategy == "best-of-n":
        assert all(t.notes["scorer"] == "p_true" and all(0 <= s <= 1 for s in t.notes["scores"]) for t in corrections)
    # Each strategy's own rule, on what the model really said.
    first = {t.item_id: t for t in run.turns if t.round == 0}
    for t in corrections:
        if strategy == "best-of-n":  # the best scored of the previous reply and the fresh samples
            candidates, scores = [first[t.item_id].response, *t.notes["candidates"]], t.notes["scores"]
            assert t.response == candidates[max(range(len(scores)), key=scores.__getitem__)]
        if strategy == "self-consistency":  # an answer with the most votes (the previous reply when none has any)
            votes = t.notes["votes"]
            assert votes[vote_key(t.answer)] == max(votes.values()) if votes else t.response == first[t.item_id].response
        if strategy == "verify-then-revise":  # the verdict comes first; a "correct" one stops the round
            assert t.notes["judged_wrong"] is judged_wrong(t.feedback[0])
            assert bool(t.notes.get("stopped")) is (t.notes["judged_wrong"] is False)
        if strategy == "self-refine":
            assert bool(t.notes.get("stopped")) is ("no changes needed" in t.feedback[0].lower())
        if strategy in ("reask", "oracle-stop") and not t.notes.get("stopped"):
            assert _last_user(t.messages) == t.messages[0]["content"]  # the question, asked again
        if strategy == "oracle-stop":
            assert bool(t.notes.get("stopped")) is first[t.item_id].correct
        if strategy == "critic":
            assert t.notes["critique"] and _last_user(t.messages).startswith(
                f"A reviewer commented on your answer:\n{t.notes['critique']}\n\nRevise your answer.")
