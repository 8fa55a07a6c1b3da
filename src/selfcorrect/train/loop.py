"""The closed loop: measure the base model on training items, build training data from that run, fine-tune, and
measure the base and every trained model on held-out items with the same strategy, compared with paired tests.

Every step is one of the ordinary ones (`evaluate`, `build_rows`, `train`), so each resumes as they do: a
loop killed anywhere picks up where it stopped when the same command is run again. The two parts of the items
come from one seeded split by question content (`--split train` / `--split test`), so no held-out question is a
training question; the trained model's evaluation checks that again against its training card.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager

from ..api import Run, evaluate
from ..run_config import RunConfig, run_config
from ..compare import compare_runs
from ..errors import UserError
from ..files import write_atomically
from ..improve_page import render_improvement
from ..models.spec import ModelSpec
from ..models.trained import CARD_FILE
from ..strategies import fixed_prompt_strategies, get_strategy
from .data import DataSettings, build_rows, check_gold_clt, get_recipe, summary_line, write_rows
from .settings import Hyperparameters

PAGE = "improve.html"  # in the output folder, beside the adapters

Progress = Callable[[], ContextManager[tuple[Callable, Callable]]]


def _no_progress() -> ContextManager[tuple[Callable, Callable]]:
    return contextlib.nullcontext((lambda run_id, total, done: None, lambda: None))


def improve(
    output: str | Path,
    recipes: list[str],
    task: str = "arithmetic",
    task_options: dict[str, str] | None = None,
    data: str | Path | None = None,
    model: str = "embedded",
    strategy: str = "reask",
    train_limit: int | None = None,
    test_limit: int | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    split_seed: int = 0,
    test_share: float = 0.5,
    data_settings: DataSettings = DataSettings(),
    seed: int = 0,
    db: str | Path | None = None,
    isolation: str = "auto",
    train_options: dict | None = None,
    progress: Progress = _no_progress,
    say: Callable[[str], None] = lambda line: None,
) -> dict:
    """Run the loop for each recipe (training data in `output/<recipe>.jsonl`, the adapter in `output/<recipe>/`,
    so the trained model is `lora:output/<recipe>`) and return
    {"train_run", "base_run", "trained_runs": {recipe: run id}, "cards": {recipe: card}, "comparison", "page"}, the
    page being `output/improve.html` (improve_page.py), written last.

    The training run samples `samples` first answers per item at `temperature` (every sample is a row source);
    the held-out runs are greedy, one sample per item, so base and trained models are compared reply for reply.
    Every run, and an rl training's rewards, grade model-written code inside `isolation`'s boundary (as `evaluate`
    takes it).
    """
    for recipe in recipes:
        get_recipe(recipe)
    data_settings.check()
    if data_settings.clt_source == "gold":
        check_gold_clt(get_strategy(strategy), f"--strategy {strategy}")
    if not recipes:
        raise UserError("--recipe: give at least one recipe")
    if len(set(recipes)) != len(recipes):
        raise UserError("--recipe: each recipe once")
    from .trainer import CHECKPOINTS, check_trainable, init_adapter, train  # the train extra; checked first

    check_trainable(model)
    try:
        settings = Hyperparameters(seed=seed, **(train_options or {}))
    except TypeError as error:
        raise UserError(f"improve: {error}") from None
    settings.check()
    for recipe in recipes:  # what `data` and `train` would refuse after the measuring, refused now
        chosen = get_recipe(recipe)
        settings.check_for(chosen.row_format)
        if chosen.fixed_prompt and not get_strategy(strategy).fixed_prompt:
            raise UserError(f"--recipe {recipe}: needs a strategy whose correction turn is a fixed prompt "
                            f"({fixed_prompt_strategies()}), not --strategy {strategy}")
    if settings.init is not None:
        init_adapter(settings.init, ModelSpec.of(model).absolute())
    output = Path(output).expanduser()
    # The held-out runs are greedy, one sample per item; the training run samples as asked.
    held_out = run_config(task=task, task_options=task_options, data=data, model=model, strategy=strategy, rounds=1,
                          seed=seed, db=db, split="test", split_seed=split_seed, test_share=test_share, limit=test_limit,
                          isolation=isolation)
    held_out.check()  # a bad --test-limit is refused now, not after the training

    def measure(label: str, config: RunConfig) -> Run:
        say(f"{label}: {config.model} on the {config.split} part")
        with progress() as (on_start, on_turn):
            run = evaluate(config, on_start=on_start, on_turn=on_turn)
        say(_reused(run))
        return run

    train_run = measure("1. measure the training items", replace(held_out, split="train", limit=train_limit,
                                                                  samples=samples, temperature=temperature))
    cards = {}
    for recipe in recipes:
        rows_file, adapter = output / f"{recipe}.jsonl", output / recipe
        rows, summary = build_rows([train_run], recipe, data_settings, seed=seed)
        output.mkdir(parents=True, exist_ok=True)
        write_rows(rows, rows_file)
        say(f"2. {recipe} data: {rows_file} ({summary_line(summary)})")
        finished = (adapter / CARD_FILE).is_file()
        if not finished:
            resuming = ", resuming the unfinished training there" if (adapter / CHECKPOINTS).is_dir() else ""
            say(f"3. train {recipe}: {model} into {adapter}{resuming}")
        cards[recipe] = train(rows_file, model, adapter, seed=seed, isolation=isolation, **(train_options or {}))
        if finished:  # said once train has checked the card holds these settings (it refuses other ones)
            say(f"3. train {recipe}: found the finished training in {adapter}, not repeated")
    base_run = measure("4. measure the base", held_out)
    trained = {recipe: measure(f"5. measure {recipe}", replace(held_out, model=f"lora:{output / recipe}"))
               for recipe in recipes}
    result = {"train_run": train_run.run_id, "base_run": base_run.run_id,
              "trained_runs": {recipe: run.run_id for recipe, run in trained.items()}, "cards": cards,
              "comparison": compare_runs([base_run, *trained.values()], seed=seed), "page": str(output / PAGE)}
    write_atomically(output / PAGE, render_improvement(result))
    say(f"6. the page: {output / PAGE}")
    return result


def _reused(run: Run) -> str:
    """What a measurement took from earlier work, so that a loop run again shows it repeated nothing."""
    done = len(run.turns if run.estimation.stores_replies else run.scores)
    before = done - run.generated - run.cache_hits
    return (f"   run {run.run_id}: {done} {run.estimation.unit}, {before} already stored, {run.cache_hits} from the "
            f"response cache, {run.generated} generated")
