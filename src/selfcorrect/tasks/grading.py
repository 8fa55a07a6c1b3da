"""Graders shared by task families: an extracted answer compared with the item's target."""

from __future__ import annotations

import functools
import hashlib
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .base import Grade, Item
from .extract import extract_number, normalise_text, numbers_equal


def _grade(item: Item, answer: str | None, correct: bool, what: str) -> Grade:
    if answer is None:
        return Grade(None, False, f"no {what} found in the reply")
    relation = "matches" if correct else "differs from"
    return Grade(answer, correct, f"{what} {answer} {relation} the target {item.target}")


def grade_number(item: Item, response: str) -> Grade:
    """The number the reply states, compared numerically with the target."""
    answer = extract_number(response)
    return _grade(item, answer, numbers_equal(answer, item.target), "number")


def grade_equal(item: Item, answer: str | None, what: str) -> Grade:
    """An already extracted answer (option letter, yes/no ...) compared exactly with the target."""
    return _grade(item, answer, answer == item.target, what)


def grade_math(item: Item, response: str) -> Grade:
    """Mathematical equivalence by math-verify: \\boxed{} and final answers in the reply, LaTeX
    fractions, radicals, intervals, units, compared symbolically with the target (a LaTeX string)."""
    from math_verify import parse, verify  # imports sympy: only when a maths task is graded

    # No limit of math-verify's own: its SIGALRM works only on a main thread, misses hangs in C (a tower of
    # powers), and a check it cuts short reads as "not equivalent". The caller bounds the whole grade
    # (selfcorrect.grader_pool) and records one that runs out of time as "grader timeout".
    gold = parse(f"${item.target}$", parsing_timeout=None)
    found = parse(normalise_text(response), parsing_timeout=None)
    if not found:
        return Grade(None, False, "no mathematical answer found in the reply")
    answer = str(found[-1])
    correct = bool(gold) and verify(gold, found, timeout_seconds=None)
    relation = "is equivalent to" if correct else "is not equivalent to"
    return Grade(answer, correct, f"answer {answer} {relation} the target {item.target}")


# What a verdict depends on besides selfcorrect's own code: the maths stack behind grade_math, and the Python
# that runs the sandboxed programs of the code graders.
_GRADING_PACKAGES = ("math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy")


@functools.cache
def grader_version() -> str:
    """12 hex digits that change when the grading code changes: the source of every module of
    selfcorrect.tasks and of the sandbox (both sides and its isolation), the versions of the maths packages and Python's major.minor.

    One version for the whole installation, not one per grader, so a report can tell whether a run's
    grades are older than today's without loading the run's task. It errs on the side of "changed": an
    edit to a task file outside its grader marks grades as older, and regrading them then changes no
    verdict. The code of a task registered outside selfcorrect is not covered: regrade its runs with --all.
    """
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in [*sorted(here.glob("*.py")), *(here.parent / name for name in ("sandbox.py", "sandbox_child.py", "isolation.py"))]:
        digest.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
    for package in _GRADING_PACKAGES:
        try:
            digest.update(f"{package}=={version(package)}\0".encode())
        except PackageNotFoundError:
            digest.update(f"{package} absent\0".encode())
    digest.update(f"python {sys.version_info[0]}.{sys.version_info[1]}".encode())
    return digest.hexdigest()[:12]
