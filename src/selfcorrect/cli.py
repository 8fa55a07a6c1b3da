"""The `selfcorrect` command line: a thin layer over `selfcorrect.api`."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .api import delete_run, evaluate, grade_reply, load_run
from .export import write_export
from .files import check_output_file, write_atomically
from .api import regrade as regrade_run
from .compare import compare_runs
from .engine import dropped_turns_running
from .errors import UserError
from .grader_pool import DEFAULT_TIMEOUT_S
from .models import MODEL_SPECS, check_model_spec
from .models.base import SERVER_DEFAULT
from .run_config import RunConfig, with_protocol
from .progress import progress_seconds, run_progress
from .report import grader_note, print_comparison, print_improvement, print_report, print_reproduction, print_table
from .store import Store, db_path, default_db_path, follow_up
from .strategies import all_strategies
from .tasks import all_tasks, load_task
from .train.data import DataSettings
from .train.settings import Hyperparameters


class _FlagsShowNoValue:
    """Typer 0.29's help prints each option's type after it, `<bool>` after a flag, which takes no value; it
    prints an option's metavar instead when one is set, so every flag (--help too) gets an empty one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsShowNoValue, typer.core.TyperCommand):
    pass


class _Group(_FlagsShowNoValue, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    """The application, whose commands are `_Command`s."""

    def command(self, *args, cls=_Command, **kwargs):
        return super().command(*args, cls=cls, **kwargs)


app = _App(
    cls=_Group,
    help="Measure how well a language model corrects itself: accuracy per round, CL, CS, RSS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Output that is not a terminal (a pipe, a file) is not wrapped at Rich's default of 80 columns: tables keep their
# natural width, so a line of a table is a row (COLUMNS, when set, still sets the width). Tables never cut an id or
# a figure at any width (`print_table`).
WIDTH_WHEN_NOT_A_TERMINAL = 100_000


def _stdout_console() -> Console:
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(width=WIDTH_WHEN_NOT_A_TERMINAL)


out = _stdout_console()
err = Console(stderr=True)

DB_HELP = f"run store (SQLite); default $SELFCORRECT_DB or {default_db_path()}"


def installed_version() -> str:
    """The version of the installed distribution, else (a source tree not installed) the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfcorrect")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _print_version(asked: bool) -> None:
    if asked:
        print(f"selfcorrect {installed_version()}")
        raise typer.Exit()


@app.callback()
def options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
):
    # The console is made again for each command, from the streams and COLUMNS it runs with: a command invoked in
    # a longer-lived process (Typer's CliRunner, a notebook) prints as one started from a shell would.
    global out
    out = _stdout_console()


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
MODEL_HELP = "embedded | llamacpp:PATH.gguf | openai:MODEL@URL | hf:PATH_OR_ID | lora:DIR (a trained adapter)"
DATA_HELP = "data file (JSONL, CSV, Parquet) or hf:DATASET[:CONFIG][@SPLIT] for tasks that read one"
TASK_OPT_HELP = "task option KEY=VALUE (repeatable)"
FIELD_HELP = "custom task: map fields to columns, NAME=COLUMN[,NAME=COLUMN] (question, answer, choices, id, solution)"
GRADER_HELP = "custom task: exact | number | math | choice | code"
ISOLATION_HELP = (
    "what model-written code runs inside: auto (bubblewrap where it works here, else the process-only sandbox; the "
    "report says which) | strict (bubblewrap or refuse) | process (never bubblewrap)"
)
CONCURRENCY_HELP = (
    "openai: models: the most requests in flight (default 64); lowered while the server answers 429 or 503 and "
    "raised again after successes (see docs/backends.md)"
)
RPM_HELP = "openai: models: a ceiling on requests per minute (hosted APIs' rate limits)"
TPM_HELP = "openai: models: a ceiling on prompt + completion tokens per minute (estimated before each reply)"
GRADER_TIMEOUT_HELP = (
    "seconds one grade may take; a grade that takes longer is recorded as wrong ('grader timeout'). "
    "Code graders are bounded by the sandbox's own timeout instead"
)


def options_from(settings: type, into: str) -> Callable[[Callable], Callable]:
    """A decorator: the command gets a flag for each field of the dataclass `settings` that it does not declare
    itself (flag, default and help from the field's metadata), handed to it together as the dict `into`. The
    defaults of such settings (training hyperparameters, data settings) live in one place, and every command
    that takes them takes all of them."""
    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command).parameters
        added = [setting for setting in fields(settings) if setting.name not in own]
        types = typing.get_type_hints(settings)

        @functools.wraps(command)
        def with_options(**given):
            return command(**given | {into: {setting.name: given.pop(setting.name) for setting in added}})

        options = [inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[setting.name],
                                     default=typer.Option(setting.default, setting.metadata["flag"],
                                                          help=setting.metadata["help"]))
                   for setting in added]
        with_options.__signature__ = inspect.Signature([*(p for p in own.values() if p.name != into), *options])
        with_options.__annotations__ = {**typing.get_type_hints(command), **{p.name: p.annotation for p in options}}
        with_options.__annotations__.pop(into, None)
        del with_options.__wrapped__  # Typer reads the signature above, not the command's own
        return with_options

    return decorate


def parse_temperature(text: str | None) -> float | str | None:
    """--temperature: a number, or "server" to leave sampling to an OpenAI-compatible server's defaults."""
    if text is None or text == SERVER_DEFAULT:
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--temperature {text}: give a number between 0 and 2, or {SERVER_DEFAULT} (an openai: "
                        "model's own sampling defaults)") from None


@app.command()
@user_errors
def run(
    task: str = typer.Option("arithmetic", help=TASK_HELP),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    strategy: str = typer.Option("reask", help="correction strategy; `selfcorrect strategies` lists them"),
    rounds: int = typer.Option(1, help="correction rounds after the first answer"),
    samples: Optional[int] = typer.Option(None, help="first answers per item (the sampling estimator; default 1)"),
    temperature: Optional[str] = typer.Option(
        None, help="sampling temperature (default 0: greedy), or server: an openai: model's own sampling defaults"
    ),
    limit: Optional[int] = typer.Option(None, help="use only the first N items"),
    seed: int = typer.Option(0, help="seed for sampling and bootstrap"),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    task_opt: list[str] = typer.Option([], "--task-opt", help=TASK_OPT_HELP),
    field: list[str] = typer.Option([], "--field", help=FIELD_HELP),
    grader: Optional[str] = typer.Option(None, help=GRADER_HELP),
    max_tokens: Optional[int] = typer.Option(None, help="cap on tokens per reply (default: the task's)"),
    estimator: Optional[str] = typer.Option(
        None, help="exact (option log-probs, multiple choice) | sampling | auto (default): exact where possible"
    ),
    protocol: Optional[str] = typer.Option(
        None, help="yang2025: Yang et al.'s prompts, samples and decoding for the task; flags you give win "
        "(see docs/reproduce.md)"
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
    split: Optional[str] = typer.Option(
        None, help="train | test: only the items of that part of a seeded split by question content (before --limit)"
    ),
    split_seed: int = typer.Option(0, help="with --split: the split's seed"),
    test_share: float = typer.Option(0.5, help="with --split: the share of questions in the test part"),
    allow_train_items: bool = typer.Option(
        False, "--allow-train-items", help="let a trained model (lora:DIR) be measured on questions it was trained on"
    ),
    isolation: str = typer.Option("auto", help=ISOLATION_HELP),
    concurrency: Optional[int] = typer.Option(None, metavar="N", help=CONCURRENCY_HELP),
    rpm: Optional[float] = typer.Option(None, "--rpm", help=RPM_HELP),
    tpm: Optional[float] = typer.Option(None, "--tpm", help=TPM_HELP),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
):
    """Run (or resume) a self-correction run and print its report.

    Off a terminal, progress lines go to stderr every 10 s; SELFCORRECT_PROGRESS_SECONDS sets the interval (0: none).
    """
    every = progress_seconds()
    if match_budget is not None:
        if budget is not None:
            raise UserError("--budget and --match-budget: give one of them")
        budget = load_run(match_budget, db).correction_tokens_per_round()
    if ray is None and (ray_actors is not None or ray_model):
        raise UserError("--ray-actors and --ray-model: only with --ray ADDRESS (local, auto or a cluster address)")
    if ray_model and model != "embedded":
        raise UserError("--model and --ray-model: give one of them (the --ray-model specs name the model)")
    # The flags left unset fall to the protocol's preset, if any, else to RunConfig's defaults.
    optional = {"samples": samples, "temperature": parse_temperature(temperature), "max_tokens": max_tokens,
                "estimator": estimator}
    given = {name: value for name, value in optional.items() if value is not None}
    config = with_protocol(RunConfig(
        task=task, model=ray_model[0] if ray_model else model, strategy=strategy, rounds=rounds, limit=limit,
        seed=seed, data=data, task_options=parse_task_options(task_opt, field, grader), cache=not no_cache,
        critic_model=critic_model, icl_confident=icl_confident, icl_critical=icl_critical, budget=budget, db=db,
        grader_timeout=grader_timeout, split=split, split_seed=split_seed, test_share=test_share,
        allow_train_items=allow_train_items, isolation=isolation, concurrency=concurrency, rpm=rpm, tpm=tpm, **given,
    ), protocol, set(given))
    config.check()  # before a Ray cluster is started or joined
    with run_progress(err, db, every) as (on_start, on_turn):
        backend = None
        if ray is not None:
            from .models.ray_pool import ray_backend

            # The run's model spec is the first actor's; the backend's identity names every actor's.
            backend = ray_backend(model, ray, ray_actors, ray_model, concurrency)
        result = evaluate(config, backend=backend, on_start=on_start, on_turn=on_turn)
    report = result.report()
    if as_json:
        print(json.dumps(report))
        return
    print_report(report, out)
    out.print(
        f"\nstored in {result.db_path} as run {result.run_id} ({result.generated} "
        f"{result.estimation.unit} generated now, "
        f"{result.cache_hits} from the response cache). "
        f"See it again: {follow_up(f'report {result.run_id}', result.db_path)}",
        soft_wrap=True, markup=False,
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
    if html is not None:
        check_output_file(html, "--html")
    results = [load_run(run_id, db) for run_id in run_ids]
    if html is not None:
        from .html_report import render_html  # plotly: imported only for an HTML report

        write_atomically(html, render_html(results), "--html")
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
    runs = [load_run(run_id, db) for run_id in run_ids]
    result = compare_runs(runs)
    if as_json:
        print(json.dumps(result))
    else:
        print_comparison(result, out, {run.run_id: grader_note(run.config) for run in runs})


def _recipes_help() -> str:
    from .train.data import all_recipes

    return "; ".join(f"{name}: {recipe.description}" for name, recipe in all_recipes().items())


@app.command()
@user_errors
@options_from(DataSettings, "settings")
def data(
    run_ids: list[str] = typer.Argument(..., help="runs to build from (ids or unique prefixes), all of one task"),
    recipe: str = typer.Option(..., help=_recipes_help()),
    output: Path = typer.Option(..., help="the JSONL file to write (TRL's conversational formats)"),
    seed: int = typer.Option(0, help="seed of which rows cct leaves out or repeats to reach --clt-share"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    settings: dict = None,
):
    """Build training data from stored runs: every sample and correction round a source of rows, gold solutions
    as targets."""
    from .train.data import build_rows, summary_line, write_rows

    rows, summary = build_rows([load_run(run_id, db) for run_id in run_ids], recipe, DataSettings(**settings), seed=seed)
    write_rows(rows, output)
    out.print(f"wrote {output}: {summary_line(summary)}", highlight=False, soft_wrap=True)


@app.command("train")
@user_errors
@options_from(Hyperparameters, "hyperparameters")
def train_command(
    data: Path = typer.Argument(..., help="training data (JSONL) written by `selfcorrect data`"),
    model: str = typer.Option("embedded", help="base model: embedded | llamacpp:PATH.gguf | hf:PATH_OR_ID"),
    output: Path = typer.Option(..., help="directory for the adapter, its training card and checkpoints"),
    isolation: str = typer.Option("auto", help=ISOLATION_HELP + "; for the code rl rewards grade"),
    hyperparameters: dict = None,
):
    """Fine-tune a LoRA adapter on training data (needs the train extra); run it again to resume."""
    from .train.trainer import train

    card = train(data, model, output, isolation=isolation, **hyperparameters)
    losses = card["losses"]
    if card["data"]["format"] == "episode":  # rl: what the rollouts' attempts earned, first and last log
        measured = (f"attempt 1 right {losses[0]['r1']:.3f} -> {losses[-1]['r1']:.3f}, attempt 2 right "
                    f"{losses[0]['r2']:.3f} -> {losses[-1]['r2']:.3f} of the rollouts, {card['seconds']:.0f} s")
    else:
        measured = (f"loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}, {card['seconds']:.0f} s, "
                    f"{card['tokens_per_second']:.0f} tokens/s")
    out.print(
        f"adapter in {output} (model spec lora:{output}): {card['training']['steps']} steps on {card['data']['rows']} "
        f"{card['data']['format']} rows, {measured}",
        highlight=False, soft_wrap=True,
    )


@app.command()
@user_errors
@options_from(Hyperparameters, "hyperparameters")
@options_from(DataSettings, "data_settings")
def improve(
    output: Path = typer.Option(..., help="folder for each recipe's training data and adapter (OUTPUT/RECIPE/)"),
    recipe: list[str] = typer.Option(["cct"], help="training recipe (repeatable: one adapter each); see `selfcorrect data --help`"),
    task: str = typer.Option("arithmetic", help=TASK_HELP),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    task_opt: list[str] = typer.Option([], "--task-opt", help=TASK_OPT_HELP),
    field: list[str] = typer.Option([], "--field", help=FIELD_HELP),
    grader: Optional[str] = typer.Option(None, help=GRADER_HELP),
    model: str = typer.Option("embedded", help="the base model: embedded | llamacpp:PATH.gguf | hf:PATH_OR_ID"),
    strategy: str = typer.Option("reask", help="the correction strategy measured before and after training"),
    train_limit: Optional[int] = typer.Option(None, help="use only the first N items of the training part"),
    test_limit: Optional[int] = typer.Option(None, help="use only the first N items of the held-out part"),
    samples: int = typer.Option(1, help="first answers per training item (each one a source of rows)"),
    temperature: float = typer.Option(0.0, help="sampling temperature of the training run"),
    split_seed: int = typer.Option(0, help="seed of the split of the questions into training and held-out parts"),
    test_share: float = typer.Option(0.5, help="share of the questions held out"),
    seed: int = typer.Option(0, help="seed for the split of rows, the training and the bootstrap"),
    isolation: str = typer.Option("auto", help=ISOLATION_HELP + "; for every run of the loop and rl's rewards"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    hyperparameters: dict = None,
    data_settings: dict = None,
):
    """Measure, build training data, fine-tune, measure again: base and trained models on held-out items, compared."""
    from .train.loop import improve as run_loop

    every = progress_seconds()
    result = run_loop(
        output, recipe, task=task, task_options=parse_task_options(task_opt, field, grader), data=data, model=model,
        strategy=strategy, train_limit=train_limit, test_limit=test_limit, samples=samples, temperature=temperature,
        split_seed=split_seed, test_share=test_share, data_settings=DataSettings(**data_settings), seed=seed, db=db,
        isolation=isolation, train_options=hyperparameters, progress=lambda: run_progress(err, db, every),
        say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True),
    )
    if as_json:
        print(json.dumps(result))
        return
    print_improvement(result, out)
    every_pair = follow_up(f"compare {' '.join([result['base_run'], *result['trained_runs'].values()])}", db_path(db))
    out.print(f"\nruns: base {result['base_run']}, "
              + ", ".join(f"{name} {run_id}" for name, run_id in result["trained_runs"].items())
              + f"; training items measured in {result['train_run']}. Every pair: {every_pair}",
              soft_wrap=True, highlight=False, markup=False)


@app.command()
@user_errors
def reproduce(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    protocol: str = typer.Option("yang2025", help="the protocol whose grid to run (yang2025: Yang et al., ACL 2025)"),
    tasks: str = typer.Option(
        "gsm8k,humaneval,ifeval,commonsense_qa,mmlu,boolq", help="the paper's tasks to run, comma-separated"
    ),
    strategies: str = typer.Option("reask,confident,critical", help="second-turn prompts, comma-separated"),
    data: list[str] = typer.Option(
        [], "--data", metavar="TASK=PATH", help="a task's questions (repeatable); commonsense_qa, mmlu and boolq need one"
    ),
    limit: Optional[int] = typer.Option(None, help="use only the first N items of each task"),
    samples: Optional[int] = typer.Option(None, help="samples per question of the sampled tasks (the protocol's: 10)"),
    max_tokens: Optional[int] = typer.Option(None, help="cap on new tokens per reply (the protocol's: 2,048; 1,024 on llama.cpp)"),
    seed: int = typer.Option(0, help="seed for sampling and bootstrap"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    html: Optional[Path] = typer.Option(None, help="also write every run of the grid as one HTML report (CL-CS plane)"),
    concurrency: Optional[int] = typer.Option(None, metavar="N", help=CONCURRENCY_HELP),
    rpm: Optional[float] = typer.Option(None, "--rpm", help=RPM_HELP),
    tpm: Optional[float] = typer.Option(None, "--tpm", help=TPM_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the table as one JSON array"),
):
    """Run a paper's grid (tasks x second-turn prompts) on one model and print its table; resumable."""
    from .reproduce import run_grid, table_rows

    files = {}
    for pair in data:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--data {pair}: give TASK=PATH, e.g. --data boolq=boolq.jsonl")
        files[name.strip()] = Path(path).expanduser()
    if html is not None:
        check_output_file(html, "--html")
    every = progress_seconds()
    say = lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    with run_progress(err, db, every) as (on_start, on_turn):
        cells = run_grid(
            model, [task.strip() for task in tasks.split(",") if task.strip()], protocol=protocol,
            strategies=tuple(name.strip() for name in strategies.split(",") if name.strip()), data=files,
            limit=limit, samples=samples, max_tokens=max_tokens, seed=seed, db=db, on_start=on_start, on_turn=on_turn,
            concurrency=concurrency, rpm=rpm, tpm=tpm,
            on_cell=lambda task, strategy: say(f"{task} x {strategy}"), on_note=say,
        )
    rows = table_rows(cells)
    if html is not None:
        from .html_report import render_html  # plotly: imported only for an HTML report

        write_atomically(html, render_html([run for _, _, run in cells]), "--html")
    if as_json:
        print(json.dumps(rows))
        return
    print_reproduction(rows, model, protocol, out)
    out.print(f"\nruns: {' '.join(row['run_id'] for row in rows)}" + (f"; HTML report: {html}" if html else ""),
              soft_wrap=True, highlight=False)


@app.command("clear-cache")
@user_errors
def clear_cache(db: Optional[Path] = typer.Option(None, help=DB_HELP)):
    """Forget every cached reply in the store (runs and their turns stay)."""
    store = Store(db_path(db), create=False)
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
    store = Store(db_path(db), create=False)
    try:
        rows = store.runs()
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"Runs in {store.path}")
    for column in ("run", "created", "task", "model", "strategy", "rounds", "samples", "items", "turns",
                   "failed cells"):
        table.add_column(column)
    for row in rows:
        config = row["config"]
        table.add_row(
            row["run_id"], row["created_at"], config["task"]["task"], config["model"], config["strategy"],
            str(config["rounds"]), str(config["samples"]), str(row["n_items"]), str(row["n_turns"]),
            str(row["n_failed"]),
        )
    print_table(out, table, text=("task", "model", "strategy"))


@app.command()
@user_errors
def delete(
    run_id: str = typer.Argument(..., help="run id (or a unique prefix)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
):
    """Delete a run: its turns, items, scores and failed cells (the response cache keeps its replies)."""
    deleted = delete_run(run_id, db)
    rows = deleted["deleted"]
    out.print(f"deleted run {deleted['run_id']} from {deleted['db']}: {rows['items']} items, {rows['turns']} turns, "
              f"{rows['option_scores']} scoring passes, {rows['failed_cells']} failed cells (the response cache "
              "keeps its replies)", highlight=False, markup=False, soft_wrap=True)


@app.command()
@user_errors
def tasks(
    model: str = typer.Option("embedded", help="model to check the exact estimator against"),
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
):
    """List the tasks: item count, grader, answer format, and whether the exact estimator is available."""
    scores_options = check_model_spec(model).can_score_options
    rows = [
        {
            "task": name,
            # Only built-in tasks are counted: the others would need a file or the network.
            "items": len(load_task(name).items) if entry.builtin else None,
            "grader": entry.grader,
            "answer": entry.answer,
            "exact_estimator": entry.multiple_choice and scores_options,
            "description": entry.description,
        }
        for name, entry in sorted(all_tasks().items())
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
    print_table(out, table, text=("answer format",))
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
    isolation: str = typer.Option("auto", help=ISOLATION_HELP),
):
    """Grade one reply to one item and print {"correct", "reason", "answer"} as JSON."""
    if str(response) != "-" and not response.is_file():
        raise UserError(f"--response {response}: no such file; give a file with the reply, or - for standard input")

    def reply() -> str:
        raw = sys.stdin.buffer.read() if str(response) == "-" else response.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"--response {response}: not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}); "
                            "save the reply as UTF-8") from None

    verdict = grade_reply(task, item, reply, data=data, task_options=parse_task_options(task_opt, field, grader),
                          grader_timeout=grader_timeout, isolation=isolation)
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
    task: Optional[str] = typer.Option(
        None, help="only for runs stored before runs kept how their task was loaded: the run's --task"
    ),
    data: Optional[Path] = typer.Option(None, help="with --task: the run's --data"),
    task_opt: list[str] = typer.Option([], "--task-opt", help="with --task: the run's --task-opt (repeatable)"),
    field: list[str] = typer.Option([], "--field", help="with --task: the run's --field"),
    grader: Optional[str] = typer.Option(None, help="with --task: the run's --grader"),
    isolation: str = typer.Option("auto", help=ISOLATION_HELP),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Grade a stored run's replies again with today's graders (nothing is generated)."""
    if task is None and (data is not None or task_opt or field or grader is not None):
        raise UserError("--data, --task-opt, --field and --grader: only with --task (for a run stored before runs "
                        "kept how their task was loaded)")
    given = None if task is None else {"task": task, "data": data, "options": parse_task_options(task_opt, field, grader)}
    summary = regrade_run(run_id, db, grader_timeout, all_turns, given, isolation)
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
    print_table(out, table, text=("what the model is told after its answer",))


@app.command()
def models():
    """List the model specs --model accepts."""
    table = Table(title="Model specs")
    table.add_column("spec")
    table.add_column("what it runs")
    for spec, description in MODEL_SPECS.items():
        table.add_row(spec, description)
    print_table(out, table, text=("what it runs",))


@app.command()
@user_errors
def export(
    run_id: str = typer.Argument(..., help="run id (or a unique prefix)"),
    format: str = typer.Option(
        "jsonl", "--format", help="jsonl | json | csv | yang2025 (the log lines of Yang et al.'s scripts, for their analysis) | "
        "inspect (an Inspect AI eval log: .eval, or JSON when --output ends in .json; needs the inspect extra)"
    ),
    output: Optional[Path] = typer.Option(None, help="file to write (default: standard output)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
):
    """Write every turn of a run, one record per turn (per scoring pass for the exact estimator)."""
    write_export(run_id, format, output, db)


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
