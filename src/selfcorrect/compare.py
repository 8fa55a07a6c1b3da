"""Compare runs on the same items: accuracy, the confidence/critique decomposition, cost, and for each
pair of runs a paired test of the difference in final accuracy.

Runs are paired by item: only items complete in every run count, and one set of bootstrap resamples of
those items serves every run and every difference, so intervals are comparable across the table.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from . import metrics
from .api import Run
from .errors import UserError


def _first_and_final(run: Run) -> dict[str, tuple[float, float, np.ndarray | None]]:
    """item id -> (first-answer accuracy, final accuracy, final correctness per sample or None).

    For the exact estimator the accuracies are probabilities: P(a) and P(a)P(b|a) + (1-P(a))P(b|not a).
    """
    if run.estimator == "exact":
        ids, probabilities = run.exact_probabilities()
        return {
            item_id: (p_a, p_a * p_b_a + (1 - p_a) * p_b_not_a, None)
            for item_id, (p_a, p_b_a, p_b_not_a) in zip(ids, probabilities)
        }
    ids, correct = run.correctness()
    return {item_id: (cells[:, 0].mean(), cells[:, -1].mean(), cells[:, -1]) for item_id, cells in zip(ids, correct)}


def _first_last_metrics(run: Run, items: list[str], n_boot: int, seed: int) -> dict:
    if run.estimator == "exact":
        ids, probabilities = run.exact_probabilities()
        chosen = dict(zip(ids, probabilities))
        return metrics.pair_metrics_from_probabilities(*zip(*(chosen[i] for i in items)), n_boot=n_boot, seed=seed)
    ids, correct = run.correctness()
    chosen = dict(zip(ids, correct))
    cells = np.stack([chosen[i] for i in items])
    return metrics.pair_metrics(cells[:, :, 0], cells[:, :, -1], n_boot=n_boot, seed=seed)


def compare_runs(runs: list[Run], n_boot: int = 2000, seed: int = 0) -> dict:
    if len(runs) < 2:
        raise UserError("compare: give at least two runs")
    outcomes = [_first_and_final(run) for run in runs]
    items = [item_id for item_id in outcomes[0] if all(item_id in other for other in outcomes[1:])]
    if not items:
        raise UserError("compare: the runs share no complete items; compare runs of the same task and data")
    index = metrics.bootstrap_indices(len(items), n_boot, seed)
    finals = [np.array([outcome[i][1] for i in items]) for outcome in outcomes]

    rows = []
    for run, final in zip(runs, finals):
        step = _first_last_metrics(run, items, n_boot, seed)
        chosen = set(items)
        tokens = sum(t.prompt_tokens + t.completion_tokens for t in run.turns if t.item_id in chosen)
        seconds = sum(t.latency_s for t in run.turns if t.item_id in chosen)
        tokens_per_item = tokens / len(items) if tokens else None  # the exact estimator counts no tokens
        rows.append({
            "run_id": run.run_id,
            "strategy": run.config["strategy"],
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
            "mcnemar_p": _mcnemar(outcomes[a], outcomes[b], items),
        })
    # Items some run has complete but another lacks are left out; say how many per run.
    left_out = {run.run_id: len(outcome) - len(items) for run, outcome in zip(runs, outcomes)}
    return {"n_items": len(items), "left_out": left_out, "runs": rows, "pairs": pairs}


def _mcnemar(a: dict, b: dict, items: list[str]) -> float | None:
    """McNemar's exact test on final correctness, when both runs have one graded answer per item; with
    several samples (or probabilities) there is no single paired binary outcome per item."""
    finals_a, finals_b = [a[i][2] for i in items], [b[i][2] for i in items]
    if any(f is None or len(f) != 1 for f in finals_a + finals_b):
        return None
    only_a = sum(bool(x[0]) and not bool(y[0]) for x, y in zip(finals_a, finals_b))
    only_b = sum(bool(y[0]) and not bool(x[0]) for x, y in zip(finals_a, finals_b))
    return metrics.mcnemar_exact(only_a, only_b)
