"""`selfcorrect reproduce`: a protocol's grid, its tasks times its second-turn prompts, for one model, and the
paper's table of Acc1, Acc2, CL, CS and RSS per task and prompt.

Every cell is an ordinary run (stored, resumable, reported like any other): running the grid again fills what
is missing. The model is loaded once for the whole grid.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from .api import Run, evaluate
from .errors import UserError
from .estimators import estimator_named
from .exact import scoring_problem
from .models import check_model_spec, load_model
from .run_config import RunConfig, with_protocol
from .protocols import YANG2025_STRATEGIES, YANG2025_TASKS
from .strategies import get_strategy

# The paper's tasks that have a source without --data: our gsm8k and ifeval read the Hub, humaneval its package.
NEEDS_DATA = ("commonsense_qa", "mmlu", "boolq")


def run_grid(
    model: str, tasks: list[str], *, protocol: str = "yang2025", strategies: tuple[str, ...] = YANG2025_STRATEGIES,
    data: dict[str, Path] | None = None, limit: int | None = None, samples: int | None = None,
    max_tokens: int | None = None, seed: int = 0, concurrency: int | None = None, rpm: float | None = None,
    tpm: float | None = None,
    db: str | Path | None = None, on_cell: Callable[[str, str], None] = lambda task, strategy: None,
    on_note: Callable[[str], None] = lambda line: None,
    on_start: Callable[[str, int, int], None] = lambda run_id, total, done: None,
    on_turn: Callable[[], None] = lambda: None,
) -> list[tuple[str, str, Run]]:
    """(task, strategy, run) for every cell of the grid, in order. Everything is checked before the first run:
    the tasks (the paper's names, `YANG2025_TASKS`), the strategies, the data files and the model spec.
    `samples` overrides the protocol's samples per question of the sampled tasks, `max_tokens` its cap on new
    tokens per reply (both to shrink the grid). `concurrency`, `rpm` and `tpm` are an openai: model's limits, as
    for `evaluate`. A model that
    gives no option probabilities has the multiple-choice tasks sampled like the others, said through `on_note`."""
    data = data or {}
    unknown = [task for task in tasks if task not in YANG2025_TASKS]
    if unknown:
        raise UserError(f"--tasks {unknown[0]}: not in the {protocol} grid; choose from {', '.join(YANG2025_TASKS)}")
    if not tasks:
        raise UserError("--tasks: give at least one task")
    stray = sorted(set(data) - set(tasks))
    if stray:
        raise UserError(f"--data {stray[0]}=...: task {stray[0]} is not among --tasks")
    missing = [task for task in tasks if task in NEEDS_DATA and task not in data]
    if missing:  # every one at once: a first try of the whole grid should not take one refusal per file
        give = " ".join(f"--data {task}=PATH" for task in missing)
        raise UserError(f"--tasks {','.join(missing)}: need their questions: {give} (JSONL with question, choices or "
                        "a true/false answer; see docs/reproduce.md for where to get them); or leave them out of --tasks")
    for strategy in strategies:
        get_strategy(strategy)
    check_model_spec(model)
    if samples is not None and samples < 1:
        raise UserError(f"--samples {samples}: must be at least 1")
    common = RunConfig(model=model, rounds=1, limit=limit, seed=seed, db=db, concurrency=concurrency, rpm=rpm, tpm=tpm,
                       max_tokens=max_tokens)
    common.check()  # before the model is loaded
    backend = load_model(model, concurrency=concurrency, rpm=rpm, tpm=tpm)
    cells = []
    for task in tasks:
        cell = replace(common, task=YANG2025_TASKS[task], data=data.get(task))
        sampled = estimator_named(with_protocol(cell, protocol, set()).estimator).stores_replies
        # The paper scores the multiple-choice tasks from option probabilities; a model that gives none is sampled.
        problem = None if sampled else scoring_problem(backend)
        # --samples shrinks the sampled tasks only (the exact estimator draws no samples), --max-tokens every task.
        shrunk = {"samples": samples} if samples is not None and (sampled or problem) else {}
        if max_tokens is not None:  # given, so the preset's cap gives way
            shrunk["max_tokens"] = max_tokens
        config = with_protocol(replace(cell, **shrunk), protocol, set(shrunk), sampled=bool(problem))
        if problem:
            on_note(f"{task}: {model} gives no option probabilities ({problem}), so its answers are sampled "
                    f"({config.samples} per question) instead of scored exactly")
        for strategy in strategies:
            on_cell(task, strategy)
            run = evaluate(replace(config, strategy=strategy), backend=backend, on_start=on_start, on_turn=on_turn)
            cells.append((task, strategy, run))
    return cells


def table_rows(cells: list[tuple[str, str, Run]], n_boot: int = 2000) -> list[dict]:
    """The paper's table: per task and second-turn prompt, Acc1, Acc2, CL, CS and RSS with 95% intervals."""
    rows = []
    for task, strategy, run in cells:
        report = run.report(n_boot)
        acc = report["acc"] or [None, None]
        rows.append({
            "task": task, "prompt": strategy, "run_id": run.run_id, "estimator": report["estimator"],
            "items": report["n_items"], "generated": run.generated, "acc1": acc[0], "acc2": acc[1],
            "cl": report["cl"], "cs": report["cs"], "rss": report["rss"],
            "ci": {name: report["ci"].get(key) for name, key in
                   (("acc1", "acc_0"), ("acc2", "acc_1"), ("cl", "cl"), ("cs", "cs"), ("rss", "rss"))},
        })
    return rows
