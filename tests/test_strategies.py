"""Correction strategies with a scripted model: what each sends, when each stops, what it records,
that none but the labelled oracle can see the gold answer, and that a user's own strategy plugs in."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.strategies import STRATEGIES, get_strategy
from selfcorrect.strategies.builtin import judged_wrong

from conftest import ScriptedBackend


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
    assert _last_user(fixed.messages) == (
        f"Running your code gave: {first.reason}\nFix the code. Write the complete function in one Python code block."
    )
    assert fixed.correct and kept.notes == {"stopped": True} and kept.correct
    assert len(backend.calls) == 2


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


@pytest.mark.parametrize("strategy", sorted(name for name, s in STRATEGIES.items() if not s.oracle and not s.needs_execution_feedback))
def test_no_strategy_sees_the_gold_answer(tmp_path, strategy):
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(
        json.dumps({"question": f"Question {k}: how many apples?", "answer": f"work\n#### 98765{k}"}) for k in range(3)
    ))
    backend = ScriptedBackend(lambda messages, seed: "I think the answer is 12.")
    critic = ScriptedBackend(lambda messages, seed: "Looks wrong to me.", identity="scripted:critic")
    evaluate(task="gsm8k", data=data, rounds=2, strategy=strategy, backend=backend, db=tmp_path / "r.sqlite",
             critic_model="embedded", critic_backend=critic)
    sent = json.dumps([messages for messages, _ in backend.calls + critic.calls])
    assert backend.calls and "98765" not in sent


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
