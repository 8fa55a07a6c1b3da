"""What a task is: items, the prompt that asks one, and the grader that checks an answer.

A task family lives in one file and registers a factory with `@register_task("name")`. The factory takes
the user's `--data` path (or None) and `--task-opt KEY=VALUE` options and returns a `Task`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import UserError
from ..models.identity import file_digest


@dataclass(frozen=True)
class Item:
    """One question. `target` is the gold answer in the task's canonical form; no strategy may read it.

    `solution` is the gold answer written as a reply the task's instruction asks for (a worked solution where
    the data has one), which the task's grader grades right: the target of training rows (selfcorrect.train).
    None where the data has none. Not part of the item's identity: it is left out of comparisons, and no run
    id depends on it, so runs stored before solutions were kept are the same runs.
    """

    id: str
    question: str
    target: str
    choices: tuple[str, ...] = ()
    solution: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Grade:
    """The verdict on one reply: the answer found in it, whether it is right, and why.

    `reason` is for a person debugging a grader (it may quote the gold answer, so it is never shown to
    the model); `extra` holds secondary scores of graders that have them, e.g. {"loose": True}.
    """

    answer: str | None
    correct: bool
    reason: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutionFeedback:
    """What running a reply's code shows, using only what the model was shown: `text` is fit to show the
    model; `passed` is whether the tests the question shows pass, None when it shows none to run."""

    text: str
    passed: bool | None


@dataclass
class Task:
    """A set of items plus how to ask them and how to grade answers."""

    name: str
    items: list[Item]
    # Appended to every question (and repeated in correction prompts) so the answer can be found.
    instruction: Callable[[Item], str]
    grade: Callable[[Item, str], Grade]
    max_tokens: int = 256
    # The option labels of a multiple-choice item (["A", "B", ...] or ["yes", "no"]), for tasks whose
    # answers are labels; None for free-form tasks. Makes the exact estimator possible.
    labels: Callable[[Item], list[str]] | None = None
    # Code tasks: runs a reply's code on the tests the question shows (never the hidden ones the grade
    # runs), for strategies such as exec-feedback to show the model. None where the task has no code.
    execution_feedback: Callable[[Item, str], ExecutionFeedback] | None = None
    # Everything that defines the item set, for the run's identity (options, data file and its hash).
    identity: dict = field(default_factory=dict)
    # A system message that opens every conversation (a protocol's, e.g. Yang et al.'s); None: no system message.
    system: str | None = None
    # The exact estimator: the start of the reply whose next token is scored, and how a reply states option
    # `label`, where a protocol words them its own way; None: selfcorrect.exact's ("The answer is", "... B.").
    answer_prefix: str | None = None
    stated_answer: Callable[[str], str] | None = None

    def prompt(self, item: Item) -> str:
        """The first user message: the question, then the answer instruction (none where the task has none)."""
        instruction = self.instruction(item)
        return f"{item.question}\n{instruction}" if instruction else item.question

    def system_messages(self) -> list[dict]:
        """What every conversation starts with, before the question: the system message, if the task has one."""
        return [{"role": "system", "content": self.system}] if self.system else []


def answer_sentence(answer: str) -> str:
    """The closing sentence the instructions of the number, option and yes/no tasks ask for: a gold solution
    of a task whose reference holds no worked solution is this sentence with the target."""
    return f"The answer is {answer}."


# Keys of a task's identity that say how it was set up but change no item and no grade (a grader inferred from the
# data rather than given grades as the same grader given): kept in a run's config, left out of its id.
NOT_DEFINING = frozenset({"grader_inferred"})


def defining_identity(identity: dict) -> dict:
    """A task's identity without the keys in NOT_DEFINING."""
    return {key: value for key, value in identity.items() if key not in NOT_DEFINING}


TaskFactory = Callable[[Path | None, dict[str, str]], Task]


@dataclass(frozen=True)
class TaskEntry:
    """What `selfcorrect tasks` shows about a task without loading its data."""

    factory: TaskFactory
    description: str
    grader: str
    answer: str  # the answer format the grader expects
    # True when the task makes its items itself (no file, no network), so counting them is cheap.
    builtin: bool = False
    # True when answers are option labels, which is what the exact estimator needs.
    multiple_choice: bool = False


TASKS: dict[str, TaskEntry] = {}


def register_task(
    name: str, description: str, *, grader: str, answer: str, builtin: bool = False, multiple_choice: bool = False
) -> Callable[[TaskFactory], TaskFactory]:
    def decorate(factory: TaskFactory) -> TaskFactory:
        TASKS[name] = TaskEntry(factory, description, grader, answer, builtin, multiple_choice)
        return factory

    return decorate


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors and spreadsheets put first


def _not_utf8(path: Path, line: int, text: bytes, error: UnicodeDecodeError) -> UserError:
    """The error for a byte that is not UTF-8 at `error.start` of `text`, which starts line `line`."""
    line += text.count(b"\n", 0, error.start)
    column = error.start - text.rfind(b"\n", 0, error.start)
    byte = f"0x{text[error.start]:02x}"
    return UserError(f"{path}:{line}: not UTF-8 text (byte {column} of the line is {byte}); save the file as UTF-8")


def utf8_lines(path: Path, raw_lines: Iterable[bytes]) -> Iterator[str]:
    """The lines of a file read in binary, decoded as UTF-8 one at a time (a leading byte-order mark is
    dropped), so a byte that is not UTF-8 is a UserError naming file and line, not a decoder's traceback."""
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, number, raw, err) from None


def parse_jsonl(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of `lines`; a bad line is a UserError naming file and line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line is a UserError naming file and line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the --data path")
    with path.open("rb") as handle:
        yield from parse_jsonl(path, utf8_lines(path, handle))


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line or row number, record) from a JSONL, CSV or Parquet file, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from read_jsonl(path)
        return
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the --data path")
    if suffix == ".csv":
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark, which must not join the first header.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            # Row numbers count the header as line 1, as an editor shows them.
            reader = csv.DictReader(handle)
            try:
                for number, row in enumerate(reader, start=2):
                    yield number, row
            except UnicodeDecodeError:  # decoded a block at a time: find the line in the bytes
                data = path.read_bytes().removeprefix(BOM)
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, 1, data, err) from None
                raise
            except csv.Error as err:
                raise UserError(f"{path}:{reader.line_num}: not readable as CSV ({err})") from None
        return
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow: pip install 'selfcorrect[hub]'") from None
        try:
            table = parquet.read_table(path)
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            raise UserError(f"{path}: not a readable Parquet file ({err})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    raise UserError(f"{path}: unknown file type '{suffix}'; use .jsonl, .csv or .parquet")


def require_field(path: Path, line: int, record: dict, name: str, kind: type | tuple[type, ...]):
    """record[name], checked for presence and type, or a UserError naming file, line and field."""
    if name not in record:
        raise UserError(f"{path}:{line}: record has no field '{name}'; every line needs it")
    value = record[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{path}:{line}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def file_identity(path: Path) -> dict:
    """Where the data came from and a hash of its bytes, so an edited file makes a different run (the
    hash is cached as a model file's is: see models/identity.py)."""
    return {"data": str(path.resolve()), "data_sha256": file_digest(path)}


def require_items(items: list[Item], source: str) -> list[Item]:
    """The items, checked to be non-empty and to have unique ids (turns are keyed by item id)."""
    if not items:
        raise UserError(f"{source}: no items found; the dataset is empty")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{source}: item id '{item.id}' appears twice; ids must be unique")
        seen.add(item.id)
    return items


def reject_unknown_options(task: str, options: dict[str, str], known: set[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise UserError(f"--task-opt {unknown[0]}: task '{task}' has no such option (options: {allowed})")
