"""Progress on standard error while a run goes on: Rich's bar on a terminal, plain lines elsewhere (a pipe, a log,
CI), every $SELFCORRECT_PROGRESS_SECONDS seconds. Used by the command line; training has its own (a trainer
callback, train/trainer.py) because it counts optimizer steps and losses, not turns, and says durations as
`duration` does."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import UserError
from .estimators import estimator_named
from .store import db_path, stored_config

PROGRESS_ENV = "SELFCORRECT_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 10.0


def progress_seconds() -> float:
    """Seconds between progress lines when standard error is not a terminal: $SELFCORRECT_PROGRESS_SECONDS, else
    10; 0 turns the lines off."""
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{PROGRESS_ENV}={raw}: expected the seconds between progress lines, e.g. 10 (0 turns them off)")
    return seconds


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 3 min 05 s, 1 h 02 min."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, whole = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {whole:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressLines:
    """Progress as plain lines for a standard error that is not a terminal (a pipe, a log file, CI), where Rich's
    bar shows nothing until the end: every `every` seconds while the run goes on (whether or not a turn finished
    meanwhile) a line with the count, the share, the time so far and an estimate of the time left, and a last line
    when it ends. The first of them is preceded by one naming the run, its size and what was stored before. A run
    that ends within `every` seconds prints none, so a quick failure stays the one line of its error."""

    def __init__(self, console: Console, every: float, unit_of: Callable[[str], str]):
        self.console, self.every, self.unit_of = console, every, unit_of
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.run_id, self.unit, self.total, self.done, self.before, self.started = "", "turns", 0, 0, 0, 0.0
        self.printed = False

    def start(self, run_id: str, total: int, done: int) -> None:
        with self.lock:
            self.run_id, self.unit, self.total, self.done, self.before = run_id, self.unit_of(run_id), total, done, done
            self.started = time.monotonic()
        if self.every > 0:
            self.thread = threading.Thread(target=self._every, name="progress-lines", daemon=True)
            self.thread.start()

    def advance(self) -> None:
        with self.lock:
            self.done += 1

    def _every(self) -> None:
        while not self.stopped.wait(self.every):
            self._line()

    def _line(self, last: bool = False) -> None:
        with self.lock:
            done, total, elapsed = self.done, self.total, time.monotonic() - self.started
            lines = []
            if not self.printed:
                lines.append(f"run {self.run_id} started: {total} {self.unit}, {self.before} already stored")
            share = f" ({100 * done // total}%)" if total else ""
            made = done - self.before
            if last:
                left = "done"
            elif made and total > done:
                left = f"about {duration(elapsed / made * (total - done))} left"
            else:
                left = "time left not known yet" if total > done else "finishing"
            lines.append(f"run {self.run_id}: {done}/{total} {self.unit}{share}, {duration(elapsed)}, {left}")
            for line in lines:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.printed = True

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            if kind is None and self.printed:
                self._line(last=True)


def _unit(run_id: str, db: str | Path | None) -> str:
    """What a run's progress counts (its estimator's unit: turns, or scoring passes), read from its stored config
    as the run is going on; "turns" if it cannot be read."""
    config = stored_config(db_path(db), run_id) or {}
    try:
        return estimator_named(config["estimator"]).unit
    except KeyError:  # not readable yet, or of an estimator this version does not know
        return "turns"


@contextlib.contextmanager
def run_progress(err: Console, db: str | Path | None, every: float):
    """(on_start, on_turn) for `evaluate`: Rich's bar on a terminal, else `ProgressLines`."""
    if err.is_terminal:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=err, transient=True,
        ) as progress:
            bar = progress.add_task("loading", total=None)

            def on_start(run_id: str, total: int, done: int) -> None:
                progress.update(bar, description=f"run {run_id}", total=total, completed=done)

            yield on_start, lambda: progress.advance(bar)
        return
    with ProgressLines(err, every, lambda run_id: _unit(run_id, db)) as lines:
        yield lines.start, lines.advance
