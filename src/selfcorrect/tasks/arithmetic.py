"""Built-in arithmetic problems with computed answers: the default task, offline and seeded.

Difficulty is set by task options: `digits` per operand, `operands` per expression, `operators` to draw
from (any of + - *). The default is chosen so that the embedded 135M model answers a fair share right
and a fair share wrong on its first try, which is what makes the correction signal non-degenerate.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import UserError
from .base import Item, Task, answer_sentence, register_task, reject_unknown_options
from .grading import grade_number

DEFAULTS = {"n": "100", "digits": "1", "operands": "2", "operators": "+-", "seed": "0"}


def _int_option(options: dict[str, str], name: str, low: int, high: int) -> int:
    raw = options[name]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"--task-opt {name}={raw}: must be a whole number from {low} to {high}")
    return value


def generate_items(n: int, digits: int, operands: int, operators: str, seed: int) -> list[Item]:
    """`n` distinct expressions, the same ones for the same arguments on every machine.

    Distinct, because items are the unit the bootstrap resamples: a repeated question would count twice.
    """
    rng = random.Random(seed)
    low = 10 ** (digits - 1) if digits > 1 else 1  # operands never start with 0, so 1 digit draws 1..9
    possible = (10**digits - low) ** operands * len(set(operators)) ** (operands - 1)
    if n > possible:
        raise UserError(f"--task-opt n={n}: these options allow only {possible} distinct problems; lower n or raise digits")
    seen: set[str] = set()
    items = []
    while len(items) < n:
        numbers = [rng.randint(low, 10**digits - 1) for _ in range(operands)]
        ops = [rng.choice(operators) for _ in range(operands - 1)]
        expression = str(numbers[0]) + "".join(f" {op} {num}" for op, num in zip(ops, numbers[1:]))
        if expression in seen:
            continue
        seen.add(expression)
        # Python's precedence is the usual one for + - *, and the operands are plain integers.
        target = str(eval(expression))  # noqa: S307 - built from digits and + - * only
        solution = f"{expression} = {target}. {answer_sentence(target)}"
        items.append(Item(id=f"arith-{len(items)}", question=f"What is {expression}?", target=target, solution=solution))
    return items


@register_task(
    "arithmetic", "built-in seeded arithmetic (options: n, digits, operands, operators, seed)",
    grader="number", answer="a number", builtin=True,
)
def arithmetic(data: Path | None, options: dict[str, str]) -> Task:
    if data is not None:
        raise UserError("--data: task 'arithmetic' generates its own items; drop --data or pick --task gsm8k/mcq")
    reject_unknown_options("arithmetic", options, set(DEFAULTS))
    merged = {**DEFAULTS, **options}
    operators = merged["operators"]
    if not operators or set(operators) - set("+-*"):
        raise UserError(f"--task-opt operators={operators}: use one or more of + - * (for example operators=+-)")
    items = generate_items(
        n=_int_option(merged, "n", 1, 1_000_000),
        digits=_int_option(merged, "digits", 1, 9),
        operands=_int_option(merged, "operands", 2, 10),
        operators=operators,
        seed=_int_option(merged, "seed", 0, 2**31),
    )
    return Task(
        name="arithmetic",
        items=items,
        instruction=lambda item: 'Give the result as a number and end with "The answer is N."',
        grade=grade_number,
        max_tokens=128,
        identity={"task": "arithmetic", **merged},
    )
