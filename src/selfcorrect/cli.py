"""The `selfcorrect` command line: a thin layer over `selfcorrect.api`."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .api import check_grader_timeout, evaluate, load_run
from .api import regrade as regrade_run
from .compare import compare_runs
from .engine import dropped_turns_running
from .errors import UserError
from .grader_pool import DEFAULT_TIMEOUT_S, GraderPool
from .html_report import render_html
from .models import MODEL_SPECS, can_score_options, check_model_spec
from .report import print_comparison, print_report
from .store import Store, default_db_path
from .strategies import all_strategies
from .tasks import TASKS, load_task

app = typer.Typer(
    help="Measure how well a language model corrects itself: accuracy per round, CL, CS, RSS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

DB_HELP = f"run store (SQLite); default $SELFCORRECT_DB or {default_db_path()}"


def user_errors(command: Callable) -> Callable:
    """Turn a UserError into one line on stderr and exit code 2; Ctrl-C into one line and exit code 130
    (for `run`, a hint to resume: the engine stores the finished turns before it gives up)."""
    interrupted = "interrupted"
    if command.__name__ == "run":
        interrupted += ": the finished turns are stored; run the same command again to resume"

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as problem:
            err.print(f"error: {problem}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print(interrupted, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return guarded


def parse_task_options(pairs: list[str], fields: list[str], grader: str | None) -> dict[str, str]:
    """--task-opt KEY=VALUE pairs, plus --field and --grader, which are options of the custom task."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--task-opt {pair}: expected KEY=VALUE, for example --task-opt digits=2")
        options[key.strip()] = value.strip()
    if fields:
        options["fields"] = ",".join(fields)
    if grader is not None:
        options["grader"] = grader
    return options


TASK_HELP = "task name; `selfcorrect tasks` lists them"
DATA_HELP = "data file (JSONL, CSV, Parquet) or hf:DATASET[:CONFIG][@SPLIT] for tasks that read one"
TASK_OPT_HELP = "task option KEY=VALUE (repeatable)"
FIELD_HELP = "custom task: map fields to columns, NAME=COLUMN[,NAME=COLUMN] (question, answer, choices, id)"
GRADER_HELP = "custom task: exact | number | math | choice | code"
GRADER_TIMEOUT_HELP = (
    "seconds one grade may take; a grade that takes longer is recorded as wrong ('grader timeout'). "
    "Code graders are bounded by the sandbox's own timeout instead"
)


@app.command()
@user_errors
def run(
    task: str = typer.Option("arithmetic", help=TASK_HELP),
    model: str = typer.Option("embedded", help="embedded | llamacpp:PATH.gguf"),
    strategy: str = typer.Option("reask", help="correction strategy; `selfcorrect strategies` lists them"),
    rounds: int = typer.Option(1, help="correction rounds after the first answer"),
    samples: int = typer.Option(1, help="first answers per item (the sampling estimator)"),
    temperature: float = typer.Option(0.0, help="sampling temperature (0 = greedy)"),
    limit: Optional[int] = typer.Option(None, help="use only the first N items"),
    seed: int = typer.Option(0, help="seed for sampling and bootstrap"),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    task_opt: list[str] = typer.Option([], "--task-opt", help=TASK_OPT_HELP),
    field: list[str] = typer.Option([], "--field", help=FIELD_HELP),
    grader: Optional[str] = typer.Option(None, help=GRADER_HELP),
    max_tokens: Optional[int] = typer.Option(None, help="cap on tokens per reply (default: the task's)"),
    estimator: str = typer.Option(
        "auto", help="exact (option log-probs, multiple choice) | sampling | auto: exact where possible"
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="generate every reply, ignoring the response cache"),
    critic_model: Optional[str] = typer.Option(None, help="model spec of the critic, for --strategy critic"),
    icl_confident: int = typer.Option(0, help="in-context examples of a right answer kept, before each correction"),
    icl_critical: int = typer.Option(0, help="in-context examples of a wrong answer fixed, before each correction"),
    budget: Optional[int] = typer.Option(
        None, help="tokens per correction round for the baselines (self-consistency, best-of-n)"
    ),
    match_budget: Optional[str] = typer.Option(
        None, help="set --budget to the tokens per correction round of this stored run (id or prefix)"
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="shard conversations over Ray actors: local (a cluster on this machine), auto (the cluster of this "
        "node) or a cluster address; needs the ray extra",
    ),
    ray_actors: Optional[int] = typer.Option(
        None, metavar="N", help="with --ray: how many actors load --model (default 2)"
    ),
    ray_model: list[str] = typer.Option(
        [], "--ray-model", metavar="SPEC", help="with --ray: one actor per SPEC instead, e.g. one vLLM server per GPU node (repeatable)"
    ),
    grader_timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--grader-timeout", metavar="SECONDS", help=GRADER_TIMEOUT_HELP
    ),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
):
    """Run (or resume) a self-correction run and print its report."""
    if match_budget is not None:
        if budget is not None:
            raise UserError("--budget and --match-budget: give one of them")
        budget = load_run(match_budget, db).correction_tokens_per_round()
    if ray is None and (ray_actors is not None or ray_model):
        raise UserError("--ray-actors and --ray-model: only with --ray ADDRESS (local, auto or a cluster address)")
    if ray_model and model != "embedded":
        raise UserError("--model and --ray-model: give one of them (the --ray-model specs name the model)")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    ) as progress:
        bar = progress.add_task("loading", total=None)

        def on_start(run_id: str, total: int, done: int) -> None:
            progress.update(bar, description=f"run {run_id}", total=total, completed=done)

        backend = None
        if ray is not None:
            from .models.ray_pool import ray_backend

            backend = ray_backend(model, ray, ray_actors, ray_model)
            model = ray_model[0] if ray_model else model  # the run's model spec; the backend names every actor's
        result = evaluate(
            task=task, model=model, strategy=strategy, rounds=rounds, samples=samples, temperature=temperature,
            limit=limit, seed=seed, data=data, task_options=parse_task_options(task_opt, field, grader), max_tokens=max_tokens,
            estimator=estimator, cache=not no_cache, critic_model=critic_model, icl_confident=icl_confident,
            icl_critical=icl_critical, budget=budget, db=db, on_start=on_start, on_turn=lambda: progress.advance(bar),
            backend=backend, grader_timeout=grader_timeout,
        )
    report = result.report()
    if as_json:
        print(json.dumps(report))
        return
    print_report(report, out)
    out.print(
        f"\nstored in {result.db_path} as run {result.run_id} ({result.generated} "
        f"{'scoring passes' if result.estimator == 'exact' else 'turns'} generated now, "
        f"{result.cache_hits} from the response cache). "
        f"See it again: selfcorrect report {result.run_id}"
    )


@app.command()
@user_errors
def report(
    run_ids: list[str] = typer.Argument(..., help="run ids (or unique prefixes); `selfcorrect runs` lists them"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object (a list for several runs)"),
    html: Optional[Path] = typer.Option(
        None, "--html", help="write one self-contained HTML file with plots and the items that flipped"
    ),
):
    """Show stored runs' metrics, or write them as one HTML file."""
    if html is not None and as_json:
        raise UserError("--html and --json: choose one")
    if html is not None and not html.parent.is_dir():
        raise UserError(f"--html {html}: no such directory {html.parent}")
    results = [load_run(run_id, db) for run_id in run_ids]
    if html is not None:
        page = render_html(results)  # built whole before the file is opened: a failure writes nothing
        html.write_text(page, encoding="utf-8")
        out.print(f"wrote the report of {len(results)} run(s) to {html}", highlight=False, soft_wrap=True)
    elif as_json:
        reports = [result.report() for result in results]
        print(json.dumps(reports[0] if len(reports) == 1 else reports))
    else:
        for result in results:
            print_report(result.report(), out)


@app.command()
@user_errors
def compare(
    run_ids: list[str] = typer.Argument(..., help="two or more run ids (or unique prefixes) on the same items"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as one JSON object"),
):
    """Compare runs on their common items: accuracy, CL, CS, RSS, cost, and paired tests."""
    result = compare_runs([load_run(run_id, db) for run_id in run_ids])
    if as_json:
        print(json.dumps(result))
    else:
        print_comparison(result, out)


@app.command("clear-cache")
@user_errors
def clear_cache(db: Optional[Path] = typer.Option(None, help=DB_HELP)):
    """Forget every cached reply in the store (runs and their turns stay)."""
    store = Store(db or default_db_path(), create=False)
    try:
        out.print(f"removed {store.clear_cache()} cached replies from {store.path}")
    finally:
        store.close()


@app.command()
@user_errors
def runs(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
):
    """List the runs in the store."""
    store = Store(db or default_db_path(), create=False)
    try:
        rows = store.runs()
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"Runs in {store.path}")
    for column in ("run", "created", "task", "model", "strategy", "rounds", "samples", "items", "turns"):
        table.add_column(column)
    for row in rows:
        config = row["config"]
        table.add_row(
            row["run_id"], row["created_at"], config["task"]["task"], config["model"], config["strategy"],
            str(config["rounds"]), str(config["samples"]), str(row["n_items"]), str(row["n_turns"]),
        )
    out.print(table)


@app.command()
@user_errors
def tasks(
    model: str = typer.Option("embedded", help="model to check the exact estimator against"),
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
):
    """List the tasks: item count, grader, answer format, and whether the exact estimator is available."""
    check_model_spec(model)
    rows = [
        {
            "task": name,
            # Only built-in tasks are counted: the others would need a file or the network.
            "items": len(load_task(name).items) if entry.builtin else None,
            "grader": entry.grader,
            "answer": entry.answer,
            "exact_estimator": entry.multiple_choice and can_score_options(model),
            "description": entry.description,
        }
        for name, entry in sorted(TASKS.items())
    ]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"Tasks (exact estimator checked for --model {model})")
    for column in ("task", "items", "grader", "answer format", "exact"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["task"], "from --data" if row["items"] is None else str(row["items"]), row["grader"], row["answer"],
            "yes" if row["exact_estimator"] else "no",
        )
    out.print(table)
    for row in rows:
        out.print(f"[bold]{row['task']}[/bold]: {row['description']}", highlight=False)


@app.command()
@user_errors
def grade(
    task: str = typer.Option(..., help=TASK_HELP),
    item: str = typer.Option(..., help="item id (as in `selfcorrect export`)"),
    response: Path = typer.Option(..., help="file holding the reply to grade; - reads standard input"),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    task_opt: list[str] = typer.Option([], "--task-opt", help=TASK_OPT_HELP),
    field: list[str] = typer.Option([], "--field", help=FIELD_HELP),
    grader: Optional[str] = typer.Option(None, help=GRADER_HELP),
    grader_timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--grader-timeout", metavar="SECONDS", help=GRADER_TIMEOUT_HELP
    ),
):
    """Grade one reply to one item and print {"correct", "reason", "answer"} as JSON."""
    check_grader_timeout(grader_timeout)
    the_task = load_task(task, data, parse_task_options(task_opt, field, grader))
    found = [candidate for candidate in the_task.items if candidate.id == item]
    if not found:
        raise UserError(f"--item {item}: no such item in task '{task}' (ids look like {the_task.items[0].id!r})")
    if str(response) != "-" and not response.is_file():
        raise UserError(f"--response {response}: no such file; give a file with the reply, or - for standard input")
    raw = sys.stdin.buffer.read() if str(response) == "-" else response.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--response {response}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x}); "
                        "save the reply as UTF-8") from None
    with GraderPool(grader_timeout, processes=1) as graders:
        verdict = graders.limit(the_task.grade)(found[0], text)
    print(json.dumps({"correct": verdict.correct, "reason": verdict.reason, "answer": verdict.answer,
                      "item_id": item, "extra": verdict.extra}))


@app.command()
@user_errors
def regrade(
    run_id: str = typer.Argument(..., help="run id (or a unique prefix)"),
    all_turns: bool = typer.Option(False, "--all", help="also regrade turns that today's graders graded already"),
    grader_timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--grader-timeout", metavar="SECONDS", help=GRADER_TIMEOUT_HELP
    ),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Grade a stored run's replies again with today's graders (nothing is generated)."""
    summary = regrade_run(run_id, db, grader_timeout, all_turns)
    if as_json:
        print(json.dumps(summary))
        return
    if summary["note"]:
        out.print(f"run {summary['run_id']}: {summary['note']}", highlight=False, soft_wrap=True)
        return
    parts = [
        f"run {summary['run_id']}: regraded {summary['regraded']} turn(s) with grader version {summary['grader_version']}",
        f"{summary['changed']} verdict(s) changed ({summary['now_right']} now right, {summary['now_wrong']} now wrong)",
    ]
    if summary["timeouts"]:
        parts.append(f"{summary['timeouts']} grade(s) timed out")
    if summary["skipped"]:
        parts.append(f"{summary['skipped']} turn(s) already graded by this version left as they were (--all regrades them)")
    out.print("; ".join(parts), highlight=False, soft_wrap=True)


@app.command()
def strategies():
    """List the correction strategies."""
    table = Table(title="Strategies")
    table.add_column("strategy")
    table.add_column("what the model is told after its answer")
    for name, strategy in sorted(all_strategies().items()):
        table.add_row(name, strategy.description)
    out.print(table)


@app.command()
def models():
    """List the model specs --model accepts."""
    table = Table(title="Model specs")
    table.add_column("spec")
    table.add_column("what it runs")
    for spec, description in MODEL_SPECS.items():
        table.add_row(spec, description)
    out.print(table)


EXPORT_FORMATS = ("jsonl", "json", "csv")


@app.command()
@user_errors
def export(
    run_id: str = typer.Argument(..., help="run id (or a unique prefix)"),
    format: str = typer.Option("jsonl", "--format", help="jsonl | json | csv"),
    output: Optional[Path] = typer.Option(None, help="file to write (default: standard output)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
):
    """Write every turn of a run, one record per turn (per scoring pass for the exact estimator)."""
    import io

    if format not in EXPORT_FORMATS:
        raise UserError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    if output is not None and output.is_dir():
        raise UserError(f"--output {output}: is a directory; give the path of the file to write")
    if output is not None and not output.parent.is_dir():
        raise UserError(f"--output {output}: no such directory {output.parent}; create it first")
    result = load_run(run_id, db)
    targets = {item["item_id"]: item["target"] for item in result.items}
    rows = result.scores if result.estimator == "exact" else result.turns
    records = [{"run_id": result.run_id, **row.to_json(), "target": targets[row.item_id]} for row in rows]
    handle = io.StringIO(newline="")  # all of it built before the file is opened: a failure writes nothing
    if format == "jsonl":
        for record in records:
            handle.write(json.dumps(record) + "\n")
    elif format == "json":
        json.dump(records, handle)
    else:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["run_id"])
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    if output is None:
        sys.stdout.write(handle.getvalue())
        return
    try:
        with output.open("w", encoding="utf-8", newline="") as file:
            file.write(handle.getvalue())
    except OSError as error:
        raise UserError(f"--output {output}: cannot write it ({error.strerror or error})") from None


def main() -> None:
    try:
        app()
    except SystemExit as exiting:
        if exiting.code == 130 and dropped_turns_running():
            # Ctrl-C left requests running in daemon threads (the store is closed, the run's lock released):
            # exit now, without finalizing the interpreter under a backend that is still computing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise
