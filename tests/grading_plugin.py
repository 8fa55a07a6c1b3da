"""A task registered the way a plugin registers one, whose grader hangs on demand.

It lives in a module of its own (not a test file) so that a grading child process, which imports the
grader by name on the parent's sys.path, can import it: tests/ is on sys.path under pytest.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from selfcorrect.tasks import Grade, Item, Task, register_task
from selfcorrect.tasks.grading import grade_number

HANG = "HANG"  # a reply "HANG <file>" makes the grader write its pid to <file>, then never return
RAISE = "RAISE"  # a reply "RAISE" makes the grader raise


def grade_or_hang(item: Item, response: str) -> Grade:
    if response.startswith(HANG):
        Path(response.split(maxsplit=1)[1]).write_text(str(os.getpid()))
        while True:
            time.sleep(1)
    if response == RAISE:
        raise ValueError("the grader gave up on this reply")
    return grade_number(item, response)


def grade_by_sympy_loaded(item: Item, response: str) -> Grade:
    """Right when the grading process has imported sympy (the maths grader's library) already."""
    return Grade(None, "sympy" in sys.modules, "sympy loaded" if "sympy" in sys.modules else "sympy not loaded")


@register_task("hang-test", "three sums, graded by a grader that hangs on demand", grader="number", answer="a number")
def hang_test(data: Path | None, options: dict[str, str]) -> Task:
    return Task(
        name="hang-test",
        items=[Item(f"sum-{n}", f"What is {n} + {n}?", str(2 * n)) for n in range(3)],
        instruction=lambda item: 'End with "The answer is N."',
        grade=grade_or_hang,
        identity={"task": "hang-test"},
    )
