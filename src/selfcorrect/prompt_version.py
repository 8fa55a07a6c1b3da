"""A hash of the prompt texts a run sends, so that editing a prompt makes a new run instead of resuming an old one.

The texts are found where they live: the string constants of the strategy's function (and the strings
it closed over), of the functions and string constants it refers to by name (followed through the modules
they come from), of the engine code that builds correction turns and of the task's execution feedback,
and every item's first prompt as the task writes it (question and answer instruction). Docstrings are
left out: rewording one changes nothing the model sees. Code other than texts is left out too: a version
hash that moved with every Python release would never let a run resume.
"""

from __future__ import annotations

import hashlib
import types
from typing import Callable, Iterable

from .engine import Dialogue, play_round
from .strategies import Strategy
from .strategies.examples import correction_examples
from .tasks import Item, Task


def _texts(function: Callable, seen: set[int]) -> Iterable[str]:
    """String constants of `function`'s code and of what it names, depth first, each function once."""
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
            if isinstance(value, str):
                yield value
            elif isinstance(value, types.FunctionType) and value.__module__.startswith(function.__module__.split(".")[0]):
                yield from _texts(value, seen)


def prompt_version(strategy: Strategy, task: Task, items: list[Item]) -> str:
    """16 hex digits that change when any prompt text the run could send changes."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    shown = (strategy.correct, play_round, Dialogue.p_true, Dialogue.sample_fresh, correction_examples,
             task.execution_feedback)  # the last is None on tasks that run no code
    for function in shown:
        for text in _texts(function, seen):
            digest.update(text.encode() + b"\0")
    for item in items:
        digest.update(task.prompt(item).encode() + b"\0")
    return digest.hexdigest()[:16]
