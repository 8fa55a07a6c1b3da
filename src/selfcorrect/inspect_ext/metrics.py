"""Inspect metrics over `selfcorrect_scorer`'s per-round scores: `cl`, `cs`, `rss` and `round_accuracy`
(which Inspect shows as acc_0 .. acc_N), all computed by `selfcorrect.metrics.summarize`, as `selfcorrect report`
computes them.

A score's value maps "round_0" .. "round_N" to 1 (right) or 0 (wrong). Samples are grouped by sample id: the
epochs of one sample are its samples in selfcorrect's sense, so the metrics take Inspect's unreduced scores
(one per epoch), never the epoch means, which would lose which first answers were kept and which fixed. As
in selfcorrect's report, only items with every epoch scored count, and CL, CS and RSS are those of the last
correction (round N-1 -> N). A metric that is undefined (CL with no first answer right, CS with none wrong,
RSS with all or none right) is NaN, as Inspect shows a value it could not compute.
"""

from __future__ import annotations

import math

import numpy as np
from inspect_ai.scorer import Metric, SampleScore, metric

from .. import metrics


def round_key(round_: int) -> str:
    """The key of round `round_` in a score's value."""
    return f"round_{round_}"


def correctness_table(scores: list[SampleScore]) -> np.ndarray:
    """Right/wrong of shape (items, samples, rounds) from one score per (sample id, epoch); items scored in
    fewer epochs than the most are left out, as selfcorrect's report leaves out incomplete items."""
    by_item: dict[str, list[list[bool]]] = {}
    n_rounds = max(len(score.score.value) for score in scores)
    for score in scores:
        values = score.score.value
        by_item.setdefault(str(score.sample_id), []).append([bool(values[round_key(t)]) for t in range(n_rounds)])
    n_samples = max(len(rows) for rows in by_item.values())
    return np.array([rows for rows in by_item.values() if len(rows) == n_samples], dtype=bool)


def _summary(scores: list[SampleScore]) -> dict | None:
    """selfcorrect's summary of the scores, or None before any sample is scored (Inspect asks then too)."""
    if not scores:
        return None
    # Point estimates only (Inspect shows no intervals): one bootstrap resample instead of 2,000 spares the
    # (resamples x items) index matrix that a large eval would otherwise build for every metric.
    return metrics.summarize(correctness_table(scores), n_boot=1)


def _last_correction_metric(name: str, description: str):
    """The metric `name` of selfcorrect's last-correction figures (cl, cs or rss), registered with Inspect."""

    def make() -> Metric:
        def compute(scores: list[SampleScore]) -> float:
            summary = _summary(scores)
            value = summary["pairs"][-1][name] if summary and summary["pairs"] else None  # no pairs: no correction
            return math.nan if value is None else value

        return compute

    make.__name__, make.__doc__ = name, description
    return metric(name, scores="unreduced")(make)


cl = _last_correction_metric(
    "cl", "Confidence: of the answers right before the last correction, the share still right after it.")
cs = _last_correction_metric(
    "cs", "Critique: of the answers wrong before the last correction, the share right after it.")
rss = _last_correction_metric(
    "rss", "Relative self-correction score of the last correction: 0.5 means it changed nothing.")


@metric(scores="unreduced")
def round_accuracy() -> Metric:
    """Accuracy of each round, as acc_0 (the first answer) .. acc_N."""
    def compute(scores: list[SampleScore]) -> dict[str, float]:
        summary = _summary(scores)
        return {f"acc_{t}": acc for t, acc in enumerate(summary["acc"])} if summary else {}

    return compute
