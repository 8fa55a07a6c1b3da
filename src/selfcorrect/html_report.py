"""One self-contained HTML file for one or more runs: accuracy by round, the CL-CS plane, the flow of
right and wrong answers across rounds, and the items that flipped with their turns side by side.

plotly.js is inlined once, so the file opens offline. Questions, targets and replies come from models and
data files and may hold markup: every one of them is HTML-escaped (plotly's own JSON escapes `<`).
"""

from __future__ import annotations

from html import escape

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from .estimators import ESTIMATORS, estimator_named
from .results import Run
from .report import _num, _run_labels, http_line, isolation_line
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
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; max-height: 16em; overflow: auto; margin: 0.2em 0; background: #f6f6f6; padding: 0.3em; }
.flips td { max-width: 28em; }
.note, .caption { color: #555; font-size: 0.92em; }
.upper { color: #b00020; font-weight: bold; }
.right { color: #2e7d32; } .wrong { color: #c62828; }
"""


def round_name(t: int) -> str:
    return "first answer" if t == 0 else f"correction {t}"


def render_html(runs: list[Run], n_boot: int = 2000) -> str:
    """The report of `runs` as one HTML document (a string), plots included."""
    reports = [run.report(n_boot) for run in runs]
    labels = _run_labels([{"run_id": r["run_id"], "strategy": r["config"]["strategy"], "model": r["config"]["model"],
                           "upper_bound": r["upper_bound"]} for r in reports])
    # Plot legends carry the words, not only the star: a legend has no footnote.
    legends = {r["run_id"]: labels[r["run_id"]] + (" UPPER BOUND" if r["upper_bound"] else "") for r in reports}
    upper_note = (f'<p class="upper">{escape(UPPER_BOUND_NOTE)}</p>'
                  if any(r["upper_bound"] for r in reports) else "")
    sections = [
        "<h2>Runs</h2>", _runs_table(reports, labels), upper_note,
        "<h2>Accuracy by round</h2>", _accuracy_figure(reports, legends), upper_note,
        "<h2>Confidence against critique</h2>", _plane_figure(reports, legends), upper_note,
        "<h2>Flow of answers across rounds</h2>",
        *(_flow_section(run, report, labels[run.run_id], legends[run.run_id]) for run, report in zip(runs, reports)),
        "<h2>Items that flipped</h2>",
        *(_flips_section(run, report, labels[run.run_id]) for run, report in zip(runs, reports)),
        upper_note,
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>selfcorrect report: {escape(', '.join(labels.values()))}</title>"
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>selfcorrect report</h1>{''.join(sections)}</body></html>\n"
    )


def _figure(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin={"t": 40, "b": 50, "l": 60, "r": 20})
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def _error_bars(values, lows, highs) -> dict:
    """Plotly error bars from the point estimates and their interval ends."""
    values = np.asarray(values, dtype=float)
    return {"type": "data", "symmetric": False,
            "array": np.asarray(highs) - values, "arrayminus": values - np.asarray(lows)}


def _cell(value: str, css: str = "") -> str:
    return f'<td class="{css}">{escape(value)}</td>' if css else f"<td>{escape(value)}</td>"


def _runs_table(reports: list[dict], labels: dict[str, str]) -> str:
    head = ("run", "id", "task", "model", "rounds", "samples", "estimator", "items", "first acc", "final acc",
            "CL", "CS", "RSS")
    rows = []
    for r in reports:
        config = r["config"]
        first_last = r.get("first_last") or {}
        rows.append("<tr>" + "".join([
            _cell(labels[r["run_id"]], "upper" if r["upper_bound"] else ""), _cell(r["run_id"]),
            _cell(config["task"]["task"]), _cell(config["model"]), _cell(str(config["rounds"]), "num"),
            _cell(str(config["samples"]), "num"), _cell(r["estimator"]),
            _cell(f"{r['n_items']} of {r['n_items_total']}", "num"),
            *(_cell(_num(r["acc"][t] if r["acc"] else None), "num") for t in (0, -1)),
            *(_cell(_num(first_last.get(name)), "num") for name in ("cl", "cs", "rss")),
        ]) + "</tr>")
    used = {estimator_named(r["estimator"]) for r in reports}
    notes = "".join(f"<li>{escape(estimator.note)}</li>" for estimator in ESTIMATORS.values() if estimator in used)
    isolation = [(labels[r["run_id"]], isolation_line(r["grading"]["isolation"], r["grading"]["isolation_notes"])) for r in reports]
    isolation_notes = "".join(f'<p class="note">{escape(label)}: {escape(line)}</p>' for label, line in isolation if line)
    traffic = [(labels[r["run_id"]], http_line(r.get("http"))) for r in reports]
    traffic_notes = "".join(f'<p class="note">{escape(label)}: {escape(line)}</p>' for label, line in traffic if line)
    return (f'<table><tr>{"".join(f"<th>{escape(h)}</th>" for h in head)}</tr>{"".join(rows)}</table>'
            f'<p class="note">CL, CS and RSS go from the first answer to the final one. Estimator:</p>'
            f'<ul class="note">{notes}</ul>{isolation_notes}{traffic_notes}')


def _accuracy_figure(reports: list[dict], legends: dict[str, str]) -> str:
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
            error_y=_error_bars(acc, low, high),
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


def _plane_figure(reports: list[dict], legends: dict[str, str]) -> str:
    points = [r for r in reports if r.get("first_last") and r["first_last"]["cl"] is not None
              and r["first_last"]["cs"] is not None]
    missing = [legends[r["run_id"]] for r in reports if r not in points]
    missing_note = (f'<p class="note">Not on the plane (CL or CS undefined: no correction round, no complete item, '
                    f'or every first answer right or every one wrong): {escape(", ".join(missing))}.</p>'
                    if missing else "")
    if not points:
        return missing_note
    # The lines depend on Acc1; one set of lines serves every run only at one Acc1: the runs' mean.
    acc1 = float(np.mean([r["first_last"]["acc1"] for r in points]))
    fig = go.Figure()
    for level in np.round(np.arange(0.1, 1.0, 0.1), 1):
        line = _iso_line(acc1, level)
        if line is not None:
            fig.add_trace(go.Scatter(x=line[0], y=line[1], mode="lines", showlegend=False, hoverinfo="skip",
                                     line={"color": "#bbb", "width": 1, "dash": "dot"}))
            fig.add_annotation(x=line[0][-1], y=line[1][-1], text=f"Acc2={level:.1f}", showarrow=False,
                               font={"size": 10, "color": "#888"}, xanchor="left", yanchor="bottom")
    unchanged = _iso_line(acc1, acc1)
    fig.add_trace(go.Scatter(x=unchanged[0], y=unchanged[1], mode="lines", name=f"Acc2 = Acc1 = {acc1:.3f} (no change)",
                             hoverinfo="skip", line={"color": "#555", "width": 1.5, "dash": "dash"}))
    for r in points:
        pair = r["first_last"]
        cl_ci, cs_ci = pair["ci"]["cl"] or [pair["cl"]] * 2, pair["ci"]["cs"] or [pair["cs"]] * 2
        fig.add_trace(go.Scatter(
            x=[pair["cs"]], y=[pair["cl"]], mode="markers", name=legends[r["run_id"]],
            marker={"size": 12, "symbol": "star" if r["upper_bound"] else "circle"},
            error_x=_error_bars([pair["cs"]], [cs_ci[0]], [cs_ci[1]]),
            error_y=_error_bars([pair["cl"]], [cl_ci[0]], [cl_ci[1]]),
            hovertemplate=f"CS %{{x:.3f}}<br>CL %{{y:.3f}}<br>Acc1 {pair['acc1']:.3f}, Acc2 {pair['acc2']:.3f}",
        ))
    fig.update_layout(
        height=560, legend_title_text="run",
        xaxis={"title": "CS, critique: wrong answers fixed", "range": [-0.03, 1.08], "constrain": "domain"},
        yaxis={"title": "CL, confidence: right answers kept", "range": [-0.03, 1.03], "scaleanchor": "x"},
    )
    caption = (
        '<p class="caption">One point per run, first answer to final answer, with 95% bootstrap intervals. '
        "Confident runs sit high (they keep right answers), critical runs far right (they fix wrong ones), as "
        "Yang et al. (2025) contrast models. Along each dotted line the accuracy after correction, "
        "Acc2 = Acc1·CL + (1−Acc1)·CS, is the same; the lines depend on the first-answer accuracy and are drawn "
        f"for Acc1 = {acc1:.3f}, the mean over the runs plotted. A run above the dashed line gains accuracy "
        "if its Acc1 is that mean.</p>"
    )
    return _figure(fig, "cl-cs-plane") + caption + missing_note


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
