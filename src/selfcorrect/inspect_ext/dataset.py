"""A selfcorrect task's items as an Inspect dataset (`selfcorrect_dataset`), and the loaded task that the
scorer grades them with.

Each item becomes one Inspect sample: its id is the item's id, its input the first user message selfcorrect
sends (the question and the task's answer instruction, after the task's system message if it has one), its
target the gold answer; its metadata carries the task's answer instruction (INSTRUCTION_KEY), which
`selfcorrect_rounds` hands to strategies that repeat it. The scorer finds the item again by the sample's id,
so a reply is graded exactly as `selfcorrect run` grades it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser

from ..tasks import Item, Task, load_task
from .refusal import refusals_for_inspect

INSTRUCTION_KEY = "selfcorrect_instruction"


@lru_cache(maxsize=8)
def _load(name: str, data: str | None, options: tuple[tuple[str, str], ...]) -> Task:
    return load_task(name, Path(data) if data else None, dict(options))


def selfcorrect_task(name: str, data: str | None = None, options: dict[str, str] | None = None) -> Task:
    """The selfcorrect task `name` (as `--task NAME --data DATA --task-opt K=V` would load it), loaded once."""
    return _load(name, str(data) if data else None, tuple(sorted((options or {}).items())))


def item_of(task: Task, sample_id: str | int | None) -> Item:
    """The item of `task` that an Inspect sample stands for, by the sample's id."""
    found = {item.id: item for item in task.items}.get(str(sample_id))
    if found is None:
        raise ValueError(
            f"sample id {sample_id!r} is not an item of selfcorrect task '{task.name}'; build the dataset with "
            "selfcorrect_dataset() from the same task and data"
        )
    return found


@refusals_for_inspect
def selfcorrect_dataset(task: str, data: str | None = None, options: dict[str, str] | None = None) -> MemoryDataset:
    """The items of selfcorrect task `task` as Inspect samples, asked as `selfcorrect run` asks them."""
    loaded = selfcorrect_task(task, data, options)
    system = [ChatMessageSystem(content=loaded.system)] if loaded.system else []
    return MemoryDataset(
        [Sample(id=item.id, input=[*system, ChatMessageUser(content=loaded.prompt(item))], target=item.target,
                metadata={"selfcorrect_task": loaded.name, INSTRUCTION_KEY: loaded.instruction(item)})
         for item in loaded.items],
        name=loaded.name,
        location=str(data) if data else None,
    )
