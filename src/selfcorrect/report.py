"""Terminal tables for a run's report (the dict `Run.report()` returns)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


METRIC_LABELS = (
    ("cl", "CL  confidence: right answers kept"),
    ("cs", "CS  critique: wrong answers fixed"),
    ("rss", "RSS relative self-correction (0.5 = no change)"),
    ("delta", "change in accuracy"),
    ("acc_inf", "Acc_inf  limit of repeated correction"),
)


ESTIMATOR_NOTES = {
    "sampling": "sampling (every figure counts graded replies)",
    "exact": "exact (every figure from option probabilities: K+1 scoring passes per item, no sampling; "
    "transition shares are expected shares, no McNemar test)",
}


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _provenance_warnings(report: dict) -> list[str]:
    """What a reader must know before trusting the figures: prompts of unknown version, replies cut short,
    a server that changed what it ran during the run."""
    warnings = []
    if report["prompt_version"] is None:
        warnings.append("prompts: unknown version (stored before prompt versions were kept; running the same "
                        "command now makes a new run with today's prompts)")
    reasons = report["replies"]["finish_reasons"]
    total = sum(reasons.values())
    cut = {name: reasons.get(name, 0) for name in ("length", "context")}
    if cut["length"] or cut["context"]:
        warnings.append(f"replies cut short: {cut['length']} of {total} at --max-tokens, {cut['context']} at the "
                        "model's context window (their answers may be missing)")
    served = report["replies"]["served_by"]
    if len(served) > 1:
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in sorted(s.items())) for s in served)
        warnings.append(f"the server reported {len(served)} different setups during this run: {shown}")
    return warnings


def _print_grading(report: dict, console: Console) -> None:
    """Which graders gave the verdicts, those older than today's, and grades that timed out."""
    grading, run = report["grading"], report["run_id"]
    if not grading["versions"]:  # no graded turn (yet, or the exact estimator)
        return
    today = grading["current_version"]
    if list(grading["versions"]) == [today]:
        console.print(f"grader version: {today} (today's)", highlight=False, soft_wrap=True)
    else:
        notes = [", ".join(f"{version} ({count} turns)" for version, count in grading["versions"].items())]
        if grading["outdated"]:
            notes.append(f"{grading['outdated']} verdict(s) from graders older than today's ({today}): "
                         f"selfcorrect regrade {run} grades them again")
        if grading["unversioned"]:
            notes.append(f"{grading['unversioned']} verdict(s) from before grader versions were kept")
        console.print(f"[yellow]grader versions: {'; '.join(notes)}[/yellow]", highlight=False, soft_wrap=True)
    if grading["timeouts"]:
        count = grading["timeouts"]
        console.print(f"[yellow]{count} grade{'s' if count != 1 else ''} timed out, counted as wrong (--grader-timeout "
                      f"sets the limit; selfcorrect regrade {run} tries them again)[/yellow]",
                      highlight=False, soft_wrap=True)


def print_report(report: dict, console: Console) -> None:
    config = report["config"]
    task = config["task"]["task"]
    console.print(
        f"[bold]run {report['run_id']}[/bold]  {task} · {config['model']} · {config['strategy']} · "
        f"{config['rounds']} round(s) · {config['samples']} sample(s) · T={config['temperature']} · seed {config['seed']}"
    )
    console.print(f"items: {report['n_items']} complete of {report['n_items_total']}   store: {report['db']}")
    console.print(f"estimator: {ESTIMATOR_NOTES[report['estimator']]}")
    for warning in _provenance_warnings(report):
        console.print(f"[yellow]{warning}[/yellow]", highlight=False)
    _print_grading(report, console)
    if report["upper_bound"]:
        console.print("[bold red]UPPER BOUND: this strategy reads the gold answer; it is not a method[/bold red]")
    if not report["complete"]:
        console.print("[yellow]incomplete: run the same command again to fill the missing turns[/yellow]")
    if not report["acc"]:
        return

    rounds = Table(title="Accuracy by round (95% bootstrap interval over items)")
    rounds.add_column("round")
    rounds.add_column("accuracy", justify="right")
    rounds.add_column("95% CI", justify="right")
    for t, (acc, ci) in enumerate(zip(report["acc"], report["acc_ci"])):
        rounds.add_row("first answer" if t == 0 else f"correction {t}", _num(acc), _interval(ci))
    console.print(rounds)

    if report["pairs"]:
        headline = Table(title=f"Last correction (round {report['pairs'][-1]['from']} -> {report['pairs'][-1]['to']})")
        headline.add_column("metric")
        headline.add_column("value", justify="right")
        headline.add_column("95% CI", justify="right")
        for name, label in METRIC_LABELS:
            headline.add_row(label, _num(report[name]), _interval(report["ci"].get(name)))
        console.print(headline)

        steps = Table(title="Every round pair: shares of samples by transition")
        for column in ("step", "CL", "CS", "RSS", "c->c", "c->w", "w->c", "w->w", "McNemar p"):
            steps.add_column(column, justify="right")
        for pair in report["pairs"]:
            shares = pair["transitions"]
            steps.add_row(
                f"{pair['from']}->{pair['to']}", _num(pair["cl"]), _num(pair["cs"]), _num(pair["rss"]),
                *(_num(shares[k]) for k in ("c->c", "c->w", "w->c", "w->w")), _num(pair["mcnemar_p"], 4),
            )
        console.print(steps)
    tokens = report["tokens"]
    console.print(
        f"cost: {tokens['prompt']} prompt + {tokens['completion']} completion tokens "
        f"({tokens['per_item']:.0f} per item), {tokens['seconds_per_item']:.2f} s of turn latency per item "
        "(summed over its turns; conversations run concurrently, so this exceeds wall time)"
    )
    if report["verifier"]:
        verifier = report["verifier"]
        console.print(
            f"the model's own verdicts on its answers ({verifier['verdicts']}): accuracy {_num(verifier['accuracy'])}, "
            f"precision of 'wrong' {_num(verifier['precision_wrong'])}, recall of 'wrong' {_num(verifier['recall_wrong'])}"
        )


def _run_labels(rows: list[dict]) -> dict[str, str]:
    """A short name per run: its strategy (with the run id where strategies repeat), '*' for an upper bound."""
    strategies = [row["strategy"] for row in rows]
    return {
        row["run_id"]: (row["strategy"] if strategies.count(row["strategy"]) == 1 else f"{row['strategy']} {row['run_id'][:6]}")
        + ("*" if row["upper_bound"] else "")
        for row in rows
    }


def print_comparison(comparison: dict, console: Console) -> None:
    rows = comparison["runs"]
    labels = _run_labels(rows)
    left_out = sum(comparison["left_out"].values())
    estimators = sorted({row["estimator"] for row in rows})
    console.print(f"[bold]{len(rows)} runs on {comparison['n_items']} common items[/bold], estimator: {', '.join(estimators)}"
                  + (f" ({left_out} item results outside the common set left out)" if left_out else ""))
    table = Table(title="First answer to final answer (95% bootstrap intervals over the common items)")
    for column in ("run", "final acc", "95% CI", "change", "CL", "CS", "RSS", "tok/item", "acc/1k tok"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            labels[row["run_id"]], _num(row["acc_final"]), _interval(row["acc_final_ci"]), _num(row["delta"]),
            _num(row["cl"]), _num(row["cs"]), _num(row["rss"]),
            "n/a" if row["tokens_per_item"] is None else f"{row['tokens_per_item']:.0f}", _num(row["acc_per_1k_tokens"]),
        )
    console.print(table)
    if any(row["upper_bound"] for row in rows):
        console.print("[red]* UPPER BOUND: reads the gold answer; not a method[/red]")
    pairs = Table(title="Pairs: final accuracy of b minus a, paired over items")
    for column in ("a", "b", "difference", "95% CI", "McNemar p"):
        pairs.add_column(column, justify="left" if column in ("a", "b") else "right", no_wrap=True)
    for pair in comparison["pairs"]:
        pairs.add_row(labels[pair["a"]], labels[pair["b"]], _num(pair["diff"]), _interval(pair["diff_ci"]),
                      _num(pair["mcnemar_p"], 4))
    console.print(pairs)
