"""selfcorrect inside Inspect AI (the `inspect` extra): a solver that runs a strategy for N correction rounds
on Inspect's model, a scorer that grades every round, the metrics CL, CS, RSS and per-round accuracy, a
selfcorrect task as an Inspect dataset, and (`log_export`) a stored run written as an Inspect eval log.

Add the decomposition to an Inspect task:

    from selfcorrect.inspect_ext import selfcorrect_rounds, selfcorrect_scorer

    Task(dataset=..., solver=[generate(), selfcorrect_rounds("reask", rounds=1)],
         scorer=selfcorrect_scorer(match(numeric=True)))

See docs/inspect.md.
"""

from .dataset import selfcorrect_dataset
from .metrics import cl, cs, round_accuracy, rss
from .scorer import selfcorrect_scorer
from .solver import selfcorrect_rounds

__all__ = ["selfcorrect_rounds", "selfcorrect_scorer", "selfcorrect_dataset", "cl", "cs", "rss", "round_accuracy"]
