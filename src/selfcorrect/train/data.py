"""Training data from stored runs, in TRL's conversational formats, for the recipes of RECIPES.

A recipe is one function registered with `register_recipe`, which names its row format and what runs it needs
(a correction round, gold solutions); `build_rows` checks the runs, calls it, checks its rows for gold and sums
up. Packages add recipes the way they add strategies: a module listed under the 'selfcorrect.recipes' entry
point, imported when a recipe is looked up.

Every conversation of a run (an item and a sample) is a source of rows. The correction round used is the
first one (round 1): its stored conversation, without its final reply, is the prompt of clt, cst and pam
rows, so they show the question, the model's first reply, the run's correction prompt(s) and whatever the
strategy asked in between, exactly as the model saw them. Gold solutions (`items.solution`) are only ever
targets; runs whose conversations carried gold (oracle strategies, in-context examples) are refused, and
every row is checked for gold in its prompt parts before it is returned.

Row formats (one JSON object per line; every row has `source`: recipe, part, run, item, sample, the round
its target or trace comes from, and the question's key from `split.question_key`):
- prompt/completion (sft, clt, cst, cct, sft+cct): {"prompt": [messages], "completion": [one assistant
  message]}; loss on the completion only.
- preference (scl): {"prompt": [the question], "chosen": [assistant], "rejected": [assistant]}.
- span-masked trace (pam): {"messages": [the whole conversation], "no_loss": [indices of assistant messages
  whose tokens carry no loss]}; every other assistant message carries loss, user messages never do.
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import UserError
from ..estimators import estimator_named
from ..files import check_output_file, write_atomically
from ..plugins import load_plugins
from ..strategies import all_strategies
from ..split import question_key

if TYPE_CHECKING:
    from ..results import Run
    from ..store import Turn

# The fields of each row format; `source` (selfcorrect's record of where a row came from) is common to all.
FORMATS = {
    "prompt/completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "span-masked": ("messages", "no_loss"),
}


@dataclass
class Sources:
    """What a recipe builds its rows from, and where it reports what it left out and skipped."""

    runs: list[Run]
    recipe: str
    clt_share: float
    seed: int
    skipped: dict = field(default_factory=lambda: {"stopped": 0, "no_reply": 0, "incomplete": 0})
    left_out: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    row_format: str  # one of FORMATS: the trainer reads it from the rows' recipe
    build: Callable[[Sources], list[dict]]
    needs_correction: bool  # rows come from a correction round (--rounds 1 or more)
    needs_gold: bool  # rows carry gold solutions as targets


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, row_format: str, *, needs_correction: bool = True,
                    needs_gold: bool = True) -> Callable:
    """Register the decorated function (Sources -> rows) as recipe `name`."""
    if row_format not in FORMATS:
        raise ValueError(f"recipe {name}: row format {row_format!r} is not one of {', '.join(FORMATS)}")

    def decorate(build: Callable[[Sources], list[dict]]) -> Callable[[Sources], list[dict]]:
        RECIPES[name] = Recipe(name, description, row_format, build, needs_correction, needs_gold)
        return build

    return decorate


def all_recipes() -> dict[str, Recipe]:
    """Every recipe, those of installed packages included."""
    load_plugins("selfcorrect.recipes", RECIPES)
    return RECIPES


def get_recipe(name: str) -> Recipe:
    recipe = all_recipes().get(name)
    if recipe is None:
        raise UserError(f"--recipe {name}: unknown recipe; choose one of {', '.join(RECIPES)}")
    return recipe


# The final message of a pam trace opens with the verdict on the first reply, then the answer that stands.
PAM_KEPT = "I checked my answer again: it is right.\n\n"
PAM_CORRECTED = "I checked my answer again: it is wrong. Here is a corrected solution.\n\n"


def build_rows(runs: list[Run], recipe: str, clt_share: float = 0.4, seed: int = 0) -> tuple[list[dict], dict]:
    """(rows, summary) of `recipe` built from `runs` (as `load_run` returns them, all of one task).

    sft: one row per distinct question of the runs (the round-0 turn's first user message, then the gold
    solution). clt / cst: one row per conversation whose first reply is right / wrong. cct: both, with
    `clt_share` of the rows clt: the side above its share is cut down to
    round(clt_share * n_cst / (1 - clt_share)) clt rows, or round((1 - clt_share) * n_clt / clt_share) cst rows
    (halves rounded up), chosen with `seed`; rows are never repeated. sft+cct: the sft rows, then the cct rows.
    scl: one pair per conversation whose correctness flipped between round 0 and round 1. pam: one trace per
    conversation. Correction turns where the strategy stopped (kept its answer without a new reply) or whose
    conversation does not end with the graded reply are skipped and counted in the summary.
    Raises UserError for runs that cannot give honest data and when the recipe gives no row.
    """
    chosen = get_recipe(recipe)
    if not 0 <= clt_share <= 1:
        raise UserError(f"--clt-share {clt_share:g}: must be from 0 to 1 (the share of cct rows that keep a right reply)")
    if not runs:
        raise UserError("no run given: name the runs to build training data from")
    _check_runs(runs, chosen)
    sources = Sources(runs, recipe, clt_share, seed)
    rows = chosen.build(sources)
    _check_gold_free(rows, runs)
    parts: dict[str, int] = {}
    for row in rows:
        parts[row["source"]["part"]] = parts.get(row["source"]["part"], 0) + 1
    summary = {
        "recipe": recipe, "rows": len(rows), "parts": parts, "runs": len(runs),
        "items": len({row["source"]["question_sha256"] for row in rows}), "left_out": sources.left_out,
        "skipped": sources.skipped,
    }
    if not rows:
        raise UserError(f"--recipe {recipe}: gives no rows from run(s) {', '.join(run.run_id for run in runs)} "
                        f"({summary_line(summary)}); use runs with more items, or another recipe")
    return rows, summary


def summary_line(summary: dict) -> str:
    """`build_rows`' summary as one line: rows per part, what was left out and skipped."""
    parts = ", ".join(f"{count} {part}" for part, count in summary["parts"].items()) or "none"
    line = f"{summary['recipe']}: {summary['rows']} rows ({parts}) from {summary['items']} items of {summary['runs']} run(s)"
    if any(summary["left_out"].values()):
        dropped = " and ".join(f"{count} {part}" for part, count in summary["left_out"].items() if count)
        line += f"; left out {dropped} rows for the clt share"
    skipped = summary["skipped"]
    if skipped["stopped"] or skipped["no_reply"]:
        line += (f"; skipped {skipped['stopped'] + skipped['no_reply']} correction turns ({skipped['stopped']} where "
                 f"the strategy stopped, {skipped['no_reply']} not ending with the graded reply)")
    if skipped["incomplete"]:
        line += f"; {skipped['incomplete']} items or conversations lack turns the recipe needs (a run not complete)"
    return line


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Write `rows` as JSONL to `path` atomically (a temporary file beside it, then renamed over it): an error
    leaves no file, or the file that was there."""
    path = Path(path)
    check_output_file(path, "--output")
    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _check_runs(runs: list[Run], recipe: Recipe) -> None:
    """Refuse runs that cannot give honest rows of `recipe`, with one line naming the run."""
    seen: set[str] = set()
    for run in runs:
        name, config = f"run {run.run_id}", run.config
        if run.run_id in seen:
            raise UserError(f"{name}: given twice; give each run once")
        seen.add(run.run_id)
        if config.get("upper_bound"):
            raise UserError(f"{name}: strategy '{config['strategy']}' is an upper bound that reads the gold answer, "
                            "so its conversations carry gold; build from runs of other strategies")
        if "icl" in config:
            raise UserError(f"{name}: its correction prompts hold in-context examples with gold answers (--icl-confident/"
                            "--icl-critical); build from runs without them")
        if not estimator_named(config["estimator"]).stores_replies:
            raise UserError(f"{name}: made with the exact estimator, which stores option probabilities, not replies; "
                            "build from a run with --estimator sampling")
        strategy = all_strategies().get(config["strategy"])
        if strategy is None:
            raise UserError(f"{name}: made with strategy '{config['strategy']}', which is not installed here; install "
                            "the package that provides it")
        if strategy.baseline:
            raise UserError(f"{name}: strategy '{strategy.name}' is a compute-matched baseline that picks among fresh "
                            "samples rather than correcting; build from runs of a correction strategy")
        if config.get("split", {}).get("part") == "test":
            raise UserError(f"{name}: made on the held-out part (--split test), which must stay unseen by training; "
                            "build from --split train runs")
        if recipe.needs_correction and config["rounds"] == 0:
            raise UserError(f"{name}: has no correction round (--rounds 0), which recipe {recipe.name} needs; build "
                            "from a run with --rounds 1 or more")
        if recipe.needs_gold:
            lacking = [item["item_id"] for item in run.items if not item.get("solution")]
            if lacking:
                raise UserError(
                    f"{name}: {len(lacking)} of its {len(run.items)} items have no gold solution (first: {lacking[0]}), "
                    f"which recipe {recipe.name} needs: a run stored before gold solutions were kept gets them when the same "
                    "command runs it again (nothing is generated again); custom data needs a solution column"
                )
    tasks = sorted({run.config["task"]["task"] for run in runs})
    if len(tasks) > 1:
        raise UserError(f"runs {', '.join(run.run_id for run in runs)}: of different tasks ({', '.join(tasks)}); "
                        "build from runs of one task")


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _copy(messages: list[dict]) -> list[dict]:
    return [_message(message["role"], message["content"]) for message in messages]


def _source(recipe: str, part: str, run: Run, item: dict, sample: int, round_: int) -> dict:
    return {"recipe": recipe, "part": part, "run": run.run_id, "item": item["item_id"], "sample": sample,
            "round": round_, "question_sha256": question_key(item["question"])}


def _conversations(run: Run) -> Iterator[tuple[dict, int, Turn | None, Turn | None]]:
    """(item, sample, its round-0 turn, its round-1 turn) for every conversation of the run, in the run's order;
    a turn not stored is None."""
    cells = {(turn.item_id, turn.sample, turn.round): turn for turn in run.turns}
    for item in run.items:
        for sample in range(run.config["samples"]):
            yield item, sample, cells.get((item["item_id"], sample, 0)), cells.get((item["item_id"], sample, 1))


def _corrected(run: Run, skipped: dict) -> Iterator[tuple[dict, int, Turn, Turn]]:
    """The conversations whose first correction can give rows: both turns stored, the strategy did not stop,
    and the round-1 conversation continues the first turn's and ends with the graded reply. The others are
    counted in `skipped`."""
    for item, sample, first, correction in _conversations(run):
        if first is None or correction is None:
            skipped["incomplete"] += 1
        elif correction.notes.get("stopped"):
            skipped["stopped"] += 1
        elif (correction.messages[: len(first.messages)] != first.messages
              or correction.messages[-1] != _message("assistant", correction.response)):
            skipped["no_reply"] += 1
        else:
            yield item, sample, first, correction


def _sft_rows(runs: list[Run], recipe: str, skipped: dict) -> list[dict]:
    """One row per distinct question (by content): its first user message, then its gold solution."""
    rows, seen = [], set()
    for run in runs:
        firsts: dict[str, Turn] = {}  # item -> its round-0 turn of the lowest sample: all ask the same
        for turn in run.turns:
            if turn.round == 0 and (turn.item_id not in firsts or turn.sample < firsts[turn.item_id].sample):
                firsts[turn.item_id] = turn
        for item in run.items:
            key, first = question_key(item["question"]), firsts.get(item["item_id"])
            if key in seen:
                continue
            if first is None:
                skipped["incomplete"] += 1
                continue
            seen.add(key)
            rows.append({"prompt": _copy(first.messages[:1]), "completion": [_message("assistant", item["solution"])],
                         "source": _source(recipe, "sft", run, item, first.sample, 0)})
    return rows


def _correction_rows(runs: list[Run], recipe: str, skipped: dict) -> tuple[list[dict], list[dict]]:
    """(clt rows, cst rows): the round-1 conversation without its final reply, then the first reply again where
    it was right, the gold solution where it was wrong."""
    clt, cst = [], []
    for run in runs:
        for item, sample, first, correction in _corrected(run, skipped):
            prompt = _copy(correction.messages[:-1])
            if first.correct:
                clt.append({"prompt": prompt, "completion": [_message("assistant", first.response)],
                            "source": _source(recipe, "clt", run, item, sample, 1)})
            elif recipe != "clt":  # a clt build needs no gold: do not touch it
                cst.append({"prompt": prompt, "completion": [_message("assistant", item["solution"])],
                            "source": _source(recipe, "cst", run, item, sample, 1)})
    return clt, cst


def _cct_counts(n_clt: int, n_cst: int, share: Fraction) -> tuple[int, int]:
    """(clt rows, cst rows) to keep so that about `share` of them are clt: the side above its share is cut down,
    the other kept whole."""
    if share == 0:
        return 0, n_cst
    if share == 1:
        return n_clt, 0
    if n_clt * (1 - share) > n_cst * share:  # too many clt rows for the share
        return min(n_clt, _round_half_up(share * n_cst / (1 - share))), n_cst
    return n_clt, min(n_cst, _round_half_up((1 - share) * n_clt / share))


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def _keep(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` of `rows` drawn by `rng`, in their original order."""
    return [rows[index] for index in sorted(rng.sample(range(len(rows)), count))]


def _scl_rows(runs: list[Run], skipped: dict) -> list[dict]:
    """A preference pair per conversation whose correctness flipped in round 1, the right reply chosen."""
    rows = []
    for run in runs:
        for item, sample, first, correction in _corrected(run, skipped):
            if first.correct == correction.correct:
                continue
            right, wrong = (first, correction) if first.correct else (correction, first)
            rows.append({"prompt": _copy(first.messages[:1]), "chosen": [_message("assistant", right.response)],
                         "rejected": [_message("assistant", wrong.response)],
                         "source": _source("scl", "scl", run, item, sample, 1)})
    return rows


def _pam_rows(runs: list[Run], skipped: dict) -> list[dict]:
    """The round-1 conversation without its final reply, then the verdict and the answer that stands; only a
    right first reply and the final message carry loss."""
    rows = []
    for run in runs:
        for item, sample, first, correction in _corrected(run, skipped):
            messages = _copy(correction.messages[:-1])
            first_reply = len(first.messages) - 1
            no_loss = [index for index, message in enumerate(messages)
                       if message["role"] == "assistant" and not (index == first_reply and first.correct)]
            final = PAM_KEPT + first.response if first.correct else PAM_CORRECTED + item["solution"]
            rows.append({"messages": [*messages, _message("assistant", final)], "no_loss": no_loss,
                         "source": _source("pam", "pam", run, item, sample, 1)})
    return rows


# ----- the built-in recipes -----


@register_recipe("sft", "the question, then the gold solution (plain supervised fine-tuning)", "prompt/completion",
                 needs_correction=False)
def sft(sources: Sources) -> list[dict]:
    return _sft_rows(sources.runs, sources.recipe, sources.skipped)


@register_recipe("clt", "the question, a right first reply and the correction prompt(s), then that reply again "
                 "(keep what is right)", "prompt/completion", needs_gold=False)
def clt(sources: Sources) -> list[dict]:
    return _correction_rows(sources.runs, sources.recipe, sources.skipped)[0]


@register_recipe("cst", "the question, a wrong first reply and the correction prompt(s), then the gold solution "
                 "(fix what is wrong)", "prompt/completion")
def cst(sources: Sources) -> list[dict]:
    return _correction_rows(sources.runs, sources.recipe, sources.skipped)[1]


@register_recipe("cct", "clt and cst rows, --clt-share of them clt, reached by leaving rows out (Yang et al.)",
                 "prompt/completion")
def cct(sources: Sources) -> list[dict]:
    clt_rows, cst_rows = _correction_rows(sources.runs, sources.recipe, sources.skipped)
    kept_clt, kept_cst = _cct_counts(len(clt_rows), len(cst_rows), Fraction(str(sources.clt_share)))
    sources.left_out.update({"clt": len(clt_rows) - kept_clt, "cst": len(cst_rows) - kept_cst})
    rng = random.Random(sources.seed)
    return _keep(clt_rows, kept_clt, rng) + _keep(cst_rows, kept_cst, rng)


@register_recipe("sft+cct", "the sft rows and the cct rows of the same items", "prompt/completion")
def sft_and_cct(sources: Sources) -> list[dict]:
    return sft(sources) + cct(sources)


@register_recipe("scl", "preference pairs from replies whose correctness flipped in the correction: the right one "
                 "chosen (He et al.)", "preference", needs_gold=False)
def scl(sources: Sources) -> list[dict]:
    return _scl_rows(sources.runs, sources.skipped)


@register_recipe("pam", "the correction conversation, then a verification (and where the first reply was wrong a "
                 "corrected solution); a wrong first reply carries no loss (Han et al.)", "span-masked")
def pam(sources: Sources) -> list[dict]:
    return _pam_rows(sources.runs, sources.skipped)


def _check_gold_free(rows: list[dict], runs: list[Run]) -> None:
    """Raise (an internal error: the refusals above should make it impossible) when an item's gold solution is
    in a user or system message of a row: gold may only be a loss-carrying target. A model's own reply may state
    the gold answer word for word ("The answer is B."), and a strategy may quote that reply or a critic's
    review, so text a model wrote in the conversation (its replies, the turn's notes) explains such a match."""
    solutions = {(run.run_id, item["item_id"]): item.get("solution") for run in runs for item in run.items}
    conversations: dict[tuple[str, str, int], list[Turn]] = {}
    for run in runs:
        for turn in run.turns:
            conversations.setdefault((run.run_id, turn.item_id, turn.sample), []).append(turn)
    for row in rows:
        source = row["source"]
        solution = (solutions[(source["run"], source["item"])] or "").strip()
        if not solution:
            continue
        shown = [message for message in row.get("prompt", row.get("messages", []))
                 if message["role"] != "assistant" and solution in message["content"]]
        if not shown:
            continue
        conversation = conversations[(source["run"], source["item"], source["sample"])]
        model_wrote = [message["content"] for turn in conversation for message in turn.messages
                       if message["role"] == "assistant"]
        model_wrote += [note for turn in conversation for note in turn.notes.values() if isinstance(note, str)]
        if not any(solution in text for text in model_wrote):
            raise RuntimeError(
                f"internal error: run {source['run']}, item {source['item']}: its gold solution is in a "
                f"{shown[0]['role']} message of a training row's prompt ({source['part']} row); gold may only be a target"
            )
