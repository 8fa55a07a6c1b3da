"""A hash of the prompt texts a run sends, so that editing a prompt makes a new run instead of resuming an old one.

The texts are found where they live: the string constants of the strategy's function (and the strings it
closed over), and of the functions and module-level strings it names in its own module, followed from
function to function; likewise from the engine's code that builds correction turns and scores options,
and from the task's execution feedback when the strategy shows it. Every item's first prompt as the task
writes it (question and answer instruction) is hashed too. Docstrings, dunder names (`__file__` would tie
the hash to where selfcorrect is installed) and functions of other modules (the sandbox's, the standard
library's) are left out. What remains holds some strings that are not prompts (regular expressions,
format specifications); they change when that code changes, which only makes a new run where none was
needed.
"""

from __future__ import annotations

import hashlib
import types
from typing import Callable, Iterable

from .engine import Dialogue, play_round
from .exact import run_scoring
from .strategies import Strategy
from .strategies.examples import correction_examples
from .tasks import Item, Task


def _texts(function: Callable, seen: set[int]) -> Iterable[str]:
    """String constants of `function`'s code and of what it names in its module, depth first, each once."""
    if id(function) in seen or not isinstance(function, types.FunctionType):
        return
    seen.add(id(function))
    for cell in function.__closure__ or ():  # texts a strategy factory closed over
        if isinstance(cell.cell_contents, str):
            yield cell.cell_contents
        else:
            yield from _texts(cell.cell_contents, seen)
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        for constant in code.co_consts:
            if isinstance(constant, str) and constant != function.__doc__:
                yield constant
            elif isinstance(constant, types.CodeType):
                codes.append(constant)  # a nested function, lambda or comprehension
        for name in code.co_names:
            value = function.__globals__.get(name)
            if name.startswith("__"):
                continue
            if isinstance(value, str):
                yield value
            elif isinstance(value, types.FunctionType) and value.__module__ == function.__module__:
                yield from _texts(value, seen)


def prompt_version(strategy: Strategy, task: Task, items: list[Item]) -> str:
    """16 hex digits that change when any prompt text the run could send changes."""
    shown = [strategy.correct, play_round, Dialogue.p_true, Dialogue.sample_fresh, correction_examples, run_scoring]
    if strategy.needs_execution_feedback:
        shown.append(task.execution_feedback)
    digest = hashlib.sha256()
    seen: set[int] = set()
    for function in shown:
        for text in _texts(function, seen):
            digest.update(text.encode() + b"\0")
    for item in items:
        digest.update(task.prompt(item).encode() + b"\0")
    # A protocol's own wording (Yang et al.'s); tasks without one hash as they always did.
    for text in (task.system, task.answer_prefix, task.stated_answer and task.stated_answer("X")):
        if text:
            digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]
