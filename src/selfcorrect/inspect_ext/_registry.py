"""What Inspect's `inspect_ai` entry point loads, so that `--solver selfcorrect/selfcorrect_rounds`,
`--scorer selfcorrect/selfcorrect_scorer` and logs naming them resolve without an import in the task file."""

from .metrics import cl, cs, round_accuracy, rss  # noqa: F401
from .scorer import selfcorrect_scorer  # noqa: F401
from .solver import selfcorrect_rounds  # noqa: F401
