"""Models: a spec (models/spec.py) names one, `load_model` loads it on its engine.

Each engine has one factory below, which imports its backend module only when such a model is loaded (torch,
llama.cpp and the HTTP client are heavy). A new engine is a backend class in a module of its own (see
models/base.py for what it must do), its kind in models/spec.py, and a factory here.
"""

from __future__ import annotations

from ..errors import UserError
from .base import Backend, Completion, Message
from .spec import HTTP, LLAMACPP, MODEL_SPECS, TRANSFORMERS, ModelSpec, check_model_spec, trained_questions

__all__ = ["Backend", "Completion", "Message", "ModelSpec", "load_model", "check_model_spec", "MODEL_SPECS",
           "trained_questions"]


def _on_llamacpp(spec: ModelSpec) -> Backend:
    from .llamacpp import LlamaCppBackend
    from .trained import GGUF_ADAPTER_FILE

    adapter = spec.trained.directory / GGUF_ADAPTER_FILE if spec.trained else None
    return LlamaCppBackend(spec.gguf, lora=adapter)


def _on_transformers(spec: ModelSpec) -> Backend:
    from .hf import TransformersBackend

    return TransformersBackend(spec.hf_source)


def _over_http(spec: ModelSpec, concurrency: int | None = None, rpm: float | None = None,
               tpm: float | None = None) -> Backend:
    from .openai_http import DEFAULT_CONCURRENCY, OpenAIBackend

    return OpenAIBackend(*spec.openai_endpoint, max_in_flight=concurrency or DEFAULT_CONCURRENCY, rpm=rpm, tpm=tpm)


ENGINES = {LLAMACPP: _on_llamacpp, TRANSFORMERS: _on_transformers, HTTP: _over_http}


def load_model(spec: str, *, concurrency: int | None = None, rpm: float | None = None,
               tpm: float | None = None) -> Backend:
    """The backend a spec names. An HTTP model is not contacted here: a server that is down shows at the
    first request. `concurrency`, `rpm` and `tpm` are an HTTP model's limits (see models/rate_limit.py)."""
    model = check_model_spec(spec)
    limits = {flag: value for flag, value in (("concurrency", concurrency), ("rpm", rpm), ("tpm", tpm)) if value is not None}
    if limits and model.engine != HTTP:
        raise UserError(f"--{next(iter(limits))}: only for models served over HTTP (openai:MODEL@BASE_URL); {spec} runs "
                        "in this process, at as many requests at once as its engine batches")
    return ENGINES[model.engine](model, **limits)
