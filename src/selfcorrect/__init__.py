"""selfcorrect: measure and improve how well language models correct themselves."""

from .api import Run, evaluate, load_run
from .run_config import RunConfig
from .errors import UserError

__all__ = ["Run", "RunConfig", "UserError", "evaluate", "load_run"]
__version__ = "0.1.0"
