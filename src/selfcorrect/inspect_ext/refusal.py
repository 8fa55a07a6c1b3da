"""A UserError raised where Inspect calls us (building the solver, the scorer, the dataset) reaches Inspect's
command line as a refusal that Inspect prints itself, the message alone, rather than as an exception it prints
with a traceback. Inspect prints its own refusals so: `PrerequisiteError`, from its private module
`inspect_ai._util.error`, which the pin of the `inspect` extra (inspect_ai==0.3.285) keeps where it is."""

from __future__ import annotations

import functools
from typing import Callable

from inspect_ai._util.error import PrerequisiteError
from rich.markup import escape

from ..errors import UserError


class InspectRefusal(UserError, PrerequisiteError):
    """A UserError (caught as one by a caller in Python) that Inspect's command line prints as one of its own
    refusals: `message`, which it prints as Rich markup, hence escaped."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.message = f"error: {escape(problem)}"


def refusals_for_inspect(function: Callable) -> Callable:
    """`function`, raising its UserErrors as InspectRefusals."""

    @functools.wraps(function)
    def refusing(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as problem:
            raise InspectRefusal(str(problem)) from None

    return refusing
