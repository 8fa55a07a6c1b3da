"""Terminal tables for a run's report (the dict `Run.report()` returns) and for `compare`, and the lines of a
report that are not figures (`run_notices`, `grader_note`), which the HTML report shows too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from .errors import UserError
from .estimators import Estimator, estimator_named
from .models.spec import ModelSpec
from .protocols import YANG2025_TASKS
from .store import follow_up
from .tasks import all_tasks


METRIC_LABELS = (
    ("cl", "CL  confidence: right answers kept"),
    ("cs", "CS  critique: wrong answers fixed"),
    ("rss", "RSS relative self-correction (0.5 = no change)"),
    ("delta", "change in accuracy"),
    ("acc_inf", "Acc_inf  limit of repeated correction"),
)




# A free-text column (a description, a model spec) may be narrowed to this many characters, folding longer words.
TEXT_FLOOR = 16


def _widths(floors: list[int], wants: list[int], room: int) -> list[int]:
    """Column widths between each column's floor and its natural width that fill `room` where they can: every
    column starts at its floor and the narrowest are widened first, up to one level (water-filling)."""
    if sum(wants) <= room:
        return wants
    if sum(floors) >= room:
        return floors
    level = max(level for level in range(max(wants) + 1)
                if sum(max(f, min(w, level)) for f, w in zip(floors, wants)) <= room)
    widths = [max(f, min(w, level)) for f, w in zip(floors, wants)]
    spare = room - sum(widths)
    for index, (width, want) in enumerate(zip(widths, wants)):
        if spare and width < want:
            widths[index] += 1
            spare -= 1
    return widths


def print_table(console: Console, table: Table, text: tuple[str, ...] = ()) -> None:
    """Print `table` without cutting an id or a figure, however narrow the console (COLUMNS=40, a pipe).

    Every column keeps its words whole (a run id, a figure, a header word) and wraps only at spaces (an interval
    "[0.1, 0.2]" may take two lines); the free-text columns named in `text` may also fold a long word. Columns are
    narrowed towards those floors only as far as the console needs; when even the floors do not fit, the table
    is printed wider than the console (a terminal wraps the long lines) rather than cut."""
    wide = console.options.update_width(10**6)
    _, right, _, left = table.padding
    floors, wants = [], []
    for column in table.columns:
        sizes = [Measurement.get(console, wide, cell) for cell in (column.header, *column.cells)]
        longest_word, longest_line = max(m.minimum for m in sizes), max(m.maximum for m in sizes)
        header_word = sizes[0].minimum
        free = column.header in text
        floors.append(max(header_word, min(longest_word, TEXT_FLOOR)) if free else longest_word)
        wants.append(longest_line)
    extra = (left + right) * len(table.columns) + (
        (2 if table.show_edge else 0) + len(table.columns) - 1 if table.box else 0)
    widths = _widths(floors, wants, console.width - extra)
    for column, width in zip(table.columns, widths):
        column.width, column.no_wrap, column.overflow = width, False, "fold"
    if sum(widths) + extra <= console.width:
        console.print(table)
    else:  # rendered at its own width, not cropped to the console's
        console.print(Segments(console.render(table, console.options.update_width(sum(widths) + extra))),
                      crop=False, end="")


def _num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """A figure; `signed` for a difference, which always shows its sign (+0.133) so it never reads as a level."""
    return "n/a" if value is None else f"{value:{'+' if signed else ''}.{digits}f}"


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    return "" if ci is None else f"[{_num(ci[0], signed=signed)}, {_num(ci[1], signed=signed)}]"


def grader_note(config: dict) -> str:
    """Which grader gave a run's verdicts: the custom task's (given, or inferred from the data), else the task's
    own from the registry; the exact estimator grades no reply."""
    if no_grades := estimator_named(config["estimator"]).no_grades:
        return no_grades
    identity = config["task"]
    entry = all_tasks().get(identity["task"])
    name = identity.get("grader") or (entry.grader if entry is not None and not entry.grader.startswith("-") else None)
    if name is None:
        return f"unknown (task '{identity['task']}' is not registered here and the run did not record its grader)"
    return f"{name} (inferred; pass --grader to choose)" if identity.get("grader_inferred") else name


def _step_reasons(values: dict, acc1: float | None, before: str) -> dict[str, str]:
    """Why the metrics of one step that are n/a are undefined (name -> reason); `before` names the answers the
    step starts from ("first answers", "answers after correction 1")."""
    reasons = {}
    if values.get("cl") is None:
        reasons["cl"] = f"none of the {before} was right, so there was no right answer to keep"
    if values.get("cs") is None:
        reasons["cs"] = f"all of the {before} were right, so there was no wrong answer to fix"
    if values.get("rss") is None and acc1 is not None:
        reasons["rss"] = f"the accuracy of the {before} is {acc1:g}; RSS is defined only strictly between 0 and 1"
    if "acc_inf" in values and values["acc_inf"] is None:
        reasons["acc_inf"] = ("it needs both CL and CS" if values.get("cl") is None or values.get("cs") is None
                              else "CL is 1 and CS is 0: correction changes no answer, so accuracy stays wherever it starts")
    return reasons


def _print_footnotes(console: Console, notes: dict[tuple[str, str], list[str]]) -> None:
    """One line per reason a cell says n/a: (label, reason) -> the rows it applies to."""
    for (label, reason), rows in notes.items():
        where = f" ({', '.join(rows)})" if rows and rows[0] else ""
        console.print(f"n/a  {label}{where}: {reason}", highlight=False, soft_wrap=True, markup=False)


def _note(notes: dict, label: str, reason: str, row: str = "") -> None:
    rows = notes.setdefault((label, reason), [])
    if row not in rows:
        rows.append(row)


SHORT_LABELS = {"cl": "CL", "cs": "CS", "rss": "RSS", "acc_inf": "Acc_inf"}


def training_card_line(model: str) -> str | None:
    """Which training made a `lora:` model, in one line: its card's path and what the card says of the training
    (None for other models). A card moved or deleted since the run is said so, not an error: the run stands."""
    try:  # read as this version reads specs: one stored by another version may not parse, and the run stands
        spec = ModelSpec.of(model)
    except UserError:
        return None
    if spec.kind != "lora":
        return None
    try:
        trained = spec.trained
    except UserError as error:
        return f"training card: not readable now ({error})"
    card = trained.card
    data = card.get("data") or {}
    said = [f"base {trained.base}"]
    if "recipe" in data:
        said.append(f"recipe {data['recipe']}, {data.get('rows', '?')} rows")
    if "seconds" in card:
        said.append(f"{card['seconds']:.0f} s of training")
    return f"training card: {trained.card_path} ({', '.join(said)})"


def http_line(http: dict | None) -> str | None:
    """What the run's HTTP requests met, in one line (None: it sent none): retries, 429s and 503s, and the
    concurrency reached against the one asked for."""
    if not http:
        return None
    limit = (f"; the adaptive limit went down to {http['lowest_limit']}" if http["lowest_limit"] < http["concurrency"]
             else "")
    return (f"HTTP: {http['requests']} requests, {http['retried']} of them retries ({http['rate_limited']} answered 429, "
            f"{http['unavailable']} answered 503); up to {http['peak_in_flight']} in flight at once of "
            f"--concurrency {http['concurrency']}{limit}")


def isolation_line(counts: dict[str, int], notes: list[str]) -> str | None:
    """What stood between the run's model-written code and the machine, in one line (None: it ran none).
    `notes`: why programs ran without bubblewrap."""
    if not counts:
        return None
    if list(counts) == ["process only"]:
        why = f"{'; '.join(notes)}; " if notes else ""
        return f"isolation: process only (no kernel boundary around the model's code: {why}--isolation strict refuses this)"
    if len(counts) == 1:
        return f"isolation: {next(iter(counts))}"
    return "isolation: mixed (" + ", ".join(f"{count} grades {name}" for name, count in sorted(counts.items())) + ")"


@dataclass(frozen=True)
class Notice:
    """A line of a run's report that is not a figure. `warning`: the reader must weigh it before trusting the
    figures (the terminal prints it yellow, the HTML marks it)."""

    text: str
    warning: bool


def run_notices(report: dict) -> list[Notice]:
    """What a run's report says besides its figures, as data for the terminal and the HTML alike: the training
    card of a trained model, prompts of unknown version, replies cut short, a server that changed what it ran,
    the isolation of model-written code, grader versions, grades that timed out, an incomplete run."""
    notices = []
    card = training_card_line(report["config"]["model"])
    if card is not None:
        notices.append(Notice(card, warning=False))
    if report["prompt_version"] is None:
        notices.append(Notice("prompts: unknown version (stored before prompt versions were kept; running the same "
                              "command now makes a new run with today's prompts)", warning=True))
    reasons = report["replies"]["finish_reasons"]
    cut = {name: reasons.get(name, 0) for name in ("length", "context")}
    if cut["length"] or cut["context"]:
        notices.append(Notice(f"replies cut short: {cut['length']} of {sum(reasons.values())} at --max-tokens, "
                              f"{cut['context']} at the model's context window (their answers may be missing)",
                              warning=True))
    served = report["replies"]["served_by"]
    if len(served) > 1:
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in sorted(s.items())) for s in served)
        notices.append(Notice(f"the server reported {len(served)} different setups during this run: {shown}",
                              warning=True))
    grading = report["grading"]
    regrade = follow_up(f"regrade {report['run_id']}", Path(report["db"]))
    isolation = isolation_line(grading["isolation"], grading["isolation_notes"])
    if isolation is not None:
        notices.append(Notice(isolation, warning=isolation != "isolation: bubblewrap"))
    today = grading["current_version"]
    if list(grading["versions"]) == [today]:
        notices.append(Notice(f"grader version: {today} (today's)", warning=False))
    elif grading["versions"]:  # none: no graded turn (yet, or the exact estimator)
        notes = [", ".join(f"{version} ({count} turns)" for version, count in grading["versions"].items())]
        if grading["outdated"]:
            notes.append(f"{grading['outdated']} verdict(s) from graders older than today's ({today}): "
                         f"{regrade} grades them again")
        if grading["unversioned"]:
            notes.append(f"{grading['unversioned']} verdict(s) from before grader versions were kept")
        notices.append(Notice(f"grader versions: {'; '.join(notes)}", warning=True))
    if count := grading["timeouts"]:
        notices.append(Notice(f"{count} grade{'s' if count != 1 else ''} timed out, counted as wrong (--grader-timeout "
                              f"sets the limit; {regrade} tries them again)", warning=True))
    if failed := report["failed_cells"]:
        first = failed["first"]
        notices.append(Notice(f"{failed['count']} cell(s) failed, not graded (running the same command again retries "
                              f"them); the first, item {first['item_id']} sample {first['sample']} round "
                              f"{first['round']}: {first['error']}", warning=True))
    if not report["complete"]:
        notices.append(Notice("incomplete: run the same command again to fill the missing turns", warning=True))
    return notices


def print_report(report: dict, console: Console) -> None:
    config = report["config"]
    task = config["task"]["task"]
    console.print(
        f"[bold]run {report['run_id']}[/bold]  {task} · {config['model']} · {config['strategy']} · "
        f"{config['rounds']} round(s) · {config['samples']} sample(s) · T={config['temperature']} · seed {config['seed']}",
        soft_wrap=True,
    )
    console.print(f"items: {report['n_items']} complete of {report['n_items_total']}   store: {report['db']}",
                  soft_wrap=True)
    console.print(f"estimator: {estimator_named(report['estimator']).note}", soft_wrap=True)
    console.print(f"grader: {grader_note(config)}", highlight=False, soft_wrap=True, markup=False)
    for notice in run_notices(report):
        console.print(notice.text, style="yellow" if notice.warning else "", highlight=False, soft_wrap=True,
                      markup=False)
    if report["upper_bound"]:
        console.print("[bold red]UPPER BOUND: this strategy reads the gold answer; it is not a method[/bold red]")
    if not report["acc"]:
        return

    rounds = Table(title="Accuracy by round (95% bootstrap interval over items)")
    rounds.add_column("round")
    rounds.add_column("accuracy", justify="right")
    rounds.add_column("95% CI", justify="right")
    for t, (acc, ci) in enumerate(zip(report["acc"], report["acc_ci"])):
        rounds.add_row("first answer" if t == 0 else f"correction {t}", _num(acc), _interval(ci))
    print_table(console, rounds)

    if report["instruction_following"]:
        following = Table(title="Instructions followed (IFEval), by round: prompt and instruction level")
        for column in ("round", "replies", "prompt strict", "prompt loose", "instruction strict", "instruction loose"):
            following.add_column(column, justify="right" if column != "round" else "left")
        for figures in report["instruction_following"]:
            following.add_row(
                "first answer" if figures["round"] == 0 else f"correction {figures['round']}", str(figures["replies"]),
                *(_num(figures[name]) for name in ("prompt_strict", "prompt_loose", "instruction_strict",
                                                   "instruction_loose")),
            )
        print_table(console, following)

    if report["pairs"]:
        headline = Table(title=f"Last correction (round {report['pairs'][-1]['from']} -> {report['pairs'][-1]['to']})")
        headline.add_column("metric")
        headline.add_column("value", justify="right")
        headline.add_column("95% CI", justify="right")
        for name, label in METRIC_LABELS:
            signed = name == "delta"
            headline.add_row(label, _num(report[name], signed=signed), _interval(report["ci"].get(name), signed))
        print_table(console, headline)
        last = report["pairs"][-1]
        before = "first answers" if last["from"] == 0 else f"answers after correction {last['from']}"
        notes: dict = {}
        for name, reason in _step_reasons(report, last.get("acc1"), before).items():
            _note(notes, SHORT_LABELS[name], reason)
        _print_footnotes(console, notes)

        steps = Table(title="Every round pair: shares of samples by transition")
        for column in ("step", "CL", "CS", "RSS", "c->c", "c->w", "w->c", "w->w", "McNemar p"):
            steps.add_column(column, justify="right")
        for pair in report["pairs"]:
            shares = pair["transitions"]
            steps.add_row(
                f"{pair['from']}->{pair['to']}", _num(pair["cl"]), _num(pair["cs"]), _num(pair["rss"]),
                *(_num(shares[k]) for k in ("c->c", "c->w", "w->c", "w->w")), _num(pair["mcnemar_p"], 4),
            )
        print_table(console, steps)
        notes = {}
        for pair in report["pairs"]:
            step = f"{pair['from']}->{pair['to']}"
            reasons = _step_reasons({k: pair[k] for k in ("cl", "cs", "rss")}, pair.get("acc1"), "answers before the step")
            for name, reason in reasons.items() if len(report["pairs"]) > 1 else ():  # one step: said above
                _note(notes, SHORT_LABELS[name], reason, step)
            if pair["mcnemar_p"] is None:
                _note(notes, "McNemar p", estimator_named(report["estimator"]).no_mcnemar
                      or "no right/wrong outcomes to pair", step)
        _print_footnotes(console, notes)
    tokens = report["tokens"]
    console.print(
        f"cost: {tokens['prompt']} prompt + {tokens['completion']} completion tokens "
        f"({tokens['per_item']:.0f} per item), {tokens['seconds_per_item']:.2f} s of turn latency per item "
        "(summed over its turns; conversations run concurrently, so this exceeds wall time)",
        soft_wrap=True,
    )
    if http_line(report.get("http")):
        console.print(http_line(report["http"]), soft_wrap=True, highlight=False)
    if report["verifier"]:
        verifier = report["verifier"]
        precision, recall = _num(verifier["precision_wrong"]), _num(verifier["recall_wrong"])
        if verifier["precision_wrong"] is None:
            precision += " (it judged no answer wrong)"
        if verifier["recall_wrong"] is None:
            recall += " (no answer it judged was wrong)"
        console.print(
            f"the model's own verdicts on its answers ({verifier['verdicts']}): accuracy {_num(verifier['accuracy'])}, "
            f"precision of 'wrong' {precision}, recall of 'wrong' {recall}",
            soft_wrap=True,
        )


def _run_labels(rows: list[dict]) -> dict[str, str]:
    """A short name per run: its strategy, or its model where the runs share a strategy but not a model (a base
    and its trained adapters) and the models' short names differ (two adapters in folders of one name do not),
    else strategy and run id; '*' marks an upper bound."""
    strategies = [row["strategy"] for row in rows]
    named = [(row["strategy"], _model_label(row["model"])) for row in rows]

    def label(row: dict) -> str:
        if strategies.count(row["strategy"]) == 1:
            return row["strategy"]
        if named.count((row["strategy"], _model_label(row["model"]))) == 1:
            return f"{row['strategy']} {_model_label(row['model'])}"
        return f"{row['strategy']} {row['run_id'][:6]}"

    return {row["run_id"]: label(row) + ("*" if row["upper_bound"] else "") for row in rows}


def _model_label(model: str) -> str:
    """A stored model spec's short name; the spec itself where this version cannot parse it."""
    try:
        return ModelSpec.of(model).label
    except UserError:
        return model


def no_mcnemar_reason(*estimators: Estimator) -> str:
    """Why a pair of compared runs has no McNemar p (compare.py gives None)."""
    return next((estimator.no_mcnemar for estimator in estimators if estimator.no_mcnemar),
                "with several samples per item there is no single right/wrong outcome per item to pair")


def print_comparison(comparison: dict, console: Console, graders: dict[str, str] | None = None) -> None:
    """The comparison table, a line per run naming its full id and its grader (`graders`: run id -> what
    `grader_note` says of it), the pairs table, and why any cell says n/a."""
    rows = comparison["runs"]
    labels = _run_labels(rows)
    graders = graders or {}
    left_out = sum(comparison["left_out"].values())
    estimators = sorted({row["estimator"] for row in rows})
    named = {graders.get(row["run_id"], "unknown") for row in rows}
    console.print(f"[bold]{len(rows)} runs on {comparison['n_items']} common items[/bold], estimator: {', '.join(estimators)}"
                  + (f", grader: {named.pop()}" if len(named) == 1 else ", graders differ (see each run below)")
                  + (f" ({left_out} item results outside the common set left out)" if left_out else ""),
                  highlight=False, soft_wrap=True)
    table = Table(title="First answer to final answer (95% bootstrap intervals over the common items)")
    for column in ("run", "final acc", "95% CI", "change", "CL", "CS", "RSS", "tok/item", "acc/1k tok"):
        table.add_column(column, justify="left" if column == "run" else "right")
    notes: dict = {}
    for row in rows:
        label = labels[row["run_id"]]
        table.add_row(
            label, _num(row["acc_final"]), _interval(row["acc_final_ci"]), _num(row["delta"], signed=True),
            _num(row["cl"]), _num(row["cs"]), _num(row["rss"]),
            "n/a" if row["tokens_per_item"] is None else f"{row['tokens_per_item']:.0f}", _num(row["acc_per_1k_tokens"]),
        )
        for name, reason in _step_reasons(row, row["acc_first"], "first answers").items():
            _note(notes, SHORT_LABELS[name], reason, label)
        if row["tokens_per_item"] is None:
            _note(notes, "tok/item, acc/1k tok", estimator_named(row["estimator"]).no_tokens
                  or "the run counted no tokens", label)
    print_table(console, table)
    for row in rows:
        console.print(f"{labels[row['run_id']]}: run {row['run_id']}, grader: {graders.get(row['run_id'], 'unknown')}",
                      highlight=False, soft_wrap=True, markup=False)
    if any(row["upper_bound"] for row in rows):
        console.print("[red]* UPPER BOUND: reads the gold answer; not a method[/red]")
    _print_footnotes(console, notes)
    pairs = Table(title="Pairs: final accuracy of b minus a, paired over items")
    for column in ("a", "b", "difference", "95% CI", "McNemar p"):
        pairs.add_column(column, justify="left" if column in ("a", "b") else "right")
    estimator = {row["run_id"]: estimator_named(row["estimator"]) for row in rows}
    notes = {}
    for pair in comparison["pairs"]:
        pairs.add_row(labels[pair["a"]], labels[pair["b"]], _num(pair["diff"], signed=True),
                      _interval(pair["diff_ci"], signed=True),
                      _num(pair["mcnemar_p"], 4))
        if pair["mcnemar_p"] is None:
            _note(notes, "McNemar p", no_mcnemar_reason(estimator[pair["a"]], estimator[pair["b"]]),
                  f"{labels[pair['a']]} vs {labels[pair['b']]}")
    print_table(console, pairs)
    _print_footnotes(console, notes)


def _with_interval(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    shown = _num(value, signed=signed)
    return shown if value is None or ci is None else f"{shown} {_interval(ci, signed)}"


IMPROVEMENT_COLUMNS = ("model", "Acc1", "Acc2", "CL", "CS", "RSS", "Acc2 - base", "McNemar p", "training")


def improvement_rows(result: dict) -> list[tuple[str, ...]]:
    """What `improve` found, one row of `IMPROVEMENT_COLUMNS` per model (the base first): on the held-out items,
    Acc1, Acc2, CL, CS and RSS with their intervals, the paired difference in final accuracy from the base with
    McNemar's test, and each training's size and time. The terminal table and the improve page show these."""
    comparison = result["comparison"]
    rows = {row["run_id"]: row for row in comparison["runs"]}
    differences = {pair["b"]: pair for pair in comparison["pairs"] if pair["a"] == result["base_run"]}
    named = [("base", rows[result["base_run"]], None)] + [(recipe, rows[run_id], result["cards"][recipe])
                                                         for recipe, run_id in result["trained_runs"].items()]
    found = []
    for name, row, card in named:
        pair = differences.get(row["run_id"])
        found.append((
            name, *(_with_interval(row[field], row["ci"].get(key)) for key, field in
                    (("acc1", "acc_first"), ("acc2", "acc_final"), ("cl", "cl"), ("cs", "cs"), ("rss", "rss"))),
            "" if pair is None else _with_interval(pair["diff"], pair["diff_ci"], signed=True),
            "" if pair is None else _num(pair["mcnemar_p"], 4),
            "" if card is None else f"{card['data']['rows']} rows, {card['seconds']:.0f} s",
        ))
    return found


def print_improvement(result: dict, console: Console) -> None:
    """What `improve` found (`improvement_rows`), as a table."""
    table = Table(title=f"Held-out items ({result['comparison']['n_items']}): base and trained models, "
                        "95% bootstrap intervals over items")
    for column in IMPROVEMENT_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in improvement_rows(result):
        table.add_row(*row)
    print_table(console, table)


def print_reproduction(rows: list[dict], model: str, protocol: str, console: Console) -> None:
    """A protocol's grid as the paper lays it out: per task and second-turn prompt, Acc1, Acc2, CL, CS, RSS."""
    table = Table(title=f"{model} under {protocol}: per task and second-turn prompt (95% bootstrap intervals over items)")
    for column in ("task", "second turn", "items", "Acc1", "Acc2", "CL", "CS", "RSS"):
        table.add_column(column, justify="left" if column in ("task", "second turn") else "right")
    for row in rows:
        cells = [f"{_num(row[name])} {_interval(row['ci'][name])}" if row["ci"][name] else _num(row[name])
                 for name in ("acc1", "acc2", "cl", "cs", "rss")]
        # A multiple-choice task the protocol scores exactly, sampled because the model gives no option probabilities.
        sampled_instead = estimator_named(row["estimator"]).stores_replies and YANG2025_TASKS.get(row["task"]) == "mcq"
        task = row["task"] + (" (sampled)" if sampled_instead else "")
        table.add_row(task, row["prompt"], str(row["items"]), *cells)
    print_table(console, table)
