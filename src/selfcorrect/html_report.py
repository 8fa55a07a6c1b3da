"""One self-contained HTML file for one or more runs: the runs with their notes and warnings, the paired
differences between them, accuracy by round, the CL-CS plane, what each run sent, the flow of right and wrong
answers across rounds, and the items that flipped with their turns side by side.

Runs of one task (and task options) are paired as `compare` pairs them (compare.py): every figure of them is over
the items complete in each, and the differences shown are compare's own. Runs of different tasks (a `reproduce`
grid), or of one task with no common item, are each figured on their own items and marked as not paired; a run with
no complete item (every request of it failed) is left out of its task's pairing and named there. The notes
and warnings are the terminal report's (report.run_notices).

plotly.js is inlined once, so the file opens offline. Questions, targets and replies come from models and
data files and may hold markup: every one of them is HTML-escaped (plotly's own JSON escapes `<`).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs

from .compare import compare_runs, task_label
from .errors import UserError
from .estimators import ESTIMATORS, estimator_named
from .results import Run
from .report import _interval, _num, _run_labels, grader_note, http_line, no_mcnemar_reason, run_notices
from .store import Turn

UPPER_BOUND_NOTE = "* UPPER BOUND: the strategy reads the gold answer; it is a ceiling, not a method"
RIGHT, WRONG = "#2e7d32", "#c62828"
# Link colours of the answer flow, by transition: kept, broken, fixed, still wrong.
FLOW_COLOURS = {"c->c": "rgba(46,125,50,0.35)", "c->w": "rgba(239,108,0,0.7)",
                "w->c": "rgba(21,101,192,0.7)", "w->w": "rgba(198,40,40,0.25)"}
FLOW_WORDS = {"c->c": "kept right", "c->w": "right → wrong", "w->c": "wrong → right", "w->w": "stayed wrong"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
table.runs { font-size: 0.9em; }
.wide { overflow-x: auto; }  /* a long model spec widens the runs table past the page, not over it */
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; max-height: 16em; overflow: auto; margin: 0.2em 0; background: #f6f6f6; padding: 0.3em; }
.flips td { max-width: 28em; }
.note, .caption { color: #555; font-size: 0.92em; }
.upper { color: #b00020; font-weight: bold; }
.right { color: #2e7d32; } .wrong { color: #c62828; }
.warning { color: #8a5300; font-weight: bold; }
.pairing { background: #eef4fb; border-left: 4px solid #1565c0; padding: 0.5em 0.8em; }
.unpaired { background: #fdecea; border-left: 4px solid #b00020; padding: 0.5em 0.8em; color: #b00020; font-weight: bold; }
.role { font-weight: bold; color: #555; }
"""


def round_name(t: int) -> str:
    return "first answer" if t == 0 else f"correction {t}"


def render_html(runs: list[Run], n_boot: int = 2000) -> str:
    """The report of `runs` as one HTML document (a string), plots included."""
    groups = _groups(runs, n_boot)
    stored = [run.report(n_boot) for run in runs]  # each run whole: its notes, warnings and item counts
    # A run of a paired group is figured on the group's common items, every other one on its own complete items
    # (so its tokens per item are those items' too, not the turns of items it never finished).
    common = {row["run_id"]: group.comparison["items"] for group in groups if group.comparison
              for row in group.comparison["runs"]}
    figured, reports = [], []
    for run, whole in zip(runs, stored):
        items = common.get(run.run_id) or list(run.estimation.per_item(run))
        cut = len(items) < len(run.items)  # else the run is figured whole, and reported once
        figured.append(run.on_items(items) if cut else run)
        reports.append(figured[-1].report(n_boot) if cut else whole)
    runs = figured
    labels = _run_labels([{"run_id": r["run_id"], "strategy": r["config"]["strategy"], "model": r["config"]["model"],
                           "upper_bound": r["upper_bound"]} for r in reports])
    # Plot legends carry the words, not only the star: a legend has no footnote.
    legends = {r["run_id"]: labels[r["run_id"]] + (" UPPER BOUND" if r["upper_bound"] else "") for r in reports}
    # One colour per run in every plot (plotly's default sequence), set here because the plane draws a run's
    # point and its interval as two traces.
    colours = {r["run_id"]: qualitative.Plotly[i % len(qualitative.Plotly)] for i, r in enumerate(reports)}
    upper_note = (f'<p class="upper">{escape(UPPER_BOUND_NOTE)}</p>'
                  if any(r["upper_bound"] for r in reports) else "")
    differences = ["<h2>Differences between runs</h2>", _differences(groups, labels)] if len(runs) > 1 else []
    same_items = len(groups) == 1 and groups[0].unpaired is None  # one run, or runs paired on common items
    sections = [
        _pairing_note(groups, labels),
        "<h2>Runs</h2>", _runs_table(reports, stored, labels), _notices(stored, labels), upper_note,
        *differences,
        "<h2>Accuracy by round</h2>", _accuracy_figure(reports, legends, colours), upper_note,
        "<h2>Confidence against critique</h2>", _plane_figure(reports, legends, colours, same_items), upper_note,
        "<h2>What each run sent</h2>", _conversations(runs, labels),
        "<h2>Flow of answers across rounds</h2>",
        *(_flow_section(run, report, labels[run.run_id], legends[run.run_id]) for run, report in zip(runs, reports)),
        "<h2>Items that flipped</h2>",
        *(_flips_section(run, report, labels[run.run_id]) for run, report in zip(runs, reports)),
        upper_note,
    ]
    return html_page(f"selfcorrect report: {', '.join(labels.values())}", "selfcorrect report", sections)


def html_page(title: str, heading: str, sections: list[str]) -> str:
    """One self-contained HTML document: the style and plotly.js inlined, then the sections (HTML already)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>{escape(heading)}</h1>{''.join(sections)}</body></html>\n"
    )


@dataclass
class Group:
    """Runs of one task under the same task options, the runs a report may pair by item."""

    runs: list[Run]
    comparison: dict | None = None  # compare's result, when the runs pair on their common items
    unpaired: str | None = None  # why runs of the group do not pair (None: paired, or a run alone)
    without_items: tuple[str, ...] = ()  # runs with no complete item, left out of the pairing of the others


def _groups(runs: list[Run], n_boot: int) -> list[Group]:
    """The runs by task and task options (runs of other tasks answered other questions), each group of several
    runs paired as `compare` pairs them, or told why not (no common item, different questions under one id)."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(task_label(run), []).append(run)
    groups = []
    for members in by_task.values():
        group = Group(members)
        if len(members) > 1:
            # A run with no complete item (every request of it failed) pairs with nothing; the others still pair.
            has_items = {run.run_id: bool(run.estimation.per_item(run)) for run in members}
            pairable = [run for run in members if has_items[run.run_id]]
            if len(pairable) > 1:
                group.without_items = tuple(run_id for run_id, has in has_items.items() if not has)
            try:
                group.comparison = compare_runs(pairable if group.without_items else members, n_boot)
            except UserError as error:
                group.unpaired = str(error)
        groups.append(group)
    return groups


def _group_line(group: Group, labels: dict[str, str]) -> str:
    """Over which items a group's figures are, in one line of HTML."""
    names = escape(f"{', '.join(labels[run.run_id] for run in group.runs)} ({group.runs[0].config['task']['task']})")
    if group.comparison is not None:
        n = group.comparison["n_items"]
        left = [f"{labels[run_id]} {count} of its {count + n} complete items"
                for run_id, count in group.comparison["left_out"].items() if count]
        left += [f"{labels[run_id]}, which has no complete item" for run_id in group.without_items]
        return (f"{names}: paired by item, as <code>selfcorrect compare</code> pairs runs; every figure of these "
                f"runs is over the {n} items complete in each of them. "
                + (f"Left out: {escape('; '.join(left))}." if left else "No item is left out."))
    if group.unpaired is not None:
        return (f"{names}: NOT PAIRED ({escape(group.unpaired)}); each run's figures are over its own items (the "
                "items column), so a difference between them is not a paired comparison, and none is tested.")
    return f"{names}: alone of its task, figured on its own items."


def _pairing_note(groups: list[Group], labels: dict[str, str]) -> str:
    """Over which items the figures are, above everything else: a reader comparing runs must know it first."""
    if len(groups) == 1:
        group = groups[0]
        if len(group.runs) == 1:
            return ""
        return f'<p class="{"unpaired" if group.unpaired else "pairing"}">{_group_line(group, labels)}</p>'
    lines = "".join(f"<li>{_group_line(group, labels)}</li>" for group in groups)
    return ('<div class="unpaired">NOT ALL PAIRED: these runs are of different tasks (or task options), so they '
            "answered different questions; runs of different tasks are not paired, their figures are over different "
            f"items, and no difference between them is tested. By task:<ul>{lines}</ul></div>")


def _figure(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin={"t": 40, "b": 50, "l": 60, "r": 20})
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def _error_bars(values, lows, highs, colour: str) -> dict:
    """Plotly error bars from the point estimates and their interval ends."""
    values = np.asarray(values, dtype=float)
    return {"type": "data", "symmetric": False, "color": colour, "thickness": 1.5,
            "array": np.asarray(highs) - values, "arrayminus": values - np.asarray(lows)}


def _cell(value: str, css: str = "") -> str:
    return f'<td class="{css}">{escape(value)}</td>' if css else f"<td>{escape(value)}</td>"


def _runs_table(reports: list[dict], stored: list[dict], labels: dict[str, str]) -> str:
    """One row per run: what it is, its figures (over the items figured) and its token cost per item figured."""
    head = ("run", "id", "task", "model", "grader", "rounds × samples", "estimator", "items figured", "complete",
            "first acc", "final acc", "CL", "CS", "RSS", "tokens / item")
    rows = []
    no_tokens: dict[str, list[str]] = {}  # why a run counted no tokens -> the runs it applies to
    for r, whole in zip(reports, stored):
        config = r["config"]
        first_last = r.get("first_last") or {}
        tokens = r["tokens"]["prompt"] + r["tokens"]["completion"]
        if not tokens:
            reason = estimator_named(r["estimator"]).no_tokens or "the run counted no tokens"
            no_tokens.setdefault(reason, []).append(labels[r["run_id"]])
        rows.append(f'<tr data-run-id="{escape(r["run_id"])}">' + "".join([
            _cell(labels[r["run_id"]], "upper" if r["upper_bound"] else ""), _cell(r["run_id"]),
            _cell(config["task"]["task"]), _cell(config["model"]), _cell(grader_note(config)),
            _cell(f"{config['rounds']} × {config['samples']}", "num"), _cell(r["estimator"]),
            _cell(str(r["n_items"]), "num"), _cell(f"{whole['n_items']} of {whole['n_items_total']}", "num"),
            *(_cell(_num(r["acc"][t] if r["acc"] else None), "num") for t in (0, -1)),
            *(_cell(_num(first_last.get(name)), "num") for name in ("cl", "cs", "rss")),
            _cell(f"{r['tokens']['per_item']:.0f}" if tokens else "n/a", "num"),
        ]) + "</tr>")
    used = {estimator_named(r["estimator"]) for r in reports}
    notes = "".join(f"<li>{escape(estimator.note)}</li>" for estimator in ESTIMATORS.values() if estimator in used)
    tokens_notes = "".join(f'<p class="note">tokens per item n/a ({escape(", ".join(runs))}): {escape(reason)}</p>'
                           for reason, runs in no_tokens.items())
    return (f'<div class="wide"><table class="runs"><tr>{"".join(f"<th>{escape(h)}</th>" for h in head)}</tr>'
            f'{"".join(rows)}</table></div>'
            '<p class="note">CL, CS and RSS go from the first answer to the final one; tokens are prompt and '
            "completion tokens of every turn of an item figured; complete: the run's complete items of all it holds. "
            "Estimator:</p>"
            f'<ul class="note">{notes}</ul>{tokens_notes}')


def _notices(stored: list[dict], labels: dict[str, str]) -> str:
    """Each run's notes and warnings, as the terminal report prints them, and what its HTTP requests met."""
    lines = []
    for r in stored:
        label = labels[r["run_id"]]
        for notice in run_notices(r):
            css = ' class="warning"' if notice.warning else ""
            lines.append(f"<li{css}>{escape(label)}: {escape(notice.text)}</li>")
        traffic = http_line(r.get("http"))
        if traffic:
            lines.append(f"<li>{escape(label)}: {escape(traffic)}</li>")
    if not lines:
        return ""
    return ('<p class="note">Notes and warnings, counted over each run as stored:</p>'
            f'<ul class="notices">{"".join(lines)}</ul>')


def _differences(groups: list[Group], labels: dict[str, str]) -> str:
    """compare's table of each group of several runs, under the group's names when there are several groups."""
    several = len(groups) > 1
    shown = []
    for group in groups:
        if len(group.runs) == 1:
            continue
        names = ", ".join(labels[run.run_id] for run in group.runs)
        title = f"<h3>{escape(names)} ({escape(group.runs[0].config['task']['task'])})</h3>" if several else ""
        shown.append(title + _pairs_table(group, labels))
    return "".join(shown) or "<p>No two runs of one task: no difference is paired.</p>"


def _pairs_table(group: Group, labels: dict[str, str]) -> str:
    """compare's paired differences in final accuracy, with their intervals and McNemar's test."""
    comparison = group.comparison
    if comparison is None:
        return f"<p>No paired differences: {escape(group.unpaired)}.</p>"
    estimator = {row["run_id"]: estimator_named(row["estimator"]) for row in comparison["runs"]}
    rows, no_test = [], {}
    for pair in comparison["pairs"]:
        a, b = labels[pair["a"]], labels[pair["b"]]
        rows.append(f'<tr data-a="{escape(pair["a"])}" data-b="{escape(pair["b"])}">' + "".join([
            _cell(a), _cell(b), _cell(f"{pair['diff']:+.3f}", "num"), _cell(_interval(pair["diff_ci"], signed=True), "num"),
            _cell(_num(pair["mcnemar_p"], 4), "num"),
        ]) + "</tr>")
        if pair["mcnemar_p"] is None:
            no_test.setdefault(no_mcnemar_reason(estimator[pair["a"]], estimator[pair["b"]]), []).append(f"{a} vs {b}")
    head = "".join(f"<th>{column}</th>" for column in ("a", "b", "difference b − a", "95% CI", "McNemar p"))
    notes = "".join(f'<p class="note">McNemar p n/a ({escape(", ".join(pairs))}): {escape(reason)}</p>'
                    for reason, pairs in no_test.items())
    return (f'<table class="pairs"><tr>{head}</tr>{"".join(rows)}</table>'
            f'<p class="caption">Final accuracy of b minus that of a, paired over the {comparison["n_items"]} common '
            "items: a 95% bootstrap interval (one set of item resamples for every run) and McNemar's exact test, "
            f"as <code>selfcorrect compare</code> prints them.</p>{notes}")


def _accuracy_figure(reports: list[dict], legends: dict[str, str], colours: dict[str, str]) -> str:
    drawn = [r for r in reports if r["acc"]]
    if not drawn:
        return "<p>No run has a complete item yet: there is no accuracy to plot.</p>"
    fig = go.Figure()
    for i, r in enumerate(drawn):
        acc = np.array(r["acc"])
        low, high = np.array([ci[0] for ci in r["acc_ci"]]), np.array([ci[1] for ci in r["acc_ci"]])
        # Runs are nudged sideways so that their intervals do not hide one another.
        offset = (i - (len(drawn) - 1) / 2) * 0.06
        fig.add_trace(go.Scatter(
            x=np.arange(len(acc)) + offset, y=acc, mode="lines+markers", name=legends[r["run_id"]],
            line={"color": colours[r["run_id"]]}, error_y=_error_bars(acc, low, high, colours[r["run_id"]]),
            cliponaxis=False,
            customdata=np.stack([low, high], axis=1),
            hovertemplate="accuracy %{y:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]",
        ))
    rounds = max(len(r["acc"]) for r in drawn)
    fig.update_layout(
        height=420, legend_title_text="run",
        xaxis={"title": "round", "tickvals": list(range(rounds)), "ticktext": [round_name(t) for t in range(rounds)]},
        yaxis={"title": "accuracy", "range": [-0.02, 1.02]},
    )
    return (_figure(fig, "accuracy-by-round")
            + '<p class="caption">Share of answers right in each round, with 95% bootstrap intervals over items.</p>')


def _iso_line(acc1: float, acc2: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The (CS, CL) points in the unit square with Acc1*CL + (1-Acc1)*CS = acc2, or None if there are none."""
    cs = np.linspace(0.0, 1.0, 201)
    cl = (acc2 - (1.0 - acc1) * cs) / acc1
    inside = (cl >= 0.0) & (cl <= 1.0)
    return (cs[inside], cl[inside]) if inside.any() else None


@dataclass(frozen=True)
class PlanePoint:
    """One point of a CL-CS plane: a run, or a model of `improve`."""

    name: str
    group: str  # its legend group: the point and its interval cross show and hide together
    cs: float
    cl: float
    cs_ci: list[float] | None
    cl_ci: list[float] | None
    colour: str
    symbol: str = "circle"
    hover: str = ""  # more to show on hovering, after CS and CL


def add_plane_points(fig: go.Figure, points: list[PlanePoint]) -> None:
    """The points with their 95% interval crosses: every interval first, then every point on top, so that an
    interval as wide as the axis hides no point; points on the edge of the square are drawn whole."""
    for point in points:
        cs_ci, cl_ci = point.cs_ci or [point.cs] * 2, point.cl_ci or [point.cl] * 2
        fig.add_trace(go.Scatter(
            x=[point.cs], y=[point.cl], mode="markers", marker={"opacity": 0}, showlegend=False, hoverinfo="skip",
            legendgroup=point.group, cliponaxis=False,
            error_x=_error_bars([point.cs], [cs_ci[0]], [cs_ci[1]], point.colour),
            error_y=_error_bars([point.cl], [cl_ci[0]], [cl_ci[1]], point.colour),
        ))
    for point in points:
        fig.add_trace(go.Scatter(
            x=[point.cs], y=[point.cl], mode="markers", name=point.name, legendgroup=point.group, cliponaxis=False,
            marker={"size": 12, "symbol": point.symbol, "color": point.colour, "line": {"color": "white", "width": 1.5}},
            hovertemplate=f"CS %{{x:.3f}}<br>CL %{{y:.3f}}<br>{escape(point.hover)}<extra>{escape(point.name)}</extra>",
        ))


def _plane_figure(reports: list[dict], legends: dict[str, str], colours: dict[str, str], same_items: bool) -> str:
    """One point per run in the CL-CS plane, with lines of equal Acc2 when the runs are over the same items."""
    points = [r for r in reports if r.get("first_last") and r["first_last"]["cl"] is not None
              and r["first_last"]["cs"] is not None]
    missing = [legends[r["run_id"]] for r in reports if r not in points]
    missing_note = (f'<p class="note">Not on the plane (CL or CS undefined: no correction round, no complete item, '
                    f'or every first answer right or every one wrong): {escape(", ".join(missing))}.</p>'
                    if missing else "")
    if not points:
        return missing_note
    fig = go.Figure()
    if same_items:
        # The lines depend on Acc1; one set of lines serves every run only at one Acc1: the runs' mean, over the
        # same items (runs over different items have no Acc1 in common, so they get no lines).
        acc1 = float(np.mean([r["first_last"]["acc1"] for r in points]))
        for level in np.round(np.arange(0.1, 1.0, 0.1), 1):
            line = _iso_line(acc1, level)
            if line is not None:
                fig.add_trace(go.Scatter(x=line[0], y=line[1], mode="lines", showlegend=False, hoverinfo="skip",
                                         line={"color": "#bbb", "width": 1, "dash": "dot"}))
                fig.add_annotation(x=line[0][-1], y=line[1][-1], text=f"Acc2={level:.1f}", showarrow=False,
                                   font={"size": 10, "color": "#888"}, xanchor="left", yanchor="bottom")
        unchanged = _iso_line(acc1, acc1)
        fig.add_trace(go.Scatter(x=unchanged[0], y=unchanged[1], mode="lines",
                                 name=f"Acc2 = Acc1 = {acc1:.3f} (no change)", hoverinfo="skip",
                                 line={"color": "#555", "width": 1.5, "dash": "dash"}))
        lines = ("Along each dotted line the accuracy after correction, Acc2 = Acc1·CL + (1−Acc1)·CS, is the same; "
                 f"the lines depend on the first-answer accuracy and are drawn for Acc1 = {acc1:.3f}, the mean over "
                 "the runs plotted, on the same items. A run above the dashed line gains accuracy if its Acc1 is "
                 "that mean.")
    else:
        lines = ("No lines of equal accuracy after correction: they depend on the first-answer accuracy, and these "
                 "runs' are over different items.")
    add_plane_points(fig, [PlanePoint(
        legends[r["run_id"]], r["run_id"], r["first_last"]["cs"], r["first_last"]["cl"],
        r["first_last"]["ci"]["cs"], r["first_last"]["ci"]["cl"], colours[r["run_id"]],
        "star" if r["upper_bound"] else "circle",
        f"Acc1 {r['first_last']['acc1']:.3f}, Acc2 {r['first_last']['acc2']:.3f}") for r in points])
    fig.update_layout(
        height=560, legend_title_text="run",
        xaxis={"title": "CS, critique: wrong answers fixed", "range": [-0.03, 1.08], "constrain": "domain"},
        yaxis={"title": "CL, confidence: right answers kept", "range": [-0.03, 1.03], "scaleanchor": "x"},
    )
    caption = (
        '<p class="caption">One point per run, first answer to final answer, with 95% bootstrap intervals. '
        "Confident runs sit high (they keep right answers), critical runs far right (they fix wrong ones), as "
        f"Yang et al. (2025) contrast models. {lines}</p>"
    )
    return _figure(fig, "cl-cs-plane") + caption + missing_note


def _conversations(runs: list[Run], labels: dict[str, str]) -> str:
    """The first complete item's conversation of each run, as the model got it and answered (for runs paired by
    item, the first common item: one question, every strategy's prompts)."""
    shown = []
    for run in runs:
        found = run.estimation.first_conversation(run)
        if found is None:
            shown.append(f"<p>{escape(labels[run.run_id])}: no complete item, no conversation to show.</p>")
            continue
        where, messages = found
        turns = "".join(f'<div class="message"><span class="role">{escape(message["role"])}</span>'
                        f'<pre>{escape(message["content"])}</pre></div>' for message in messages)
        shown.append(f'<details class="conversation" data-run-id="{escape(run.run_id)}"><summary>'
                     f"{escape(labels[run.run_id])}: {escape(where)}</summary>{turns}</details>")
    return "".join(shown)


def _flow_section(run: Run, report: dict, label: str, legend: str) -> str:
    title = f"<h3>{escape(label)}</h3>"
    if not run.estimation.stores_replies:
        return title + ("<p>Exact estimator: its figures are expected shares computed from option probabilities, "
                        "with no sampled replies, so there is no flow of answers to draw.</p>")
    if not report["pairs"]:
        return title + "<p>No correction round with a complete item: nothing flows.</p>"
    rounds = len(report["acc"])
    # Node 2t is "right after round t", node 2t+1 "wrong after round t".
    totals = [[0, 0] for _ in range(rounds)]
    sources, targets, values, colours, hovers = [], [], [], [], []
    for pair in report["pairs"]:
        t = pair["from"]
        for kind, (before, after) in {"c->c": (0, 0), "c->w": (0, 1), "w->c": (1, 0), "w->w": (1, 1)}.items():
            count = pair["counts"][kind]
            if t == 0:
                totals[0][before] += count
            totals[t + 1][after] += count
            if count:
                sources.append(2 * t + before)
                targets.append(2 * (t + 1) + after)
                values.append(count)
                colours.append(FLOW_COLOURS[kind])
                hovers.append(f"{round_name(t)} → {round_name(t + 1)}: {FLOW_WORDS[kind]}")
    node_labels = [f"{round_name(t)}: {word} ({totals[t][k]})"
                   for t in range(rounds) for k, word in enumerate(("right", "wrong"))]
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": node_labels, "color": [RIGHT, WRONG] * rounds, "pad": 20,
              # Rounds left to right, right answers on top: plotly would otherwise order nodes by size.
              "x": [0.001 + 0.998 * t / (rounds - 1) for t in range(rounds) for _ in range(2)],
              "y": [0.25, 0.75] * rounds},
        link={"source": sources, "target": targets, "value": values, "color": colours, "customdata": hovers,
              "hovertemplate": "%{customdata}: %{value}<extra></extra>"},
    ))
    fig.update_layout(height=320, title={"text": legend, "font": {"size": 14}})
    unit = "answers (items × samples)" if run.config["samples"] > 1 else "items"
    return title + _figure(fig, f"flow-{run.run_id}") + (
        f'<p class="caption">Counts of {unit}, right (green) and wrong (red) after each round. Orange links: '
        "right answers broken; blue links: wrong answers fixed.</p>")


def _flipped_turns(run: Run) -> list[tuple[Turn, Turn]]:
    """(turn before, turn after) for every correction that changed right to wrong or wrong to right, over
    the items the report counts (those with every cell stored), in the store's order."""
    complete = set(run.correctness()[0])
    by_cell = {(t.item_id, t.sample, t.round): t for t in run.turns}
    pairs = []
    for turn in run.turns:
        before = by_cell.get((turn.item_id, turn.sample, turn.round - 1))
        if turn.item_id in complete and before is not None and before.correct != turn.correct:
            pairs.append((before, turn))
    return pairs


def _turn_html(turn: Turn) -> str:
    verdict = "right" if turn.correct else "wrong"
    earlier = "".join(f"<pre>{escape(reply)}</pre>" for reply in turn.feedback)
    details = (f"<details><summary>earlier replies in this round ({len(turn.feedback)})</summary>{earlier}</details>"
               if turn.feedback else "")
    answer = "(none found)" if turn.answer is None else turn.answer
    return (f'<td><div><span class="{verdict}">{verdict}</span>, answer {escape(answer)}</div>'
            f"{details}<pre>{escape(turn.response)}</pre></td>")


def _flips_section(run: Run, report: dict, label: str) -> str:
    title = f"<h3>{escape(label)}</h3>"
    if not run.estimation.stores_replies:
        return title + "<p>Exact estimator: no sampled replies, so no item flips from one reply to the next.</p>"
    flips = _flipped_turns(run)
    if not flips:
        return title + f"<p>No answer changed between right and wrong in {report['n_items']} complete items.</p>"
    items = {item["item_id"]: item for item in run.items}
    several = run.config["samples"] > 1
    rows = []
    for before, after in flips:
        item = items[after.item_id]
        where = after.item_id + (f" · sample {after.sample}" if several else "")
        change = "right → wrong" if before.correct else "wrong → right"
        rows.append(
            f'<tr data-run="{escape(run.run_id)}" data-item="{escape(after.item_id)}" data-sample="{after.sample}" '
            f'data-round="{after.round}">{_cell(where)}{_cell(f"{before.round} → {after.round}")}'
            f'{_cell(change, "wrong" if before.correct else "right")}<td><pre>{escape(item["question"])}</pre></td>'
            f"{_cell(item['target'])}{_turn_html(before)}{_turn_html(after)}</tr>"
        )
    broken = sum(before.correct for before, _ in flips)
    columns = ("item", "round", "change", "question", "target", "turn before", "turn after")
    head = "".join(f"<th>{column}</th>" for column in columns)
    return (title + f"<p>{broken} right → wrong, {len(flips) - broken} wrong → right.</p>"
            f'<table class="flips"><tr>{head}</tr>{"".join(rows)}</table>')
