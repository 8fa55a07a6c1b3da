"""In-context examples of corrections (`--icl-confident N --icl-critical M`), after Yang et al.: shown
before a correction prompt, examples where a right answer is kept push the model towards confidence (CL),
examples where a wrong answer is fixed push it towards critique (CS).

An example is another item of the same task with an answer put in the model's mouth: its gold answer
(confident: the answer is kept) or a wrong one (critical: the answer is fixed). The item being corrected
is never among its own examples, so its gold answer never reaches the model. Examples need short answers
to state: option labels, yes/no, or numbers.
"""

from __future__ import annotations

import random

from ..errors import UserError
from ..tasks import Item, Task

HEADER = "Here are examples of checking an answer again."
FOOTER = "Now check your own answer."
KEPT = "I checked it again and it is right, so I keep it. The answer is {answer}."
FIXED = "I checked it again and it is wrong. The answer is {answer}."


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_examples_possible(task: Task, n_confident: int, n_critical: int) -> None:
    """Refuse, before anything runs, example counts the task cannot supply."""
    for flag, count in (("--icl-confident", n_confident), ("--icl-critical", n_critical)):
        if count < 0:
            raise UserError(f"{flag} {count}: must be 0 or more")
    wanted = n_confident + n_critical
    if not wanted:
        return
    if task.labels is None and not all(_is_number(item.target) for item in task.items):
        raise UserError(
            f"--icl-confident/--icl-critical: task '{task.name}' has answers that cannot be stated in one word "
            "or number; examples need multiple-choice, yes/no or numeric answers"
        )
    if wanted >= len(task.items):
        raise UserError(
            f"--icl-confident/--icl-critical: {wanted} examples need at least {wanted + 1} items in task "
            f"'{task.name}', which has {len(task.items)}"
        )


def _wrong_answer(task: Task, item: Item, rng: random.Random) -> str:
    if task.labels is not None:
        return rng.choice([label for label in task.labels(item) if label != item.target])
    value = float(item.target) + rng.choice([-2, -1, 1, 2])
    return str(int(value)) if value.is_integer() else str(value)


def correction_examples(task: Task, item: Item, n_confident: int, n_critical: int, seed: int) -> str:
    """The examples block shown before `item`'s correction prompt; the same for the same item and seed."""
    if not n_confident + n_critical:
        return ""
    rng = random.Random(f"{seed}/{item.id}")
    others = rng.sample([other for other in task.items if other.id != item.id], n_confident + n_critical)
    kinds = ["confident"] * n_confident + ["critical"] * n_critical
    rng.shuffle(kinds)
    blocks = []
    for other, kind in zip(others, kinds):
        shown = other.target if kind == "confident" else _wrong_answer(task, other, rng)
        reply = (KEPT if kind == "confident" else FIXED).format(answer=other.target)
        blocks.append(f"Question: {other.question}\nPrevious answer: The answer is {shown}.\nChecked again: {reply}")
    return "\n\n".join([HEADER, *blocks, FOOTER])
