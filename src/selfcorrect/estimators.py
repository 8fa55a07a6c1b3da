"""The two estimators: how a run turns a model's behaviour into CL, CS and RSS.

- **sampling** plays every conversation out and grades every reply (`engine.run_cells`); each figure counts
  graded replies, one cell per (item, sample, round).
- **exact** (multiple choice only) scores the option labels instead (`exact.run_scoring`): K+1 scoring passes
  per item give (P(a), P(b|a), P(b|not a)), and every figure follows from these probabilities, no sampling.

Everything that differs between them (what a run's progress counts, how it runs, what it stores per item,
how it sums up and pairs items, what its report says) is an attribute or method of its `Estimator`, so that no
other module compares estimator names. A run's config keeps the name (`estimator_named` finds it again).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import numpy as np

from . import metrics
from .engine import run_cells
from .errors import UserError
from .exact import item_probabilities, run_scoring, scoring_problem
from .grader_pool import GraderPool
from .isolation import using
from .models import Backend
from .store import OptionScore, Store, Turn

CHOICES = ("auto", "exact", "sampling")  # what --estimator takes


class Run(Protocol):
    """What an estimator reads of a stored run (results.Run has it)."""

    config: dict
    items: list[dict]
    turns: list[Turn]
    scores: list[OptionScore]

    def correctness(self) -> tuple[list[str], np.ndarray]: ...


@dataclass(frozen=True)
class Estimator:
    name: str
    unit: str  # what the run's progress counts
    table: str  # the store's table of what it records per item
    stores_replies: bool  # graded replies to train on, draw, export or grade again; else option probabilities
    note: str  # what the report says of its figures
    # Why its report has no McNemar test, no token count, no grader (None: it has them)
    no_mcnemar: str | None
    no_tokens: str | None
    no_grades: str | None

    def total(self, task, items: list, samples: int, rounds: int) -> int:
        """What the run records in all: turns, or scoring passes."""
        raise NotImplementedError

    def run(self, run_id: str, task, items: list, strategy, backend: Backend, store: Store, *, samples: int,
            rounds: int, temperature, max_tokens: int, seed: int, critic: Backend | None, budget: int | None,
            grader_timeout: float, isolation: str, on_turn: Callable[[], None],
            examples: Callable) -> tuple[int, int]:
        """Record what is missing of the run; (made now, taken from the response cache)."""
        raise NotImplementedError

    def per_item(self, run: Run) -> dict:
        """item id -> what the run knows of it, for the items it has whole."""
        raise NotImplementedError

    def rows(self, run: Run) -> list:
        """What the run stores, one record per turn or per scoring pass (what `export` writes)."""
        raise NotImplementedError

    def final(self, known) -> float:
        """One item's final accuracy."""
        raise NotImplementedError

    def first_last(self, known: list, n_boot: int, seed: int) -> dict:
        """metrics.pair_metrics of the first and the last answers over these items' records."""
        raise NotImplementedError

    def summary(self, run: Run, n_boot: int) -> tuple[int, dict | None]:
        """(complete items, metrics.summarize-shaped summary or None when none is complete)."""
        raise NotImplementedError

    def final_outcome(self, known) -> bool | None:
        """The item's one right/wrong final answer for McNemar's test; None when it has none."""
        return None

    def first_conversation(self, run: Run) -> tuple[str, list[dict]] | None:
        """What the run sent on its first complete item: (which conversation it is, its messages); None when
        no item is complete."""
        raise NotImplementedError


class Sampling(Estimator):
    def total(self, task, items, samples, rounds):
        return len(items) * samples * (rounds + 1)

    def run(self, run_id, task, items, strategy, backend, store, *, samples, rounds, temperature, max_tokens, seed,
            critic, budget, grader_timeout, isolation, on_turn, examples):
        with GraderPool(grader_timeout) as graders, using(isolation):
            bounded = replace(task, grade=graders.limit(task.grade))
            return run_cells(run_id, bounded, items, strategy, backend, store, samples=samples, rounds=rounds,
                             temperature=temperature, max_tokens=max_tokens, seed=seed, critic=critic, budget=budget,
                             on_turn=on_turn, examples=examples)

    def per_item(self, run):
        return dict(zip(*run.correctness()))

    def rows(self, run):
        return run.turns

    def final(self, known):
        return float(known[:, -1].mean())

    def first_last(self, known, n_boot, seed):
        cells = np.stack(known)
        return metrics.pair_metrics(cells[:, :, 0], cells[:, :, -1], n_boot=n_boot, seed=seed)

    def summary(self, run, n_boot):
        complete, correct = run.correctness()
        if not complete:
            return 0, None
        return len(complete), metrics.summarize(correct, n_boot=n_boot, seed=run.config["seed"])

    def final_outcome(self, known):
        return bool(known[0, -1]) if known.shape[0] == 1 else None

    def first_conversation(self, run):
        complete, _ = run.correctness()
        if not complete:
            return None
        # A turn stores the whole conversation up to its round: the last round's holds every message.
        last = max((turn for turn in run.turns if turn.item_id == complete[0] and turn.sample == 0),
                   key=lambda turn: turn.round)
        return f"item {complete[0]}, sample 0, rounds 0 to {last.round}", last.messages


class Exact(Estimator):
    def total(self, task, items, samples, rounds):
        return sum(1 + len(task.labels(item)) for item in items)

    def run(self, run_id, task, items, strategy, backend, store, *, samples, rounds, temperature, max_tokens, seed,
            critic, budget, grader_timeout, isolation, on_turn, examples):
        # Scoring passes are not cached; the greedy replies inside them are.
        return run_scoring(run_id, task, items, strategy, backend, store, max_tokens=max_tokens, seed=seed,
                           critic=critic, on_pass=on_turn, examples=examples), 0

    def per_item(self, run):
        by_item: dict[str, list] = {}
        for score in run.scores:
            by_item.setdefault(score.item_id, []).append(score)
        known = {}
        for item in run.items:
            found = item_probabilities(by_item.get(item["item_id"], []), item["target"])
            if found is not None:
                known[item["item_id"]] = found
        return known

    def rows(self, run):
        return run.scores

    def final(self, known):
        p_a, p_b_a, p_b_not_a = known
        return p_a * p_b_a + (1 - p_a) * p_b_not_a

    def first_last(self, known, n_boot, seed):
        return metrics.pair_metrics_from_probabilities(*zip(*known), n_boot=n_boot, seed=seed)

    def first_conversation(self, run):
        known = self.per_item(run)
        if not known:
            return None
        item = next(iter(known))
        # The first-answer pass holds only the question; a pass after a given answer holds the strategy's turn too.
        scored = next(score for score in run.scores if score.item_id == item and score.given)
        return (f"item {item}, the scoring pass after the answer {scored.given} put in the model's mouth (the "
                "option labels are scored after the last message)", scored.messages)

    def summary(self, run, n_boot):
        known = list(self.per_item(run).values())
        if not known:
            return 0, None
        pair = self.first_last(known, n_boot, run.config["seed"])
        return len(known), {
            "acc": [pair["acc1"], pair["acc2"]],
            "acc_ci": [pair["ci"]["acc1"], pair["ci"]["acc2"]],
            "pairs": [{"from": 0, "to": 1, **pair}],
            "first_last": pair,
        }


SAMPLING = Sampling("sampling", unit="turns", table="turns", stores_replies=True,
                    note="sampling (every figure counts graded replies)", no_mcnemar=None, no_tokens=None,
                    no_grades=None)
EXACT = Exact("exact", unit="scoring passes", table="option_scores", stores_replies=False,
              note="exact (every figure from option probabilities: K+1 scoring passes per item, no sampling; "
                   "transition shares are expected shares, no McNemar test)",
              no_mcnemar="the exact estimator gives probabilities, not right/wrong outcomes to count",
              no_tokens="the exact estimator generates no replies, so it counts no tokens",
              no_grades="none: the exact estimator scores option labels (their probabilities), no reply is graded")
ESTIMATORS = {estimator.name: estimator for estimator in (SAMPLING, EXACT)}


def estimator_named(name: str) -> Estimator:
    """The estimator a stored run's config names."""
    return ESTIMATORS[name]


def check_choice(requested: str) -> None:
    """Refuse an --estimator that is not one of CHOICES, before anything is loaded."""
    if requested not in CHOICES:
        raise UserError(f"--estimator {requested}: choose one of {', '.join(CHOICES)}")


def choose_estimator(
    requested: str, task, strategy, backend: Backend, model: str, rounds: int, samples: int,
    temperature: float | str = 0.0,
) -> Estimator:
    """The estimator a run uses; asking for "exact" where it cannot work is an error, "auto" falls back."""
    check_choice(requested)
    reasons = []
    if strategy.baseline:
        reasons.append(f"strategy '{strategy.name}' picks among sampled answers")
    if task.labels is None:
        reasons.append(f"task '{task.name}' has free-form answers, not option labels")
    if rounds != 1:
        reasons.append("it covers one correction round (--rounds 1)")
    if samples != 1:
        reasons.append("it draws no samples (drop --samples)")
    if temperature != 0:
        reasons.append(f"it samples nothing, so --temperature {temperature} would be ignored (use --temperature 0)")
    # Last, because a server is asked whether it can score (a request or three), worth it only when the rest allows.
    if requested != SAMPLING.name and not reasons and (problem := scoring_problem(backend)):
        reasons.append(f"model {model}: {problem}")
    if requested == EXACT.name and reasons:
        raise UserError(f"--estimator exact: not possible here: {'; '.join(reasons)}; use --estimator sampling")
    return SAMPLING if requested == SAMPLING.name or reasons else EXACT
