"""The page `improve` writes beside its adapters (OUTPUT/improve.html): the base and each trained model on the
CL-CS plane with their intervals and the line where correction neither helps nor hurts, the table the terminal
prints, and the training curves the cards hold. One self-contained file, as the run report is."""

from __future__ import annotations

from html import escape

import plotly.graph_objects as go
from plotly.colors import qualitative

from .html_report import PlanePoint, _figure, _iso_line, add_plane_points, html_page
from .report import IMPROVEMENT_COLUMNS, _num, improvement_rows

# What a card's log lines hold besides values to plot: the x axis and the time (ours, and TRL's per step).
NOT_CURVES = ("step", "seconds", "step_time")
# Drawn first, in this order: the loss, then what an rl training's rollouts did (train/rl.py logs them); TRL's own
# values follow by name.
FIRST_CURVES = ("loss", "r1", "r2", "right_to_wrong", "wrong_to_right")


def render_improvement(result: dict) -> str:
    """The page of an `improve` result (what `train.loop.improve` returns) as one HTML document."""
    comparison = result["comparison"]
    rows = {row["run_id"]: row for row in comparison["runs"]}
    models = [("base", rows[result["base_run"]])] + [(recipe, rows[run_id])
                                                     for recipe, run_id in result["trained_runs"].items()]
    head = "".join(f"<th>{escape(column)}</th>" for column in IMPROVEMENT_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in improvement_rows(result))
    runs = ", ".join(f"{name} {row['run_id']}" for name, row in models)
    sections = [
        f"<h2>Held-out items ({comparison['n_items']})</h2>",
        f"<table><tr>{head}</tr>{body}</table>",
        f'<p class="note">Runs: {escape(runs)}; training items measured in {escape(result["train_run"])}. '
        "Intervals are 95% bootstrap intervals over items; Acc2 - base is the paired difference in final "
        "accuracy with McNemar's exact test.</p>",
        "<h2>Confidence against critique</h2>", _plane(models),
        "<h2>Training</h2>", _curves(result["cards"]),
    ]
    return html_page("selfcorrect improve", "selfcorrect improve", sections)


def _plane(models: list[tuple[str, dict]]) -> str:
    placed = [(name, row) for name, row in models if row["cl"] is not None and row["cs"] is not None]
    missing = [name for name, row in models if (name, row) not in placed]
    note = (f'<p class="note">Not on the plane (CL or CS undefined: every first answer right or every one '
            f'wrong): {escape(", ".join(missing))}.</p>' if missing else "")
    fig = go.Figure()
    colours = dict(zip([name for name, _ in placed], qualitative.Plotly * len(placed)))
    for name, row in placed:
        colour = colours[name]
        # RSS = 0.5 where Acc2 = Acc1: correction neither helps nor hurts. The line depends on the model's own
        # Acc1, so each model gets its own, in its colour.
        level = _iso_line(row["acc_first"], row["acc_first"]) if 0 < row["acc_first"] < 1 else None
        if level is not None:
            fig.add_trace(go.Scatter(x=level[0], y=level[1], mode="lines", name=f"{name}: RSS = 0.5", hoverinfo="skip",
                                     line={"color": colour, "width": 1.2, "dash": "dash"}))
    add_plane_points(fig, [PlanePoint(name, name, row["cs"], row["cl"], row["ci"].get("cs"), row["ci"].get("cl"),
                                      colours[name], hover=f"Acc1 {row['acc_first']:.3f}, Acc2 {row['acc_final']:.3f}, "
                                                           f"RSS {_num(row['rss'])}") for name, row in placed])
    fig.update_layout(
        height=560, legend_title_text="model",
        xaxis={"title": "CS, critique: wrong answers fixed", "range": [-0.03, 1.03], "constrain": "domain"},
        yaxis={"title": "CL, confidence: right answers kept", "range": [-0.03, 1.03], "scaleanchor": "x"},
    )
    caption = ('<p class="caption">Each model on the held-out items, first answer to final answer, with its 95% '
               "bootstrap intervals as a cross. Above its dashed line (where Acc2 = Acc1, RSS = 0.5, drawn for the "
               "model's own first-answer accuracy) correction helps that model; below it, it hurts. Training that "
               "teaches critique moves a point right, training that teaches confidence moves it up.</p>")
    return (_figure(fig, "improve-plane") + caption if placed else "") + note


def _curves(cards: dict[str, dict]) -> str:
    """One plot per value the cards' log lines hold (the loss; DPO's rewards and margins too), a line per recipe."""
    keys = sorted({key for card in cards.values() for log in card.get("losses", []) for key in log
                   if key not in NOT_CURVES},
                  key=lambda key: (FIRST_CURVES.index(key) if key in FIRST_CURVES else len(FIRST_CURVES), key))
    if not keys:
        return '<p class="note">The training cards hold no log lines.</p>'
    figures = []
    for key in keys:
        fig = go.Figure()
        for recipe, card in cards.items():
            logs = [log for log in card.get("losses", []) if log.get(key) is not None]
            if logs:
                fig.add_trace(go.Scatter(x=[log["step"] for log in logs], y=[log[key] for log in logs],
                                         mode="lines+markers", name=recipe))
        fig.update_layout(height=320, legend_title_text="recipe", xaxis={"title": "step"}, yaxis={"title": key})
        figures.append(_figure(fig, f"curve-{key.replace('/', '-')}"))
    sizes = ", ".join(f"{recipe}: {card['data']['rows']} rows, {card['training']['steps']} steps, "
                      f"{card['seconds']:.0f} s" for recipe, card in cards.items())
    return "".join(figures) + f'<p class="caption">From each adapter\'s training card ({escape(sizes)}).</p>'
