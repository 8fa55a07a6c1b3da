"""Task registry: `load_task(name, data, options)` builds a task; `TASKS` lists what is registered."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import arithmetic, code, custom, gsm8k, ifeval, math_problems, mcq  # noqa: F401 - importing registers the tasks
from .base import TASKS, Grade, Item, Task, defining_identity, register_task
from .grading import grader_version

__all__ = ["TASKS", "Grade", "Item", "Task", "defining_identity", "grader_version", "load_task", "register_task"]


def load_task(name: str, data: Path | None = None, options: dict[str, str] | None = None) -> Task:
    if name not in TASKS:
        raise UserError(f"--task {name}: unknown task; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name].factory(data, options or {})
