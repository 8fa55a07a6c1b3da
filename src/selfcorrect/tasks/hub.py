"""Public datasets through Hugging Face `datasets`, for users with a network."""

from __future__ import annotations

from ..errors import UserError


def load_hub_rows(dataset: str, config: str | None, split: str, task: str) -> list[dict]:
    """All rows of one split, or a UserError that says to pass --data when the Hub cannot be reached."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--task {task} without --data needs the Hugging Face 'datasets' package: "
            f"pip install 'selfcorrect[hub]', or pass --data PATH to a local JSONL file"
        ) from None
    # The library logs every retry; the user gets our one line instead.
    datasets.logging.set_verbosity_error()
    datasets.utils.logging.get_logger("huggingface_hub").setLevel("ERROR")
    try:
        return list(datasets.load_dataset(dataset, config, split=split))
    except Exception as err:  # the library raises many kinds (ConnectionError, HfHubHTTPError, OSError ...)
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(
            f"--task {task}: could not load '{dataset}' from the Hugging Face Hub ({reason}); "
            f"offline? pass --data PATH to a local JSONL file"
        ) from None
