"""Task registry: `load_task(name, data, options)` builds a task; `all_tasks()` lists what is registered.

Packages add tasks the way they add strategies: a module that calls `register_task`, listed under the
'selfcorrect.tasks' entry point in the package's pyproject.toml, is imported when a task is looked up.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..plugins import load_plugins
from . import arithmetic, code, custom, gsm8k, ifeval, math_problems, mcq  # noqa: F401 - importing registers the tasks
from .base import TASKS, Grade, Item, Task, TaskEntry, defining_identity, register_task
from .grading import grader_version

__all__ = ["TASKS", "Grade", "Item", "Task", "all_tasks", "defining_identity", "grader_version", "load_task",
           "register_task"]


def all_tasks() -> dict[str, TaskEntry]:
    """Every task, those of installed packages included."""
    load_plugins("selfcorrect.tasks", TASKS)
    return TASKS


def load_task(name: str, data: Path | None = None, options: dict[str, str] | None = None) -> Task:
    if name not in TASKS and name not in all_tasks():
        raise UserError(f"--task {name}: unknown task; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name].factory(data, options or {})
