"""Compare runs on the same items: accuracy, the confidence/critique decomposition, cost, and for each
pair of runs a paired test of the difference in final accuracy.

Runs are paired by item: only items complete in every run count, and one set of bootstrap resamples of
those items serves every run and every difference, so intervals are comparable across the table.

An item id alone does not name a question: `arith-3` is another sum under other task options, `row-12`
another row of another file. So an item is the same in two runs only when its question and target are the
same text, and runs that hold different items under one id are refused rather than paired.
"""

from __future__ import annotations

import hashlib
import json
from itertools import combinations

import numpy as np

from . import metrics
from .errors import UserError
from .results import Run


def item_contents(run: Run) -> dict[str, str]:
    """item id -> a hash of the item's question and target, as the run stored them."""
    return {
        item["item_id"]: hashlib.sha256(json.dumps([item["question"], item["target"]]).encode()).hexdigest()
        for item in run.items
    }


def task_label(run: Run) -> str:
    """The run's task and options, without the data file's path (a copy elsewhere holds the same items)."""
    task = {key: value for key, value in run.config["task"].items() if key != "data"}
    return json.dumps(task, sort_keys=True)


def _check_same_items(runs: list[Run]) -> None:
    """Refuse runs that hold different questions under one item id: pairing them would compare nothing."""
    contents = [item_contents(run) for run in runs]
    for a, b in combinations(range(len(runs)), 2):
        for item_id, content in contents[a].items():
            if item_id in contents[b] and contents[b][item_id] != content:
                raise UserError(
                    f"compare: runs {runs[a].run_id} and {runs[b].run_id} hold different items under the id "
                    f"'{item_id}' (tasks {task_label(runs[a])} and {task_label(runs[b])}); compare runs of the "
                    "same task, options and data"
                )


def compare_runs(runs: list[Run], n_boot: int = 2000, seed: int = 0) -> dict:
    if len(runs) < 2:
        raise UserError("compare: give at least two runs")
    _check_same_items(runs)
    # item id -> what each run knows of it (estimators.py), read once per run; everything below derives from it
    outcomes = [run.estimation.per_item(run) for run in runs]
    items = [item_id for item_id in outcomes[0] if all(item_id in other for other in outcomes[1:])]
    if not items:
        raise UserError("compare: the runs share no complete items; compare runs of the same task and data")
    index = metrics.bootstrap_indices(len(items), n_boot, seed)
    finals = [np.array([run.estimation.final(outcome[i]) for i in items]) for run, outcome in zip(runs, outcomes)]

    rows = []
    for run, known, final in zip(runs, outcomes, finals):
        step = run.estimation.first_last([known[i] for i in items], n_boot, seed)
        chosen = set(items)
        tokens = sum(t.prompt_tokens + t.completion_tokens for t in run.turns if t.item_id in chosen)
        seconds = sum(t.latency_s for t in run.turns if t.item_id in chosen)
        tokens_per_item = tokens / len(items) if tokens else None  # the exact estimator counts no tokens
        rows.append({
            "run_id": run.run_id,
            "strategy": run.config["strategy"],
            "model": run.config["model"],
            "upper_bound": run.config["upper_bound"],
            "estimator": run.estimator,
            "rounds": run.config["rounds"],
            "acc_first": step["acc1"],
            "acc_final": float(final.mean()),
            "acc_final_ci": metrics.percentile_ci(final[index].mean(axis=1)),
            "delta": step["delta"],
            "delta_ci": step["ci"]["delta"],
            "cl": step["cl"],
            "cs": step["cs"],
            "rss": step["rss"],
            "transitions": step["transitions"],
            "ci": step["ci"],  # intervals of acc1, acc2, cl, cs, rss, ... over the common items
            "tokens_per_item": tokens_per_item,
            "seconds_per_item": seconds / len(items),
            "acc_per_1k_tokens": float(final.mean()) / (tokens_per_item / 1000) if tokens_per_item else None,
        })

    pairs = []
    for a, b in combinations(range(len(runs)), 2):
        difference = finals[b] - finals[a]
        pairs.append({
            "a": runs[a].run_id,
            "b": runs[b].run_id,
            "diff": float(difference.mean()),  # final accuracy of b minus that of a
            "diff_ci": metrics.percentile_ci(difference[index].mean(axis=1)),
            "mcnemar_p": _mcnemar(runs[a], outcomes[a], runs[b], outcomes[b], items),
        })
    # Items some run has complete but another lacks are left out; say how many per run.
    left_out = {run.run_id: len(outcome) - len(items) for run, outcome in zip(runs, outcomes)}
    # `items` names the common items, so that a report can draw every other figure of these runs on them too.
    return {"n_items": len(items), "items": items, "left_out": left_out, "runs": rows, "pairs": pairs}


def _mcnemar(run_a: Run, a: dict, run_b: Run, b: dict, items: list[str]) -> float | None:
    """McNemar's exact test on final correctness, when both runs have one graded answer per item; with
    several samples (or probabilities) there is no single paired binary outcome per item."""
    right_a = [run_a.estimation.final_outcome(a[i]) for i in items]
    right_b = [run_b.estimation.final_outcome(b[i]) for i in items]
    if None in right_a or None in right_b:
        return None
    only_a = sum(x and not y for x, y in zip(right_a, right_b))
    only_b = sum(y and not x for x, y in zip(right_a, right_b))
    return metrics.mcnemar_exact(only_a, only_b)
