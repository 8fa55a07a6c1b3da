"""Correction strategies: what the model is told after its previous answer.

A strategy turns the question (as first asked) and the task's answer instruction into the user messages of
one correction round. The model replies to each in turn; the reply to the last one is the round's answer
and is graded, replies to earlier ones (a critique, say) are kept as the round's feedback. A strategy sees
only what the model saw, never the item's gold answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError

RoundPrompts = Callable[[str, str], list[str]]


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    round_prompts: RoundPrompts


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, description: str) -> Callable[[RoundPrompts], RoundPrompts]:
    def decorate(round_prompts: RoundPrompts) -> RoundPrompts:
        STRATEGIES[name] = Strategy(name, description, round_prompts)
        return round_prompts

    return decorate


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name}: unknown strategy; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


@register_strategy("reask", "ask the same question again with the previous answer in context (Yang et al.)")
def reask(question: str, instruction: str) -> list[str]:
    return [question]


@register_strategy("critique", "review the previous answer for problems, then improve it (Huang et al.)")
def critique(question: str, instruction: str) -> list[str]:
    return [
        "Review your previous answer and find problems with your answer.",
        f"Based on the problems you found, improve your answer. {instruction}",
    ]
