"""The exact multiple-choice estimator: its formula on a hand-worked item, its bookkeeping, and its
agreement with a Monte Carlo of the same turns drawn from the real model's own next-token distributions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from selfcorrect import evaluate, metrics
from selfcorrect.errors import UserError
from selfcorrect.exact import ANSWER_PREFIX, _score_correction, item_probabilities
from selfcorrect.strategies import get_strategy
from selfcorrect.store import OptionScore
from selfcorrect.tasks import load_task

from conftest import ScriptedBackend, cli


def _score(given, probs, labels=("A", "B", "C")):
    return OptionScore("q1", given, list(labels), list(probs), [], [], 0.0, "test")


def test_item_probabilities_by_hand():
    # p1 = (0.5, 0.3, 0.2), gold B. Given A the model moves to B with 0.6, given B it keeps B with 0.7,
    # given C it moves to B with 0.1.
    scores = [_score("", [0.5, 0.3, 0.2]), _score("A", [0.2, 0.6, 0.2]), _score("B", [0.1, 0.7, 0.2]),
              _score("C", [0.5, 0.1, 0.4])]
    p_a, p_b_a, p_b_not_a = item_probabilities(scores, "B")
    assert p_a == pytest.approx(0.3)
    assert p_b_a == pytest.approx(0.7)
    # (0.5 * 0.6 + 0.2 * 0.1) / (1 - 0.3) = 0.32 / 0.7
    assert p_b_not_a == pytest.approx(0.32 / 0.7)
    assert item_probabilities(scores[:3], "B") is None  # a pass missing: the item is not complete


def test_metrics_from_probabilities_by_hand():
    # Two items. Item 1: P(a)=0.5, P(b|a)=0.8, P(b|not a)=0.4; item 2: P(a)=0.2, P(b|a)=1, P(b|not a)=0.25.
    result = metrics.pair_metrics_from_probabilities([0.5, 0.2], [0.8, 1.0], [0.4, 0.25], n_boot=200)
    acc1 = (0.5 + 0.2) / 2
    acc2 = ((0.5 * 0.8 + 0.5 * 0.4) + (0.2 * 1.0 + 0.8 * 0.25)) / 2  # (0.6 + 0.4) / 2
    cl = (0.5 * 0.8 + 0.2 * 1.0) / (0.5 + 0.2)  # 0.6 / 0.7
    cs = (0.5 * 0.4 + 0.8 * 0.25) / (0.5 + 0.8)  # 0.4 / 1.3
    assert (result["acc1"], result["acc2"]) == (pytest.approx(acc1), pytest.approx(acc2))
    assert (result["cl"], result["cs"]) == (pytest.approx(cl), pytest.approx(cs))
    assert result["acc2"] == pytest.approx(acc1 * cl + (1 - acc1) * cs)
    assert result["transitions"]["c->c"] == pytest.approx((0.4 + 0.2) / 2)
    assert result["transitions"]["w->c"] == pytest.approx((0.2 + 0.2) / 2)
    assert sum(result["transitions"].values()) == pytest.approx(1.0)
    assert result["mcnemar_p"] is None


class ScoringBackend(ScriptedBackend):
    """Scripted replies plus option scoring: always 0.5 on the label it was made to give, the rest spread."""

    def __init__(self):
        super().__init__()
        self.scored: list[list[dict]] = []

    def option_probs(self, messages, answer_prefix, labels):
        self.scored.append([dict(m) for m in messages])
        given = messages[1]["content"].removeprefix(f"{answer_prefix} ").rstrip(".") if len(messages) > 1 else None
        if given not in labels:
            return [1.0 / len(labels)] * len(labels)
        return [0.5 if label == given else 0.5 / (len(labels) - 1) for label in labels]


def test_scoring_passes_resume_and_reach_the_report(tmp_path, shared_data):
    db = tmp_path / "r.sqlite"
    backend = ScoringBackend()
    run = evaluate(task="mcq", data=shared_data / "commonsense_qa.jsonl", limit=4, backend=backend, db=db)
    assert run.estimator == "exact" and run.generated == 4 * 6 == len(backend.scored)
    report = run.report()
    # First answer uniform over 5 options; given any answer, the model keeps it with 0.5.
    assert report["acc"][0] == pytest.approx(0.2)
    assert report["cl"] == pytest.approx(0.5)
    assert report["cs"] == pytest.approx(0.125)  # moves to gold with 0.5 / 4 from a wrong answer
    again = ScoringBackend()
    assert evaluate(task="mcq", data=shared_data / "commonsense_qa.jsonl", limit=4, backend=again, db=db).generated == 0
    assert again.scored == []


def test_critique_round_generates_the_review_before_scoring(tmp_path, shared_data):
    backend = ScoringBackend()
    evaluate(task="mcq", data=shared_data / "boolq.jsonl", limit=2, strategy="critique", backend=backend,
             db=tmp_path / "r.sqlite")
    # Per item: 1 first pass + 2 given answers. Each given answer: the review and the improved reply are
    # generated, then the labels are scored where the improved reply began.
    assert len(backend.scored) == 2 * 3 and len(backend.calls) == 2 * 2 * 2
    corrected = [m for m in backend.scored if len(m) > 1]
    assert all(m[2]["content"].startswith("Review your previous answer") for m in corrected)


def test_a_fixed_prompt_round_is_scored_without_generating_the_reply_it_replaces(shared_data):
    task = load_task("mcq", shared_data / "boolq.jsonl")
    item = task.items[0]
    labels = task.labels(item)
    first = [*task.system_messages(), {"role": "user", "content": task.prompt(item)}]
    reask = get_strategy("reask")
    scored = {}
    for strategy in (reask, dataclasses.replace(reask, fixed_prompt=False)):  # the same round, generated
        backend = ScoringBackend()
        result = _score_correction(task, strategy, backend, item, first, labels[1], labels, 64, 0, None, "")
        scored[strategy.fixed_prompt] = (result, len(backend.calls))
    # Scored at the same point of the same conversation, so the same probabilities; only the reply is saved.
    assert scored[True][0] == scored[False][0]
    assert scored[True][0][1][-1] == {"role": "user", "content": task.prompt(item)}
    assert (scored[True][1], scored[False][1]) == (0, 1)


def test_exact_where_impossible_is_a_clear_error(tmp_path, shared_data):
    with pytest.raises(UserError, match="--estimator exact: not possible here: task 'arithmetic' has free-form"):
        evaluate(task="arithmetic", estimator="exact", backend=ScoringBackend(), db=tmp_path / "r.sqlite")
    with pytest.raises(UserError, match="cannot score option labels"):
        evaluate(task="mcq", data=shared_data / "boolq.jsonl", estimator="exact", backend=ScriptedBackend(),
                 db=tmp_path / "r.sqlite")
    assert not (tmp_path / "r.sqlite").exists()
    # auto falls back to sampling when the model cannot score
    run = evaluate(task="mcq", data=shared_data / "boolq.jsonl", limit=1, backend=ScriptedBackend(),
                   db=tmp_path / "r.sqlite")
    assert run.estimator == "sampling"


def _label_distribution(backend, messages: list[dict], labels: list[str]) -> np.ndarray:
    """The distribution of the option a reply names when llama.cpp's own sampler draws its first token at
    temperature 1 with nothing truncated (top_k 0, top_p 1, min_p 0, no penalty: the softmax of the logits),
    after the answer prefix, redrawn until it names an option: the next-token distribution of the main
    context, summed over the tokens whose text is each label and renormalised over them. Computed from the
    model's logits (one prompt evaluation) instead of drawing token by token, which costs a prompt evaluation
    per draw; the prompt is tokenized as create_completion tokenizes it, not by the scoring code under test."""
    prompt = backend.chat_format(messages=messages).prompt + ANSWER_PREFIX
    tokens = backend.llm.tokenize(prompt.encode("utf-8"), special=True)
    import llama_cpp

    with backend.scoring_lock:
        backend._eval_reusing_prefix(tokens)  # the question's prefix is evaluated once per item
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(backend.llm.ctx, -1),
                                       shape=(backend.llm.n_vocab(),)).astype(np.float64)
    weights = np.exp(logits - logits.max())
    named = _label_tokens(backend, tuple(labels))
    mass = np.array([weights[named[label]].sum() for label in labels])
    assert mass.sum() > 0, f"the model gives no weight to any option {labels}"
    return mass / mass.sum()


_LABEL_TOKENS: dict = {}


def _label_tokens(backend, labels: tuple[str, ...]) -> dict[str, list[int]]:
    """label -> the ids of every token whose text, stripped, is that label (as create_completion's text is)."""
    if labels not in _LABEL_TOKENS:
        texts = [backend.llm.detokenize([token]).decode("utf-8", errors="ignore").strip()
                 for token in range(backend.llm.n_vocab())]
        _LABEL_TOKENS[labels] = {label: [t for t, text in enumerate(texts) if text == label] for label in labels}
    return _LABEL_TOKENS[labels]


@pytest.mark.slow
def test_exact_agrees_with_sampling_on_the_embedded_model(tmp_path, shared_data, embedded):
    """The exact estimator's figures lie inside the bootstrap intervals of a Monte Carlo of the same two turns:
    first answers drawn from the model's own distribution over the options, then a reask after each drawn
    answer and a second answer drawn from the distribution that follows it."""
    data = shared_data / "commonsense_qa.jsonl"
    n_items, n_samples = 16, 12
    # The reply reask's round would generate is replaced by scoring, so a short cap changes no figure, only time.
    exact = evaluate(task="mcq", data=data, limit=n_items, estimator="exact", max_tokens=8, backend=embedded,
                     db=tmp_path / "r.sqlite")
    exact_report = exact.report()
    assert exact_report["n_items"] == n_items

    task = load_task("mcq", data)
    rng = np.random.default_rng(0)
    a = np.zeros((n_items, n_samples), dtype=bool)
    b = np.zeros((n_items, n_samples), dtype=bool)
    for i, item in enumerate(task.items[:n_items]):
        labels, question = task.labels(item), task.prompt(item)
        first = _label_distribution(embedded, [{"role": "user", "content": question}], labels)
        firsts = rng.choice(labels, size=n_samples, p=first)
        after: dict[str, np.ndarray] = {}  # one evaluation per distinct first answer
        for j, given in enumerate(firsts):
            if given not in after:
                context = [{"role": "user", "content": question},
                           {"role": "assistant", "content": f"{ANSWER_PREFIX} {given}."},
                           {"role": "user", "content": question}]  # reask
                after[given] = _label_distribution(embedded, context, labels)
            second = rng.choice(labels, p=after[given])
            a[i, j], b[i, j] = given == item.target, second == item.target
    sampled = metrics.pair_metrics(a, b, n_boot=2000, seed=0)
    for name in ("acc1", "acc2", "cl", "cs"):
        low, high = sampled["ci"][name]
        exact_value = exact_report["pairs"][0][name]
        assert low <= exact_value <= high, f"{name}: exact {exact_value:.3f} outside sampling CI [{low:.3f}, {high:.3f}]"
    print(json.dumps({"exact": {k: exact_report["pairs"][0][k] for k in ("acc1", "acc2", "cl", "cs")},
                      "sampled": {k: sampled[k] for k in ("acc1", "acc2", "cl", "cs")}}))


def test_cli_report_and_export_name_the_estimator(tmp_path, shared_data):
    db = str(tmp_path / "r.sqlite")
    done = cli("run", "--task", "mcq", "--data", str(shared_data / "boolq.jsonl"), "--limit", "3", "--db", db, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["estimator"] == "exact" and report["n_items"] == 3
    shown = cli("report", report["run_id"], "--db", db)
    assert "estimator: exact" in shown.stdout
    lines = cli("export", report["run_id"], "--db", db).stdout.splitlines()
    assert len(lines) == 3 * 3  # first pass + one per label (yes, no)
    record = json.loads(lines[0])
    assert record["labels"] == ["yes", "no"] and sum(record["probs"]) == pytest.approx(1.0)
    bad = cli("run", "--estimator", "exact", "--db", db)
    assert bad.returncode == 2 and "--estimator exact: not possible here" in bad.stderr
