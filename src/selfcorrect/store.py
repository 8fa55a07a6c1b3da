"""The run store: one SQLite file, the single source of truth for runs, their items and every turn.

A turn row is keyed by (run, item, sample, round) and is written together with its grade in one
transaction, so a killed process leaves only whole turns behind. Resuming a run reads which cells exist
and fills the rest; the primary key makes a duplicate impossible.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import socket
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .errors import UserError
from .models.base import Completion

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,            -- JSON of everything that defines the run
    created_at TEXT NOT NULL,
    task_spec TEXT                   -- JSON {"task", "data", "options"}: how to load the task again (regrade); not part of the id
);
CREATE TABLE IF NOT EXISTS items (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    position INTEGER NOT NULL,       -- order in the task, so reports list items as the data does
    question TEXT NOT NULL,
    target TEXT NOT NULL,
    solution TEXT,                   -- the gold answer as a reply (tasks.Item.solution), for training; not in the id
    PRIMARY KEY (run_id, item_id)
);
CREATE TABLE IF NOT EXISTS turns (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    sample INTEGER NOT NULL,
    round INTEGER NOT NULL,          -- 0 is the first answer, 1.. are corrections
    messages TEXT NOT NULL,          -- JSON: the whole conversation after the round, replies included
    response TEXT NOT NULL,
    feedback TEXT NOT NULL,          -- JSON list: earlier replies within the round (a critique, say)
    answer TEXT,                     -- extracted answer, NULL when none was found
    correct INTEGER NOT NULL,
    reason TEXT NOT NULL,            -- the grader's explanation (may quote the target; never shown to the model)
    extra TEXT NOT NULL,             -- JSON: secondary scores of the grader, e.g. {"loose": true}
    notes TEXT NOT NULL,             -- JSON: what the strategy decided, e.g. {"stopped": true}
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    backend TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finish_reasons TEXT,             -- JSON list, one per reply the turn generated: stop | length | context
    served_by TEXT,                  -- JSON: what the server said it ran ({"model", "system_fingerprint"}); {} in-process
    grader_version TEXT,             -- which graders gave `correct` (see tasks.grader_version); NULL before it was kept
    PRIMARY KEY (run_id, item_id, sample, round)
);
-- Replies by cache key (see cache.py), shared by all runs in this store.
CREATE TABLE IF NOT EXISTS response_cache (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    finish_reason TEXT,
    served_by TEXT
);
-- The exact multiple-choice estimator scores instead of sampling: per item, one pass for the first
-- answer and one per option put in the model's mouth (K+1 passes), each a distribution over the labels.
CREATE TABLE IF NOT EXISTS option_scores (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    given TEXT NOT NULL,             -- '' for the first answer, else the label the model was made to give
    labels TEXT NOT NULL,            -- JSON list
    probs TEXT NOT NULL,             -- JSON list, aligned with labels
    messages TEXT NOT NULL,          -- JSON: the conversation scored
    feedback TEXT NOT NULL,          -- JSON list: replies generated within the correction round
    latency_s REAL NOT NULL,
    backend TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, item_id, given)
);
-- Cells whose request failed after every retry (a server down, say): not graded, retried by a rerun.
-- Writing the cell's turn deletes its row.
CREATE TABLE IF NOT EXISTS failed_cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    sample INTEGER NOT NULL,
    round INTEGER NOT NULL,
    error TEXT NOT NULL,             -- the backend's one-line message
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, item_id, sample, round)
);
-- What the HTTP requests of a run met, one row per call that ran it (a resumed run has several); see
-- models/rate_limit.py. Runs on other backends have none.
CREATE TABLE IF NOT EXISTS run_traffic (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    created_at TEXT NOT NULL,
    concurrency INTEGER NOT NULL,    -- the most requests in flight asked for (--concurrency)
    requests INTEGER NOT NULL,       -- HTTP requests sent, retries included
    retried INTEGER NOT NULL,        -- of them, repeats of a request that had failed
    rate_limited INTEGER NOT NULL,   -- answered HTTP 429
    unavailable INTEGER NOT NULL,    -- answered HTTP 503
    peak_in_flight INTEGER NOT NULL, -- the most requests in flight at once
    lowest_limit INTEGER NOT NULL    -- the lowest the adaptive in-flight limit went
);
"""

# Columns added after the first release, by table: a store made before them gets them (empty) when opened,
# so it still opens, reports and exports.
ADDED_COLUMNS = {
    "runs": ["task_spec TEXT"],
    "items": ["solution TEXT"],
    "turns": ["finish_reasons TEXT", "served_by TEXT", "grader_version TEXT"],
    "response_cache": ["finish_reason TEXT", "served_by TEXT"],
}


# What a second process is told to do about a run another one holds (RunLock), unless its command says otherwise.
RESUME_ADVICE = "wait for it to finish, or stop it and run the same command again to resume"

TRAFFIC_FIELDS = ("concurrency", "requests", "retried", "rate_limited", "unavailable", "peak_in_flight", "lowest_limit")


def default_location() -> Path:
    """$XDG_DATA_HOME/selfcorrect/runs.sqlite (~/.local/share/selfcorrect/runs.sqlite): the store nobody named."""
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "selfcorrect" / "runs.sqlite"


def default_db_path() -> Path:
    """$SELFCORRECT_DB, else the default location."""
    if os.environ.get("SELFCORRECT_DB"):
        return Path(os.environ["SELFCORRECT_DB"]).expanduser()
    return default_location()


def stored_config(path: Path, run_id: str) -> dict | None:
    """A run's config read through a read-only connection (for a reader beside the process that runs it), or None
    when the store or the run cannot be read."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            return json.loads(db.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0])
    except (sqlite3.Error, TypeError, ValueError):
        return None


def db_path(db: str | Path | None) -> Path:
    """The store a `--db` (or `db=`) names: the path given, `~` expanded, else the default store. A path in a
    directory that does not exist is refused (UserError), so a typo does not start an empty store elsewhere; only
    the default location's directory is made (by `Store`)."""
    path = Path(db).expanduser() if db is not None else default_db_path()
    if path != default_location() and not path.parent.is_dir():
        named = f"--db {path}" if db is not None else f"SELFCORRECT_DB={path}"
        raise UserError(f"{named}: no directory {path.parent}; create it, or fix the path")
    return path


def follow_up(command: str, db: Path) -> str:
    """The command line `selfcorrect COMMAND` for a user to paste, naming the store `db` (shell-quoted) unless it
    is the default location: $SELFCORRECT_DB may not be set where the line is pasted."""
    if db == default_location():
        return f"selfcorrect {command}"
    return f"selfcorrect {command} --db {shlex.quote(str(db))}"


@dataclass(frozen=True)
class Turn:
    item_id: str
    sample: int
    round: int
    messages: list[dict]
    response: str
    feedback: list[str]
    answer: str | None
    correct: bool
    reason: str
    extra: dict
    notes: dict
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    backend: str
    # One per reply the turn generated, in order: "stop", "length" (--max-tokens reached) or "context" (cut
    # at the model's context window). None in stores made before finish reasons were kept.
    finish_reasons: list[str | None] | None = None
    served_by: dict | None = None  # what an HTTP server said it ran (model id, system_fingerprint)
    grader_version: str | None = None  # the graders that gave `correct`; None before versions were kept

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OptionScore:
    item_id: str
    given: str  # "" for the first answer, else the label the model was made to give first
    labels: list[str]
    probs: list[float]
    messages: list[dict]
    feedback: list[str]
    latency_s: float
    backend: str

    def to_json(self) -> dict:
        return asdict(self)


_TURN_COLUMNS = """t.item_id, t.sample, t.round, t.messages, t.response, t.feedback, t.answer, t.correct, t.reason,
    t.extra, t.notes, t.prompt_tokens, t.completion_tokens, t.latency_s, t.backend, t.finish_reasons, t.served_by,
    t.grader_version"""


def _json_or_none(text: str | None):
    return None if text is None else json.loads(text)


def _turn(r: tuple) -> Turn:
    return Turn(r[0], r[1], r[2], json.loads(r[3]), r[4], json.loads(r[5]), r[6], bool(r[7]), r[8], json.loads(r[9]),
                json.loads(r[10]), r[11], r[12], r[13], r[14], _json_or_none(r[15]), _json_or_none(r[16]), r[17])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _locked(method):
    """Serialise a Store method: the engine's worker threads read and write the response cache while the
    main thread writes turns, through one connection, and a transaction must not interleave with another."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return guarded


class Store:
    def __init__(self, path: Path, create: bool = True):
        if not create and not path.is_file():
            raise UserError(f"--db {path}: no run store there yet; run `selfcorrect run` first or pass --db")
        path.parent.mkdir(parents=True, exist_ok=True)  # the default location's: `db_path` refuses others missing
        self.path = path
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            # WAL keeps readers (a report while a run goes on) from blocking the writer. With WAL, a
            # committed turn survives a killed process even at synchronous=NORMAL, which skips the
            # fsync per commit (only a power cut can lose the last turns, and resume regenerates them).
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as err:
            raise UserError(f"--db {path}: not a selfcorrect run store ({err})") from None

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in present:
                    try:
                        with self.db:
                            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                    except sqlite3.OperationalError as err:  # another process added it since we looked
                        if "duplicate column" not in str(err):
                            raise

    @_locked
    def close(self) -> None:
        self.db.close()

    @_locked
    def create_run(self, run_id: str, config: dict, items: list, task_spec: dict | None = None) -> None:
        """Record the run, how its task was loaded, and its items once; a second call for the same run (a
        resume) changes nothing, except that it fills in the gold solutions of items stored before solutions
        were kept (they are not part of the run's identity, so such a run resumes under the same id)."""
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO runs (run_id, config, created_at, task_spec) VALUES (?, ?, ?, ?)",
                (run_id, json.dumps(config, sort_keys=True), _now(), json.dumps(task_spec, sort_keys=True)),
            )
            self.db.executemany(
                """INSERT INTO items (run_id, item_id, position, question, target, solution) VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id, item_id) DO UPDATE SET solution = COALESCE(items.solution, excluded.solution)""",
                [(run_id, item.id, position, item.question, item.target, item.solution)
                 for position, item in enumerate(items)],
            )

    @_locked
    def add_turn(self, run_id: str, turn: Turn) -> None:
        """Write one graded turn in its own transaction, which also clears the cell's earlier failure."""
        with self.db:
            self.db.execute(
                """INSERT INTO turns (run_id, item_id, sample, round, messages, response, feedback, answer, correct,
                       reason, extra, notes, prompt_tokens, completion_tokens, latency_s, backend, created_at,
                       finish_reasons, served_by, grader_version)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    run_id, turn.item_id, turn.sample, turn.round, json.dumps(turn.messages), turn.response,
                    json.dumps(turn.feedback), turn.answer, int(turn.correct), turn.reason, json.dumps(turn.extra),
                    json.dumps(turn.notes), turn.prompt_tokens, turn.completion_tokens, turn.latency_s, turn.backend,
                    _now(), json.dumps(turn.finish_reasons), json.dumps(turn.served_by), turn.grader_version,
                ),
            )
            self.db.execute(
                "DELETE FROM failed_cells WHERE run_id = ? AND item_id = ? AND sample = ? AND round = ?",
                (run_id, turn.item_id, turn.sample, turn.round),
            )

    @_locked
    def add_failure(self, run_id: str, item_id: str, sample: int, round_: int, error: str) -> None:
        """Record that a cell's request failed (the latest error wins); the cell stays ungraded."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO failed_cells VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, item_id, sample, round_, error, _now()),
            )

    @_locked
    def failures(self, run_id: str) -> list[dict]:
        """The run's failed cells that no turn has filled since, ordered by item position, sample and round."""
        rows = self.db.execute(
            """SELECT f.item_id, f.sample, f.round, f.error, f.created_at
               FROM failed_cells f JOIN items i ON i.run_id = f.run_id AND i.item_id = f.item_id
               WHERE f.run_id = ? ORDER BY i.position, f.sample, f.round""",
            (run_id,),
        )
        return [{"item_id": r[0], "sample": r[1], "round": r[2], "error": r[3], "created_at": r[4]} for r in rows]

    @_locked
    def add_traffic(self, run_id: str, traffic: dict) -> None:
        """Record what one call's HTTP requests met (a `TrafficMeter.as_dict()`)."""
        with self.db:
            self.db.execute(
                f"INSERT INTO run_traffic (run_id, created_at, {', '.join(TRAFFIC_FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(TRAFFIC_FIELDS))})",
                (run_id, _now(), *(traffic[name] for name in TRAFFIC_FIELDS)),
            )

    @_locked
    def traffic(self, run_id: str) -> list[dict]:
        """What the HTTP requests of each call that ran the run met, oldest first; [] for other backends."""
        rows = self.db.execute(
            f"SELECT created_at, {', '.join(TRAFFIC_FIELDS)} FROM run_traffic WHERE run_id = ? ORDER BY rowid",
            (run_id,),
        )
        return [{"created_at": row[0], **dict(zip(TRAFFIC_FIELDS, row[1:]))} for row in rows]

    @_locked
    def add_option_score(self, run_id: str, score: "OptionScore") -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO option_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, score.item_id, score.given, json.dumps(score.labels), json.dumps(score.probs),
                    json.dumps(score.messages), json.dumps(score.feedback), score.latency_s, score.backend, _now(),
                ),
            )

    @_locked
    def option_scores(self, run_id: str) -> list["OptionScore"]:
        rows = self.db.execute(
            """SELECT s.item_id, s.given, s.labels, s.probs, s.messages, s.feedback, s.latency_s, s.backend
               FROM option_scores s JOIN items i ON i.run_id = s.run_id AND i.item_id = s.item_id
               WHERE s.run_id = ? ORDER BY i.position, s.given""",
            (run_id,),
        )
        return [
            OptionScore(r[0], r[1], json.loads(r[2]), json.loads(r[3]), json.loads(r[4]), json.loads(r[5]), r[6], r[7])
            for r in rows
        ]

    @_locked
    def cached_reply(self, key: str) -> Completion | None:
        row = self.db.execute(
            "SELECT text, prompt_tokens, completion_tokens, finish_reason, served_by FROM response_cache WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return Completion(row[0], row[1], row[2], cached=True, finish_reason=row[3], served_by=_json_or_none(row[4]) or {})

    @_locked
    def cache_reply(self, key: str, reply: Completion) -> None:
        with self.db:
            self.db.execute(
                """INSERT OR REPLACE INTO response_cache
                       (key, text, prompt_tokens, completion_tokens, created_at, finish_reason, served_by)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (key, reply.text, reply.prompt_tokens, reply.completion_tokens, _now(), reply.finish_reason,
                 json.dumps(reply.served_by)),
            )

    @_locked
    def clear_cache(self) -> int:
        """Forget every cached reply; returns how many there were."""
        with self.db:
            return self.db.execute("DELETE FROM response_cache").rowcount

    @_locked
    def count(self, run_id: str, table: str) -> int:
        """Rows of a run in 'turns' or 'option_scores', without reading them."""
        assert table in ("turns", "option_scores")
        return self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]

    @_locked
    def find_run(self, prefix: str) -> str:
        """The full id of the one run whose id starts with `prefix`."""
        # Compared as text, not as a LIKE pattern: '%' or '_' in a prefix, or an empty one, must not match every run
        # (a prefix names the run `delete` removes).
        rows = self.db.execute("SELECT run_id FROM runs WHERE substr(run_id, 1, length(?)) = ?",
                               (prefix, prefix)).fetchall() if prefix else []
        if not rows:
            raise UserError(f"run {prefix}: no such run in {self.path}; `{follow_up('runs', self.path)}` lists them")
        if len(rows) > 1:
            raise UserError(f"run {prefix}: ambiguous, {len(rows)} runs start with it; give more characters")
        return rows[0][0]

    @_locked
    def config(self, run_id: str) -> dict:
        row = self.db.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0])

    @_locked
    def task_spec(self, run_id: str) -> dict | None:
        """How the run's task was loaded ({"task", "data", "options"}), or None for runs stored before this was kept."""
        row = self.db.execute("SELECT task_spec FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _json_or_none(row[0]) if row else None

    @_locked
    def items(self, run_id: str) -> list[dict]:
        """The run's items in task order: item_id, question, target, and solution (None where the data has none,
        or the run was stored before solutions were kept)."""
        rows = self.db.execute(
            "SELECT item_id, question, target, solution FROM items WHERE run_id = ? ORDER BY position", (run_id,)
        )
        return [{"item_id": r[0], "question": r[1], "target": r[2], "solution": r[3]} for r in rows]

    @_locked
    def turns(self, run_id: str) -> list[Turn]:
        """Every stored turn of the run, ordered by item position, sample and round."""
        rows = self.db.execute(
            f"""SELECT {_TURN_COLUMNS} FROM turns t JOIN items i ON i.run_id = t.run_id AND i.item_id = t.item_id
                WHERE t.run_id = ? ORDER BY i.position, t.sample, t.round""",
            (run_id,),
        )
        return [_turn(row) for row in rows]

    @_locked
    def regrade_turns(self, run_id: str, turns: list[Turn]) -> None:
        """Replace the grades (answer, correct, reason, extra, grader_version) of stored turns, all in one
        transaction; everything else in the rows stays as generated."""
        with self.db:
            self.db.executemany(
                """UPDATE turns SET answer = ?, correct = ?, reason = ?, extra = ?, grader_version = ?
                   WHERE run_id = ? AND item_id = ? AND sample = ? AND round = ?""",
                [
                    (turn.answer, int(turn.correct), turn.reason, json.dumps(turn.extra), turn.grader_version,
                     run_id, turn.item_id, turn.sample, turn.round)
                    for turn in turns
                ],
            )

    @_locked
    def turn(self, run_id: str, item_id: str, sample: int, round_: int) -> Turn | None:
        row = self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns t WHERE t.run_id = ? AND t.item_id = ? AND t.sample = ? AND t.round = ?",
            (run_id, item_id, sample, round_),
        ).fetchone()
        return _turn(row) if row else None

    @_locked
    def turn_keys(self, run_id: str) -> set[tuple[str, int, int]]:
        """(item, sample, round) of every stored turn: what a resume needs to know, without the turns."""
        return set(self.db.execute("SELECT item_id, sample, round FROM turns WHERE run_id = ?", (run_id,)))

    @_locked
    def runs(self) -> list[dict]:
        """One summary row per run, newest first."""
        rows = self.db.execute(
            """SELECT r.run_id, r.config, r.created_at,
                      (SELECT COUNT(*) FROM items i WHERE i.run_id = r.run_id),
                      (SELECT COUNT(*) FROM turns t WHERE t.run_id = r.run_id),
                      (SELECT COUNT(*) FROM option_scores s WHERE s.run_id = r.run_id),
                      (SELECT COUNT(*) FROM failed_cells f WHERE f.run_id = r.run_id)
               FROM runs r ORDER BY r.created_at DESC, r.run_id"""
        )
        return [
            {"run_id": r[0], "config": json.loads(r[1]), "created_at": r[2], "n_items": r[3], "n_turns": r[4],
             "n_scores": r[5], "n_failed": r[6]}
            for r in rows
        ]

    @_locked
    def run_times(self, run_id: str) -> tuple[str, str | None]:
        """When the run was first made, and when its latest turn was stored (None before any turn)."""
        return self.db.execute(
            """SELECT r.created_at, (SELECT MAX(t.created_at) FROM turns t WHERE t.run_id = r.run_id)
               FROM runs r WHERE r.run_id = ?""",
            (run_id,),
        ).fetchone()

    @_locked
    def delete_run(self, run_id: str) -> dict[str, int]:
        """Delete the run and every row of it, in one transaction; the response cache keeps its replies. Returns
        how many rows each table lost. The caller holds the run's lock (`lock_run`)."""
        with self.db:
            # Each table that references runs(run_id), before the run's own row.
            return {table: self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,)).rowcount
                    for table in ("turns", "option_scores", "failed_cells", "run_traffic", "items", "runs")}

    def lock_run(self, run_id: str, doing: str = "running", advice: str = RESUME_ADVICE) -> "RunLock":
        """Claim the run for this process, which is `doing` it ("running", "regrading", "deleting"), until the
        returned lock is released (see RunLock); raises UserError naming the process that holds it and what it
        is doing, then `advice`."""
        return RunLock(self.path, run_id, doing, advice)


try:
    import fcntl
except ImportError:  # Windows: nothing is locked there
    fcntl = None


class ProcessLock:
    """One process at a time holds `path`: an exclusive `flock` on that file, which names its holder (pid,
    host, since when, what it is `doing`). The kernel drops the lock when the holder ends, however it ends
    (SIGKILL too), so a dead process never blocks the next; release also removes the file, and its directory
    once empty (a directory kept for such locks). A second process is refused with a UserError: what is going on
    (`busy`, given what the holder is doing), the holder, and `advice`, how to go on. `where` names the place
    for an error writing the file ("--db PATH").
    Without fcntl (Windows), or on a file system that refuses flock, nothing is locked.
    Usable as a context manager."""

    def __init__(self, path: Path, where: str, busy: Callable[[str | None], str], doing: str = "running",
                 advice: str = RESUME_ADVICE):
        self.path = path
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            self._acquire(busy, advice, doing)
        except OSError as err:
            raise UserError(f"{where}: cannot write the lock file {self.path} ({err.strerror})") from None

    def _acquire(self, busy: Callable[[str | None], str], advice: str, doing: str) -> None:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a releasing process removed the directory in between
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, its_doing = _lock_holder(fd)
                os.close(fd)
                raise UserError(f"{busy(its_doing)} ({holder}); {advice}") from None
            except OSError:  # no flock on this file system: go on unlocked rather than not at all
                os.close(fd)
                return
            try:  # the holder before us may have removed the file we locked: lock the one at the path
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                                       "doing": doing}).encode())
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:  # removed while still locked: whoever opened the old file sees it is gone once they lock it
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)
        try:
            os.rmdir(self.path.parent)
        except OSError:  # other locks are in it
            pass

    def __enter__(self) -> "ProcessLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(ProcessLock):
    """One process at a time runs (or resumes, regrades, deletes) a run: the lock `<db>.locks/<run_id>.lock`.
    Readers (report, export) take none, and each run has its own file, so other runs go on."""

    def __init__(self, db_path: Path, run_id: str, doing: str = "running", advice: str = RESUME_ADVICE):
        super().__init__(Path(f"{db_path}.locks") / f"{run_id}.lock", f"--db {db_path}",
                         lambda its_doing: f"run {run_id} is {RUN_ACTIVITIES.get(its_doing or 'running', 'in use')} in {db_path}",
                         doing, advice)


# What a process holding a run's lock is doing, as a refusal says it.
RUN_ACTIVITIES = {"running": "already running", "regrading": "being regraded", "deleting": "being deleted"}


def _lock_holder(fd: int) -> tuple[str, str | None]:
    """Who holds a lock and what it is doing (None when its file does not say: a lock of an older version), from
    its file; the holder writes it just after locking, so wait a moment."""
    for _ in range(20):
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}", holder.get("doing")
        except (ValueError, KeyError, TypeError, AttributeError):
            time.sleep(0.05)
    return "held by another process", None
