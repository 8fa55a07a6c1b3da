"""selfcorrect: measure and improve how well language models correct themselves."""

from .api import Run, evaluate, load_run
from .errors import UserError

__all__ = ["Run", "UserError", "evaluate", "load_run"]
__version__ = "0.1.0"
