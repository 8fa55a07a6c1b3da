"""A stored run as the log records of Yang et al. (2025)'s own scripts, so their analysis can read our runs.

The authors' code (github.com/Zhe-Young/SelfCorrectDecompose) writes two kinds of JSON-lines logs:

- `eval_sampling.py`: one line per (item, sample), `{"id", "answer1", "answer2", "correct1", "correct2"}`,
  read by `analysis_sampling.py`;
- `eval_logits.py`: one line per item, `{"id", "answer", "probs1", "probs2_list"}`, where `answer` is the
  index of the gold option, `probs1` the first answer's distribution over the options and `probs2_list[k]`
  the second answer's distribution after the model answered option k; read by `analysis_logits.py`.

`sampling_log` and `logits_log` build those records from a run (`selfcorrect.api.Run`, as `load_run`
returns it); written one JSON object per line, they are files the authors' analysis reads as it reads
its own. Item ids are ours (strings such as "arith-0"), not the integer ids of the authors' data files;
their analysis only groups by id, so any distinct ids do.

Nothing here needs numpy: the records are plain Python values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # only for annotations: importing api pulls in the engine and numpy
    from .results import Run


def sampling_log(run: Run) -> list[dict]:
    """The records of `eval_sampling.py` for a sampled run: one per (item, sample), in item then sample order.

    `answer1`/`correct1` are round 0 (the first answer) and `answer2`/`correct2` round 1 (the first
    correction): a run with more correction rounds gives only its step from round 0 to round 1, which
    matches our report's `pairs[0]`, not its headline figures (those are for the last round pair). An item
    is left out unless every turn of the run for it (every sample, every round) is stored, the rule by which
    our report counts complete items, so the log and the report cover the same items. A run with no
    complete item gives an empty list. UserError for an exact-estimator run or a run without correction rounds.
    """
    if not run.estimation.stores_replies:
        raise UserError(
            f"run {run.run_id}: it used the {run.estimator} estimator, which stores option probabilities, not "
            "sampled answers; export it as the logits log (eval_logits.py's records) instead"
        )
    samples, rounds = run.config["samples"], run.config["rounds"]
    if rounds < 1:
        raise UserError(
            f"run {run.run_id}: it has no correction round (--rounds 0), so there is no second answer for the "
            "paper's sampling log; make a run with --rounds 1 or more"
        )
    cells: dict[str, dict[tuple[int, int], object]] = {}
    for turn in run.turns:
        cells.setdefault(turn.item_id, {})[(turn.sample, turn.round)] = turn
    records = []
    for item in run.items:
        item_id = item["item_id"]
        stored = cells.get(item_id, {})
        if len(stored) != samples * (rounds + 1):
            continue  # incomplete: our report leaves it out too
        for sample in range(samples):
            first, second = stored[(sample, 0)], stored[(sample, 1)]
            records.append({
                "id": item_id,
                "answer1": first.response,
                "answer2": second.response,
                "correct1": bool(first.correct),
                "correct2": bool(second.correct),
            })
    return records


def logits_log(run: Run) -> list[dict]:
    """The records of `eval_logits.py` for an exact-estimator run: one per item, in item order.

    `probs1` is the first scoring pass's distribution over the options, in the task's label order (the
    order the pass stored its labels in); `probs2_list[k]` is the distribution after the model was made to
    answer the k-th label, in the same label order; `answer` is the index of the item's gold label among
    them. An item is left out unless all its K+1 scoring passes are stored (as our report leaves it out). A
    run with no complete item gives an empty list. UserError for a sampled run, or for an item whose gold
    answer is not one of its labels.
    """
    if run.estimation.stores_replies:
        raise UserError(
            f"run {run.run_id}: it used the {run.estimator} estimator, which stores sampled answers, not option "
            "probabilities; export it as the sampling log (eval_sampling.py's records) instead"
        )
    by_item: dict[str, dict[str, object]] = {}
    for score in run.scores:
        by_item.setdefault(score.item_id, {})[score.given] = score
    records = []
    for item in run.items:
        item_id = item["item_id"]
        passes = by_item.get(item_id, {})
        first = passes.get("")
        if first is None or any(label not in passes for label in first.labels):
            continue  # a scoring pass is missing: our report leaves the item out too
        labels = list(first.labels)
        if item["target"] not in labels:
            raise UserError(
                f"run {run.run_id}: item {item_id}'s gold answer {item['target']!r} is not one of its option "
                f"labels {labels}, so it has no index for the logits log"
            )
        records.append({
            "id": item_id,
            "answer": labels.index(item["target"]),
            "probs1": [float(p) for p in first.probs],
            "probs2_list": [_in_order(passes[given], labels) for given in labels],
        })
    return records


def _in_order(score, labels: list[str]) -> list[float]:
    """A scoring pass's probabilities in the order of `labels` (every pass of an item stores the same labels
    in the same order; this keeps the record right should one not)."""
    by_label = dict(zip(score.labels, score.probs))
    if set(by_label) != set(labels):
        raise UserError(f"item {score.item_id}: the scoring pass after answer {score.given!r} scored the labels "
                        f"{list(score.labels)}, not the first pass's {labels}")
    return [float(by_label[label]) for label in labels]
