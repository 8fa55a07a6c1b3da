"""A stored run as the Python API returns it: `Run`, with its config, items, turns (or scoring passes) and
the report of its figures (`Run.report()`, the dict `--json` prints)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UserError
from .estimators import Estimator, estimator_named
from .store import OptionScore, Store, Turn
from .tasks import grader_version
from .tasks.ifeval import instruction_following


@dataclass
class Run:
    """A stored run: its config, its items and every turn written so far."""

    run_id: str
    config: dict
    db_path: Path
    items: list[dict]
    turns: list[Turn]
    scores: list[OptionScore] = field(default_factory=list)  # the exact estimator's scoring passes
    # Per call that ran it and HTTP client (its model's, the critic's, each Ray actor's): what its requests met.
    traffic: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # cells whose request failed and no turn has filled since
    generated: int = 0  # turns (or scoring passes) the model made for the call that returned this object
    cache_hits: int = 0  # turns that call took whole from the response cache
    # How its task was loaded ({"task", "data", "options"}); None for runs stored before runs kept it.
    task_spec: dict | None = None

    @property
    def estimator(self) -> str:
        """The estimator's name, as the config stores it."""
        return self.config["estimator"]

    @property
    def estimation(self) -> Estimator:
        """The estimator itself (estimators.py): what the run records per item and how it sums up."""
        return estimator_named(self.config["estimator"])

    def correctness(self) -> tuple[list[str], np.ndarray]:
        """(item ids, array of shape (items, samples, rounds + 1)) over the items whose every cell is stored."""
        samples, rounds = self.config["samples"], self.config["rounds"]
        grid: dict[str, np.ndarray] = {}
        filled: dict[str, int] = {}
        for turn in self.turns:
            cells = grid.setdefault(turn.item_id, np.zeros((samples, rounds + 1), dtype=bool))
            cells[turn.sample, turn.round] = turn.correct
            filled[turn.item_id] = filled.get(turn.item_id, 0) + 1
        complete = [item["item_id"] for item in self.items if filled.get(item["item_id"]) == samples * (rounds + 1)]
        if not complete:
            return [], np.zeros((0, samples, rounds + 1), dtype=bool)
        return complete, np.stack([grid[item_id] for item_id in complete])

    def on_items(self, item_ids: list[str]) -> Run:
        """The run cut down to these of its items, turns and scoring passes: runs paired on their common items
        (compare.py) are reported on those alone."""
        keep = set(item_ids)
        return replace(self, items=[item for item in self.items if item["item_id"] in keep],
                       turns=[turn for turn in self.turns if turn.item_id in keep],
                       scores=[score for score in self.scores if score.item_id in keep])

    def correction_tokens_per_round(self) -> int:
        """Mean tokens (prompt + completion) one correction round of one conversation cost in this run:
        the budget that makes a baseline spend what this run spent."""
        spent = [t.prompt_tokens + t.completion_tokens for t in self.turns if t.round > 0]
        if not spent:
            raise UserError(f"--match-budget {self.run_id}: the run has no stored correction turns to match")
        return max(1, round(sum(spent) / len(spent)))

    def report(self, n_boot: int = 2000) -> dict:
        """Metrics of the run as one JSON-ready dict (the shape `--json` prints)."""
        n_complete, summary = self.estimation.summary(self, n_boot)
        report = {
            "run_id": self.run_id,
            "db": str(self.db_path),
            "config": self.config,
            "estimator": self.estimator,
            "n_items": n_complete,
            "n_items_total": len(self.items),
            "complete": n_complete == len(self.items),
            "generated": self.generated,
            "cache_hits": self.cache_hits,
            "upper_bound": self.config["upper_bound"],
            "tokens": _costs(self.turns, len(self.items)),
            "verifier": _verifier(self.turns),
            # None for runs stored before prompt versions were kept: of unknown prompts, never resumed.
            "prompt_version": self.config.get("prompts"),
            "replies": _replies(self.turns),
            "grading": _grading(self.turns),
            "instruction_following": instruction_following(self.turns),
            "http": _http_traffic(self.traffic),
            # The first in item order, with the error the backend gave; a rerun retries every one.
            "failed_cells": {"count": len(self.failures), "first": self.failures[0]} if self.failures else None,
        }
        if summary is None:
            return {**report, "acc": [], "acc_ci": [], "cl": None, "cs": None, "rss": None, "acc_inf": None,
                    "delta": None, "transitions": None, "mcnemar_p": None, "ci": {}, "pairs": []}
        ci = {f"acc_{t}": interval for t, interval in enumerate(summary["acc_ci"])}
        last = summary["pairs"][-1] if summary["pairs"] else None
        headline = {name: (last[name] if last else None) for name in ("cl", "cs", "rss", "acc_inf", "delta")}
        if last:
            ci.update({name: last["ci"][name] for name in ("cl", "cs", "rss", "acc_inf", "delta")})
        return {
            **report,
            "acc": summary["acc"],
            "acc_ci": summary["acc_ci"],
            **headline,
            "transitions": last["transitions"] if last else None,
            "mcnemar_p": last["mcnemar_p"] if last else None,
            "ci": ci,
            "pairs": summary["pairs"],
            "first_last": summary["first_last"],
        }


def _costs(turns: list[Turn], n_items: int) -> dict:
    """Tokens and wall time per run, per item and per round (round 0 is the first answer)."""
    rounds: dict[int, dict] = {}
    for turn in turns:
        cost = rounds.setdefault(turn.round, {"round": turn.round, "prompt": 0, "completion": 0, "seconds": 0.0})
        cost["prompt"] += turn.prompt_tokens
        cost["completion"] += turn.completion_tokens
        cost["seconds"] += turn.latency_s
    prompt = sum(c["prompt"] for c in rounds.values())
    completion = sum(c["completion"] for c in rounds.values())
    seconds = sum(c["seconds"] for c in rounds.values())
    per = max(n_items, 1)
    return {"prompt": prompt, "completion": completion, "per_item": (prompt + completion) / per,
            "seconds": seconds, "seconds_per_item": seconds / per, "per_round": [rounds[r] for r in sorted(rounds)]}


def _http_traffic(calls: list[dict]) -> dict | None:
    """What the HTTP requests of the run met, over every call that ran it (a resumed run has several) and every
    HTTP client (the model's, the critic's, each Ray actor's): requests sent, how many repeated a failed one, how
    many were answered 429 and 503; of one client, the most in flight at once, the ceiling asked for and the
    lowest its adaptive limit went. None for a run that sent no HTTP request."""
    if not calls:
        return None
    summed = {key: sum(call[key] for call in calls) for key in ("requests", "retried", "rate_limited", "unavailable")}
    # Ceiling and lowest limit of one client, never mixed across clients (a critic's ceiling of 64 beside the model's
    # --concurrency 8 would read as a limit that fell): the one whose limit fell furthest, else the busiest.
    fell = [call for call in calls if call["lowest_limit"] < call["concurrency"]]
    shown = (min(fell, key=lambda call: call["lowest_limit"] / call["concurrency"]) if fell
             else max(calls, key=lambda call: call["peak_in_flight"]))
    return {**summed, "peak_in_flight": max(call["peak_in_flight"] for call in calls),
            "concurrency": shown["concurrency"], "lowest_limit": shown["lowest_limit"], "calls": len(calls)}


def _replies(turns: list[Turn]) -> dict:
    """How the run's replies ended ("stop", "length" at --max-tokens, "context" cut at the model's context
    window, "unknown" where the backend or an older store did not say), and every distinct report of what
    an HTTP server ran (more than one means the model behind the endpoint changed during the run)."""
    finish_reasons: dict[str, int] = {}
    served: list[dict] = []
    for turn in turns:
        for reason in turn.finish_reasons if turn.finish_reasons is not None else [None]:
            finish_reasons[reason or "unknown"] = finish_reasons.get(reason or "unknown", 0) + 1
        if turn.served_by and turn.served_by not in served:
            served.append(turn.served_by)
    return {"finish_reasons": finish_reasons, "served_by": served}


def _grading(turns: list[Turn]) -> dict:
    """Which grader versions gave the run's verdicts ("unknown" for turns stored before versions were
    kept), how many verdicts come from graders older than today's, and how many grades timed out."""
    today = grader_version()
    versions: dict[str, int] = {}
    for turn in turns:
        versions[turn.grader_version or "unknown"] = versions.get(turn.grader_version or "unknown", 0) + 1
    return {
        "versions": versions,
        "current_version": today,
        "outdated": sum(count for version, count in versions.items() if version not in (today, "unknown")),
        "unversioned": versions.get("unknown", 0),
        "timeouts": sum(bool(turn.extra.get("grader_timeout")) for turn in turns),
        "isolation": _isolation_counts(turns),
        "isolation_notes": sorted({turn.extra["isolation_note"] for turn in turns if "isolation_note" in turn.extra}),
    }


def _isolation_counts(turns: list[Turn]) -> dict[str, int]:
    """How many grades ran their program inside each boundary; "not recorded" for code grades stored before
    the boundary was (a code grade is one that timed its program)."""
    counts: dict[str, int] = {}
    for turn in turns:
        if "isolation" in turn.extra or "duration_s" in turn.extra:
            name = turn.extra.get("isolation", "not recorded")
            counts[name] = counts.get(name, 0) + 1
    return counts


def _verifier(turns: list[Turn]) -> dict | None:
    """How well a strategy's own verdict ("my previous answer is wrong") matched the grade of that answer:
    precision and recall of "wrong", over correction rounds where the strategy gave a verdict."""
    grade = {(t.item_id, t.sample, t.round): t.correct for t in turns}
    pairs = [
        (t.notes["judged_wrong"], not grade[(t.item_id, t.sample, t.round - 1)])
        for t in turns
        if t.round > 0 and t.notes.get("judged_wrong") is not None and (t.item_id, t.sample, t.round - 1) in grade
    ]
    if not pairs:
        return None
    flagged = [wrong for judged, wrong in pairs if judged]
    actually_wrong = [judged for judged, wrong in pairs if wrong]
    return {
        "verdicts": len(pairs),
        "precision_wrong": sum(flagged) / len(flagged) if flagged else None,
        "recall_wrong": sum(actually_wrong) / len(actually_wrong) if actually_wrong else None,
        "accuracy": sum(judged == wrong for judged, wrong in pairs) / len(pairs),
    }


def read_run(store: Store, run_id: str, generated: int = 0, cache_hits: int = 0) -> Run:
    return Run(
        run_id, store.config(run_id), store.path, store.items(run_id), store.turns(run_id),
        store.option_scores(run_id), store.traffic(run_id), store.failures(run_id), generated, cache_hits,
        store.task_spec(run_id),
    )
