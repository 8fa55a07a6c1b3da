"""Training data from stored runs, in TRL's conversational formats, for the recipes of RECIPES.

A recipe is one function registered with `register_recipe`, which names its row format and what runs it needs
(a correction round, gold solutions); `build_rows` checks the runs, calls it, checks its rows for gold and sums
up. Packages add recipes the way they add strategies: a module listed under the 'selfcorrect.recipes' entry
point, imported when a recipe is looked up.

Every conversation of a run (an item and a sample) is a source of rows, and every correction round of it: a
round's stored conversation, without its final reply, is the prompt of clt, cst, scl and pam rows, so they
show the question, the model's reply before the round (the "previous reply"), the run's correction prompt(s)
and whatever the strategy asked in between, exactly as the model saw them. Gold solutions (`items.solution`)
are targets; the one place gold stands in a prompt is the previous reply of a clt row built with
`--clt-source gold` (the reference solution put in as the reply to keep, as Yang et al. build CCT from
supervised data), which only strategies whose correction turn is a fixed prompt can take. Runs whose
conversations carried gold (oracle strategies, in-context examples) are refused, and every row is checked for
gold in its prompt parts before it is returned.

Row formats (one JSON object per line; every row has `source`: recipe, part, run, item, sample, the round
its target or trace comes from, and the question's key from `split.question_key`):
- prompt/completion (sft, clt, cst, cct, sft+cct): {"prompt": [messages], "completion": [one assistant
  message]}; loss on the completion only.
- preference (scl): {"prompt": [the question], "chosen": [assistant], "rejected": [assistant]}.
- span-masked trace (pam): {"messages": [the whole conversation], "no_loss": [indices of assistant messages
  whose tokens carry no loss]}; every other assistant message carries loss, user messages never do.
- episode prompt (rl): {"prompt": [the question, as round 0 asked it], "correction": [the strategy's correction
  turn: the message(s) between the first reply and the second], "task": how to load the task again ({"task",
  "data", "options"}), "item": the item's id, "target": its gold answer}; no reply at all: the trainer samples
  both attempts from the model it trains (train/rl.py) and the task's grader rewards them against the target.
"""

from __future__ import annotations

import functools
import json
import math
import random
from fractions import Fraction
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import UserError
from ..estimators import estimator_named
from ..files import check_output_file, write_atomically
from ..plugins import load_plugins
from ..strategies import all_strategies, fixed_prompt_strategies
from ..split import question_key

if TYPE_CHECKING:
    from ..results import Run
    from ..store import Turn

# The fields of each row format; `source` (selfcorrect's record of where a row came from) is common to all.
FORMATS = {
    "prompt/completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "span-masked": ("messages", "no_loss"),
    "episode": ("prompt", "correction", "task", "item", "target"),
}


def _setting(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class DataSettings:
    """How the rows of the correction recipes are chosen (the flags of `selfcorrect data` and `improve`)."""

    clt_share: float = _setting(0.4, "--clt-share", "cct, sft+cct: the share of cct rows that keep a right reply")
    # repeat: every row kept; on the experiment of docs/training.md it fixed more (CS 0.110 against 0.087 with drop)
    balance: str = _setting("repeat", "--balance", "cct, sft+cct: reach --clt-share by repeating rows of the smaller "
                            "side (repeat, seeded) or by leaving rows of the larger side out (drop)")
    clt_source: str = _setting("own", "--clt-source", "clt rows from the model's own right replies (own) or with the "
                               "gold solution put in as the previous reply (gold: reask, confident, critical runs)")

    def check(self) -> None:
        if not 0 <= self.clt_share <= 1:
            raise UserError(f"--clt-share {self.clt_share:g}: must be from 0 to 1 (the share of cct rows that keep a "
                            "right reply)")
        if self.balance not in BALANCES:
            raise UserError(f"--balance {self.balance}: choose one of {', '.join(BALANCES)}")
        if self.clt_source not in CLT_SOURCES:
            raise UserError(f"--clt-source {self.clt_source}: choose one of {', '.join(CLT_SOURCES)}")


BALANCES = ("drop", "repeat")
CLT_SOURCES = ("own", "gold")


@dataclass
class Sources:
    """What a recipe builds its rows from, and where it reports what it kept, repeated, left out and skipped."""

    runs: list[Run]
    recipe: str
    settings: DataSettings
    seed: int
    skipped: dict = field(default_factory=lambda: {"stopped": 0, "no_reply": 0, "incomplete": 0})
    # Per side of cct (clt, cst): rows kept once, rows added as repeats, rows left out for the share.
    kept: dict = field(default_factory=dict)
    repeated: dict = field(default_factory=dict)
    left_out: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    row_format: str  # one of FORMATS: the trainer reads it from the rows' recipe
    build: Callable[[Sources], list[dict]]
    needs_correction: bool  # rows come from a correction round (--rounds 1 or more)
    needs_gold: bool  # rows carry gold solutions as targets
    has_clt: bool  # rows include clt rows, which --clt-source chooses
    fixed_prompt: bool = False  # rows need a correction turn that does not depend on the reply it answers


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, row_format: str, *, needs_correction: bool = True,
                    needs_gold: bool = True, has_clt: bool = False, fixed_prompt: bool = False) -> Callable:
    """Register the decorated function (Sources -> rows) as recipe `name`."""
    if row_format not in FORMATS:
        raise ValueError(f"recipe {name}: row format {row_format!r} is not one of {', '.join(FORMATS)}")

    def decorate(build: Callable[[Sources], list[dict]]) -> Callable[[Sources], list[dict]]:
        RECIPES[name] = Recipe(name, description, row_format, build, needs_correction, needs_gold, has_clt,
                               fixed_prompt)
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


def build_rows(runs: list[Run], recipe: str, settings: DataSettings | None = None, seed: int = 0,
               **options) -> tuple[list[dict], dict]:
    """(rows, summary) of `recipe` built from `runs` (as `load_run` returns them, all of one task), chosen as
    `settings` says (a DataSettings, or its fields as keywords: `clt_share=0.5, balance="repeat"`).

    sft: one row per distinct question of the runs (the round-0 turn's first user message, then the gold
    solution). clt / cst: one row per correction round whose previous reply is right / wrong (with
    `settings.clt_source` "gold", a clt row for every correction round, the gold solution in place of the previous
    reply). cct: both, with `settings.clt_share` of the rows clt, reached (`settings.balance`) by cutting the side
    above its share down ("drop": to round(share * n_cst / (1 - share)) clt rows, or round((1 - share) * n_clt /
    share) cst rows, halves rounded up) or by repeating rows of the side below it up to those counts ("repeat":
    whole copies, then a seeded draw of the rest), chosen with `seed`. sft+cct: the sft rows, then the cct rows.
    scl: one pair per correction round whose correctness flipped. pam: one trace per correction round.
    Correction turns where the strategy stopped (kept its answer without a new reply) or whose conversation does
    not end with the graded reply are skipped and counted in the summary.
    Raises UserError for runs that cannot give honest data and when the recipe gives no row.
    """
    chosen = get_recipe(recipe)
    try:
        settings = replace(settings or DataSettings(), **options)
    except TypeError as error:
        raise UserError(f"data: {error}") from None
    settings.check()
    if not runs:
        raise UserError("no run given: name the runs to build training data from")
    gold_clt = settings.clt_source == "gold"
    if gold_clt and not chosen.has_clt:
        raise UserError(f"--clt-source gold: recipe {recipe} has no clt rows; it applies to "
                        f"{', '.join(name for name, other in RECIPES.items() if other.has_clt)}")
    _check_runs(runs, chosen, gold_clt)
    sources = Sources(runs, recipe, settings, seed)
    rows = chosen.build(sources)
    _check_gold_free(rows, runs)
    parts: dict[str, int] = {}
    for row in rows:
        parts[row["source"]["part"]] = parts.get(row["source"]["part"], 0) + 1
    summary = {
        "recipe": recipe, "rows": len(rows), "parts": parts, "runs": len(runs),
        "items": len({row["source"]["question_sha256"] for row in rows}), "clt_share": settings.clt_share,
        "kept": sources.kept, "repeated": sources.repeated, "left_out": sources.left_out, "skipped": sources.skipped,
    }
    if not rows:
        raise UserError(f"--recipe {recipe}: gives no rows from run(s) {', '.join(run.run_id for run in runs)} "
                        f"({summary_line(summary)}); use runs with more items, or another recipe")
    return rows, summary


def summary_line(summary: dict) -> str:
    """`build_rows`' summary as one line: rows per part, what was left out and skipped."""
    parts = ", ".join(f"{count} {part}" for part, count in summary["parts"].items()) or "none"
    line = f"{summary['recipe']}: {summary['rows']} rows ({parts}) from {summary['items']} items of {summary['runs']} run(s)"
    if summary["kept"]:
        sides = []
        for side, kept in summary["kept"].items():
            repeated, left_out = summary["repeated"].get(side, 0), summary["left_out"].get(side, 0)
            sides.append(f"{side} {kept} kept" + (f" and {repeated} repeats" if repeated else "")
                         + (f", {left_out} left out" if left_out else ""))
        line += f"; for a clt share of {summary['clt_share']:g}: {'; '.join(sides)}"
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


def check_gold_clt(strategy, where: str) -> None:
    """Refuse --clt-source gold for runs of `strategy` unless its correction turn is a fixed prompt."""
    if not strategy.fixed_prompt:
        raise UserError(f"{where}: strategy '{strategy.name}' asks for replies in its correction round, so a gold "
                        "solution cannot stand in for the reply it answered; --clt-source gold takes runs of "
                        f"strategies whose correction turn is a fixed prompt ({fixed_prompt_strategies()})")


def _check_runs(runs: list[Run], recipe: Recipe, gold_clt: bool) -> None:
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
        if gold_clt:
            check_gold_clt(strategy, name)
        if recipe.fixed_prompt and not strategy.fixed_prompt:
            raise UserError(f"{name}: strategy '{strategy.name}' asks for replies in its correction round, which an "
                            f"episode of recipe {recipe.name} cannot replay; build from runs of strategies whose "
                            f"correction turn is a fixed prompt ({fixed_prompt_strategies()})")
        if recipe.row_format == "episode" and run.task_spec is None:
            raise UserError(f"{name}: stored before runs kept how their task was loaded, which recipe {recipe.name}'s "
                            "rewards need; measure the training items again into a new store (--db)")
        if recipe.needs_gold or gold_clt:
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
    """Where a row came from (its `source` field); `round` is the round its target or trace comes from."""
    return {"recipe": recipe, "part": part, "run": run.run_id, "item": item["item_id"], "sample": sample,
            "round": round_, "question_sha256": question_key(item["question"])}


def _corrected(run: Run, skipped: dict) -> Iterator[tuple[dict, int, Turn, Turn]]:
    """(item, sample, the turn before, the correction turn) for every correction round of every conversation of
    the run that can give rows, in the run's order: both turns stored, the strategy did not stop, the turn before
    ends with the reply that stands (its previous reply), and the round's conversation continues it and ends with
    the graded reply. The others are counted in `skipped`."""
    cells = {(turn.item_id, turn.sample, turn.round): turn for turn in run.turns}
    for item in run.items:
        for sample in range(run.config["samples"]):
            for round_ in range(1, run.config["rounds"] + 1):
                before = cells.get((item["item_id"], sample, round_ - 1))
                correction = cells.get((item["item_id"], sample, round_))
                if before is None or correction is None:
                    skipped["incomplete"] += 1
                elif correction.notes.get("stopped"):
                    skipped["stopped"] += 1
                elif (before.messages[-1] != _message("assistant", before.response)
                      or correction.messages[: len(before.messages)] != before.messages
                      or correction.messages[-1] != _message("assistant", correction.response)):
                    skipped["no_reply"] += 1
                else:
                    yield item, sample, before, correction


def _episode_rows(sources: Sources) -> list[dict]:
    """One episode prompt per distinct question (by content): the conversation of its first correction round
    (sample 0) up to the first reply, and the correction turn after it, which a fixed-prompt strategy asks
    whatever the reply was."""
    rows, seen = [], set()
    for run in sources.runs:
        for item, sample, before, correction in _corrected(run, sources.skipped):
            key = question_key(item["question"])
            if sample != 0 or correction.round != 1 or key in seen:
                continue
            seen.add(key)
            first_reply = len(before.messages) - 1
            rows.append({"prompt": _copy(before.messages[:first_reply]),
                         "correction": _copy(correction.messages[first_reply + 1:-1]),
                         "task": run.task_spec, "item": item["item_id"], "target": item["target"],
                         "source": _source(sources.recipe, "rl", run, item, sample, 1)})
    return rows


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


def _correction_rows(sources: Sources, with_cst: bool = True) -> tuple[list[dict], list[dict]]:
    """(clt rows, cst rows) of every correction round: its conversation without its final reply, then the
    previous reply again where it was right, the gold solution where it was wrong. With --clt-source gold, a clt
    row for every round instead: the gold solution in place of the previous reply, then the gold solution again."""
    clt, cst = [], []
    gold_clt = sources.settings.clt_source == "gold"
    for run in sources.runs:
        for item, sample, before, correction in _corrected(run, sources.skipped):
            prompt = _copy(correction.messages[:-1])
            source = functools.partial(_source, sources.recipe, run=run, item=item, sample=sample,
                                       round_=correction.round)
            if gold_clt:
                at = len(before.messages) - 1  # the previous reply's place in the conversation
                gold = _message("assistant", item["solution"])
                clt.append({"prompt": [*prompt[:at], gold, *prompt[at + 1:]], "completion": [gold],
                            "source": {**source(part="clt"), "previous_reply": "gold"}})
            elif before.correct:
                clt.append({"prompt": prompt, "completion": [_message("assistant", before.response)],
                            "source": source(part="clt")})
            if with_cst and not before.correct:  # a clt build needs no gold: it does not touch it
                cst.append({"prompt": prompt, "completion": [_message("assistant", item["solution"])],
                            "source": source(part="cst")})
    return clt, cst


def _cct_counts(n_clt: int, n_cst: int, share: Fraction) -> tuple[int, int]:
    """(clt rows, cst rows) so that about `share` of them are clt, by cutting the side above its share down;
    the other kept whole."""
    if share == 0:
        return 0, n_cst
    if share == 1:
        return n_clt, 0
    if n_clt * (1 - share) > n_cst * share:  # too many clt rows for the share
        return min(n_clt, _round_half_up(share * n_cst / (1 - share))), n_cst
    return n_clt, min(n_cst, _round_half_up((1 - share) * n_clt / share))


def _cct_growth(n_clt: int, n_cst: int, share: Fraction) -> tuple[int, int]:
    """(clt rows, cst rows) so that about `share` of them are clt, by repeating rows of the side below its share;
    the other kept whole. A side with no row cannot grow: then the other is cut as `_cct_counts` cuts it."""
    if share in (0, 1) or n_clt == 0 or n_cst == 0:
        return _cct_counts(n_clt, n_cst, share)
    if n_clt * (1 - share) > n_cst * share:  # too few cst rows for the share
        return n_clt, max(n_cst, _round_half_up((1 - share) * n_clt / share))
    return max(n_clt, _round_half_up(share * n_cst / (1 - share))), n_cst


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def _keep(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` rows of `rows`, in their original order: a draw by `rng` of fewer than all, else every row as
    many whole times as fit, then a draw for the rest."""
    copies, rest = divmod(count, len(rows)) if rows else (0, 0)
    return rows * copies + [rows[index] for index in sorted(rng.sample(range(len(rows)), rest))]


def _balanced(sources: Sources, clt_rows: list[dict], cst_rows: list[dict]) -> list[dict]:
    """cct: the clt and cst rows brought to the clt share (`settings.balance`), the counts in `sources`."""
    settings = sources.settings
    counts = _cct_growth if settings.balance == "repeat" else _cct_counts
    wanted = dict(zip(("clt", "cst"), counts(len(clt_rows), len(cst_rows), Fraction(str(settings.clt_share)))))
    rng = random.Random(sources.seed)
    chosen = []
    for side, rows in (("clt", clt_rows), ("cst", cst_rows)):
        sources.kept[side] = min(wanted[side], len(rows))
        sources.repeated[side] = max(0, wanted[side] - len(rows))
        sources.left_out[side] = max(0, len(rows) - wanted[side])
        chosen += _keep(rows, wanted[side], rng)
    return chosen


def _scl_rows(sources: Sources) -> list[dict]:
    """A preference pair per correction round whose correctness flipped, the right reply chosen."""
    rows = []
    for run in sources.runs:
        for item, sample, before, correction in _corrected(run, sources.skipped):
            if before.correct == correction.correct:
                continue
            right, wrong = (before, correction) if before.correct else (correction, before)
            rows.append({"prompt": _copy(before.messages[:1]), "chosen": [_message("assistant", right.response)],
                         "rejected": [_message("assistant", wrong.response)],
                         "source": _source("scl", "scl", run, item, sample, correction.round)})
    return rows


def _pam_rows(sources: Sources) -> list[dict]:
    """A correction round's conversation without its final reply, then the verdict and the answer that stands;
    only a right previous reply and the final message carry loss."""
    rows = []
    for run in sources.runs:
        for item, sample, before, correction in _corrected(run, sources.skipped):
            messages = _copy(correction.messages[:-1])
            previous_reply = len(before.messages) - 1
            no_loss = [index for index, message in enumerate(messages)
                       if message["role"] == "assistant" and not (index == previous_reply and before.correct)]
            final = PAM_KEPT + before.response if before.correct else PAM_CORRECTED + item["solution"]
            rows.append({"messages": [*messages, _message("assistant", final)], "no_loss": no_loss,
                         "source": _source("pam", "pam", run, item, sample, correction.round)})
    return rows


# ----- the built-in recipes -----


@register_recipe("sft", "the question, then the gold solution (plain supervised fine-tuning)", "prompt/completion",
                 needs_correction=False)
def sft(sources: Sources) -> list[dict]:
    return _sft_rows(sources.runs, sources.recipe, sources.skipped)


@register_recipe("clt", "the question, a right previous reply and the correction prompt(s), then that reply again "
                 "(keep what is right)", "prompt/completion", needs_gold=False, has_clt=True)
def clt(sources: Sources) -> list[dict]:
    return _correction_rows(sources, with_cst=False)[0]


@register_recipe("cst", "the question, a wrong previous reply and the correction prompt(s), then the gold solution "
                 "(fix what is wrong)", "prompt/completion")
def cst(sources: Sources) -> list[dict]:
    return _correction_rows(sources)[1]


@register_recipe("cct", "clt and cst rows, --clt-share of them clt (Yang et al.), reached by leaving rows out or "
                 "by repeating them (--balance)", "prompt/completion", has_clt=True)
def cct(sources: Sources) -> list[dict]:
    return _balanced(sources, *_correction_rows(sources))


@register_recipe("sft+cct", "the sft rows and the cct rows of the same items", "prompt/completion", has_clt=True)
def sft_and_cct(sources: Sources) -> list[dict]:
    return sft(sources) + cct(sources)


@register_recipe("scl", "preference pairs from replies whose correctness flipped in a correction: the right one "
                 "chosen (He et al.)", "preference", needs_gold=False)
def scl(sources: Sources) -> list[dict]:
    return _scl_rows(sources)


@register_recipe("pam", "the correction conversation, then a verification (and where the previous reply was wrong a "
                 "corrected solution); a wrong previous reply carries no loss (Han et al.)", "span-masked")
def pam(sources: Sources) -> list[dict]:
    return _pam_rows(sources)


@register_recipe("rl", "episode prompts for on-policy correction RL (SCoRe, Kumar et al.): the question and the "
                 "strategy's correction turn; the model writes both attempts as it trains, rewarded by the task's "
                 "grader", "episode", needs_gold=False, fixed_prompt=True)
def rl(sources: Sources) -> list[dict]:
    return _episode_rows(sources)


def _check_gold_free(rows: list[dict], runs: list[Run]) -> None:
    """Raise (an internal error: the refusals above should make it impossible) when an item's gold solution is
    in a message of a row's prompt (everything before the reply it trains): gold may only be a loss-carrying
    target, or the previous reply a clt row of --clt-source gold puts in on purpose (its `source` says so; that
    message is the solution exactly). A model's own reply may state the gold answer word for word ("The answer is
    B."), and a strategy may quote that reply or a critic's review, so text a model wrote in the conversation (its
    replies, the turn's notes) explains such a match."""
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
        put_in = source.get("previous_reply") == "gold"
        prompt = (row["prompt"] if "prompt" in row else row["messages"][:-1]) + row.get("correction", [])
        shown = [message for message in prompt if solution in message["content"]
                 and not (put_in and message["role"] == "assistant" and message["content"].strip() == solution)]
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
