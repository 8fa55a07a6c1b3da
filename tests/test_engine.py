"""The engine's bookkeeping with a scripted backend: every cell once, resume fills only the gaps, the gold
answer never reaches the model, and a cell's reply does not depend on what ran before it."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from selfcorrect import evaluate, load_run
from selfcorrect.engine import cell_seed

from conftest import ScriptedBackend


def test_every_cell_once_then_resume_generates_nothing(tmp_path):
    db = tmp_path / "runs.sqlite"
    backend = ScriptedBackend()
    run = evaluate(task="arithmetic", limit=5, rounds=2, samples=2, temperature=1.0, backend=backend, db=db,
                   model="embedded")
    assert run.generated == 5 * 2 * 3
    assert len(backend.calls) == 5 * 2 * 3  # reask: one generation per round
    keys = [(t.item_id, t.sample, t.round) for t in run.turns]
    assert len(keys) == len(set(keys)) == 30

    again = ScriptedBackend()
    resumed = evaluate(task="arithmetic", limit=5, rounds=2, samples=2, temperature=1.0, backend=again, db=db,
                       model="embedded")
    assert resumed.run_id == run.run_id
    assert resumed.generated == 0 and again.calls == []


def test_resume_after_lost_turns_matches_uninterrupted(tmp_path):
    full = evaluate(task="arithmetic", limit=6, rounds=2, backend=ScriptedBackend(), db=tmp_path / "a.sqlite")

    partial_db = tmp_path / "b.sqlite"
    evaluate(task="arithmetic", limit=6, rounds=2, backend=ScriptedBackend(), db=partial_db)
    # Lose what a kill would lose: the later rounds of some conversations and whole later conversations.
    with sqlite3.connect(partial_db) as db:
        db.execute("DELETE FROM turns WHERE (item_id = 'arith-1' AND round >= 1) OR item_id IN ('arith-4', 'arith-5')")
    backend = ScriptedBackend()
    # Without the response cache, which would serve the lost turns again, the lost cells are regenerated.
    resumed = evaluate(task="arithmetic", limit=6, rounds=2, backend=backend, db=partial_db, cache=False)
    assert resumed.generated == 2 + 3 + 3 == len(backend.calls)
    as_rows = lambda run: [(t.item_id, t.sample, t.round, t.messages, t.response, t.correct) for t in run.turns]
    assert as_rows(resumed) == as_rows(full)
    assert resumed.report()["acc"] == full.report()["acc"]


def test_critique_round_keeps_the_critique_as_feedback(tmp_path):
    backend = ScriptedBackend(lambda messages, seed: f"reply {len(messages)}")
    run = evaluate(task="arithmetic", limit=1, rounds=1, strategy="critique", backend=backend, db=tmp_path / "r.sqlite")
    first, correction = run.turns
    assert first.feedback == [] and len(first.messages) == 2
    # question, answer, review prompt, critique, improve prompt, graded reply.
    roles = [m["role"] for m in correction.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert correction.messages[2]["content"].startswith("Review your previous answer")
    assert correction.feedback == [correction.messages[3]["content"]] == ["reply 3"]
    assert correction.response == correction.messages[-1]["content"] == "reply 5"
    assert len(backend.calls) == 3


@pytest.mark.parametrize("strategy", ["reask", "critique"])
def test_gold_answer_never_reaches_the_model(tmp_path, strategy):
    # A target that cannot appear by chance, in a question that does not contain it.
    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"Question {k}: how many apples?", "answer": f"work\n#### 98765{k}"}) for k in range(3))
    )
    backend = ScriptedBackend(lambda messages, seed: "I think the answer is 12.")
    evaluate(task="gsm8k", data=data, rounds=2, strategy=strategy, backend=backend, db=tmp_path / "r.sqlite")
    sent = json.dumps([messages for messages, _ in backend.calls])
    assert "98765" not in sent
    assert len(backend.calls) > 0


def test_cell_seeds_are_distinct_and_stable():
    seeds = {cell_seed(0, f"item-{i}", s, r, k) for i in range(50) for s in range(3) for r in range(3) for k in range(2)}
    assert len(seeds) == 50 * 3 * 3 * 2
    assert cell_seed(7, "x", 1, 2, 0) == cell_seed(7, "x", 1, 2, 0) != cell_seed(8, "x", 1, 2, 0)


def test_load_run_reads_back_what_evaluate_wrote(tmp_path):
    db = tmp_path / "r.sqlite"
    run = evaluate(task="arithmetic", limit=3, rounds=1, backend=ScriptedBackend(), db=db)
    loaded = load_run(run.run_id[:6], db)
    assert loaded.run_id == run.run_id
    assert loaded.turns == run.turns
    assert loaded.report()["acc"] == run.report()["acc"]


def test_strategies_sharing_a_first_turn_generate_it_once(tmp_path):
    """The response cache: a second strategy on the same items reuses the first answers, and only those."""
    db = tmp_path / "r.sqlite"
    backend = ScriptedBackend()
    first = evaluate(task="arithmetic", limit=5, strategy="reask", backend=backend, db=db)
    assert (first.generated, first.cache_hits) == (10, 0) and len(backend.calls) == 10
    second = evaluate(task="arithmetic", limit=5, strategy="critique", backend=backend, db=db)
    # First answers (5) from the cache; the critique rounds (2 replies each) generated.
    assert (second.generated, second.cache_hits) == (5, 5) and len(backend.calls) == 10 + 5 * 2
    assert [t.response for t in second.turns if t.round == 0] == [t.response for t in first.turns if t.round == 0]
    report = second.report()
    assert (report["generated"], report["cache_hits"]) == (5, 5)
    uncached = evaluate(task="arithmetic", limit=5, strategy="confident", backend=backend, db=db, cache=False)
    assert (uncached.generated, uncached.cache_hits) == (10, 0) and len(backend.calls) == 20 + 10


def test_cache_key_names_everything_that_determines_a_reply():
    from selfcorrect.cache import cache_key

    base = ("llamacpp:m.gguf", [{"role": "user", "content": "hi"}], 64, 0.0, 1)
    variants = [
        ("openai:m@http://other:8000/v1", *base[1:]),
        (base[0], [{"role": "user", "content": "hi!"}], *base[2:]),
        (*base[:2], 65, *base[3:]),
        (*base[:3], 0.7, base[4]),
        (*base[:4], 2),
    ]
    assert len({cache_key(*base), *(cache_key(*v) for v in variants)}) == 6
    assert cache_key(*base) == cache_key(*base)


class ConcurrentScriptedBackend(ScriptedBackend):
    """A scripted model that serves several conversations at once and remembers how many overlapped. Its
    replies wait until two requests are in flight together, so an engine that keeps several conversations
    in flight shows it whatever the machine's speed (one that does not waits 30 s once, then fails)."""

    def __init__(self, max_in_flight: int):
        super().__init__()
        self.max_in_flight, self.in_flight, self.most_in_flight = max_in_flight, 0, 0
        self.lock = threading.Lock()
        self.overlapped = threading.Event()

    def complete(self, messages, max_tokens, temperature, seed):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight > 1:
                self.overlapped.set()
        if not self.overlapped.wait(30):
            self.overlapped.set()
        try:
            return super().complete(messages, max_tokens, temperature, seed)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_concurrent_conversations_store_what_one_at_a_time_stores(tmp_path):
    one = evaluate(task="arithmetic", limit=30, rounds=2, strategy="critique", backend=ScriptedBackend(),
                   db=tmp_path / "a.sqlite")
    backend = ConcurrentScriptedBackend(max_in_flight=8)
    many = evaluate(task="arithmetic", limit=30, rounds=2, strategy="critique", backend=backend, db=tmp_path / "b.sqlite")
    assert 1 < backend.most_in_flight <= 8
    as_rows = lambda run: [(t.item_id, t.sample, t.round, t.messages, t.response, t.correct) for t in run.turns]
    assert as_rows(many) == as_rows(one) and many.generated == 30 * 3


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replies_do_not_depend_on_how_many_conversations_share_a_batch(tmp_path, embedded, temperature):
    """The same run with conversations decoded one at a time and sixteen at a time (critique: a conversation
    grows over its rounds, so slots hold earlier turns), greedy and sampled: the same replies."""
    from selfcorrect.models.llamacpp import LlamaCppBackend
    from selfcorrect.models.spec import embedded_model_path

    alone = LlamaCppBackend(embedded_model_path(), max_in_flight=1)
    options = dict(task="arithmetic", limit=12, rounds=1, strategy="critique", max_tokens=64, cache=False,
                   temperature=temperature)
    one = evaluate(**options, backend=alone, db=tmp_path / "one.sqlite")
    batched = evaluate(**options, backend=embedded, db=tmp_path / "batched.sqlite")
    assert embedded.max_in_flight == 16 and alone.max_in_flight == 1
    as_rows = lambda run: [(t.item_id, t.round, t.messages, t.completion_tokens) for t in run.turns]
    assert as_rows(batched) == as_rows(one)
    # One conversation at a time, each critique request found the conversation so far in its slot: more
    # than the previous prompt (the reply generated after it too), and prefilled only the rest.
    previous_prompts = [m for t in one.turns if t.round == 1 for m in (t.messages[:1], t.messages[:3])]
    counters = alone.decoder.counters
    assert counters["prompt_tokens_reused"] > sum(len(alone._prompt_tokens(m)) for m in previous_prompts)
    assert counters["prompt_tokens_reused"] + counters["prompt_tokens_prefilled"] == sum(t.prompt_tokens for t in one.turns)


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_turn_whose_conversation_is_not_in_the_cache_gets_the_same_reply(tmp_path, temperature):
    """First turns served by the response cache to a fresh model: the correction turns find nothing in
    the KV cache and replay the earlier replies, and still say exactly what the uninterrupted run said."""
    from selfcorrect.models.llamacpp import LlamaCppBackend
    from selfcorrect.models.spec import embedded_model_path

    options = dict(task="arithmetic", limit=8, strategy="critique", max_tokens=64, temperature=temperature)
    uninterrupted = evaluate(**options, rounds=1, backend=LlamaCppBackend(embedded_model_path(), max_in_flight=8),
                             db=tmp_path / "a.sqlite", cache=False)
    evaluate(**options, rounds=0, backend=LlamaCppBackend(embedded_model_path(), max_in_flight=8),
             db=tmp_path / "b.sqlite")
    fresh = LlamaCppBackend(embedded_model_path(), max_in_flight=8)
    resumed = evaluate(**options, rounds=1, backend=fresh, db=tmp_path / "b.sqlite")
    assert (resumed.cache_hits, resumed.generated) == (8, 8) and fresh.decoder.counters["prompt_tokens_replayed"] > 0
    as_rows = lambda run: [(t.item_id, t.round, t.messages, t.completion_tokens) for t in run.turns]
    assert as_rows(resumed) == as_rows(uninterrupted)
