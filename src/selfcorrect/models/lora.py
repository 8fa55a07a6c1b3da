"""A trained model as a model spec: `lora:DIR`, the directory `selfcorrect train` writes (a PEFT LoRA adapter,
its llama.cpp copy `adapter.gguf` when the base is a GGUF, and `training_card.json`).

The card's `base_model` (the spec the training started from) says which engine runs it: a GGUF base
(`embedded`, `llamacpp:PATH`) runs on llama.cpp with `adapter.gguf` attached, as fast as the base; an `hf:`
base runs on transformers with the PEFT adapter merged into its weights. The card's `trained_questions`
let an evaluation refuse items the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

CARD_FILE = "training_card.json"
GGUF_ADAPTER_FILE = "adapter.gguf"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class TrainedModel:
    directory: Path
    card: dict
    base: str  # the base model's spec, from the card

    @property
    def card_path(self) -> Path:
        return self.directory / CARD_FILE

    @property
    def on_llamacpp(self) -> bool:
        return self.base == "embedded" or self.base.startswith("llamacpp:")


def read_trained_model(spec: str) -> TrainedModel:
    """The adapter directory of `lora:DIR`, its card, and the adapter file its base's engine needs, checked
    before anything is loaded."""
    folder = spec.removeprefix("lora:")
    directory = Path(folder).expanduser()
    if not folder or not directory.is_dir():
        raise UserError(f"--model {spec}: no such directory; give the --output directory of selfcorrect train")
    model = _read_card(spec, directory)
    # What the base's engine loads: llama.cpp the adapter's GGUF copy, transformers the PEFT adapter.
    needed = [GGUF_ADAPTER_FILE] if model.on_llamacpp else [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    missing = [directory / name for name in needed if not (directory / name).is_file()]
    if missing:
        raise UserError(f"--model {spec}: {missing[0]} is missing, so the adapter cannot be loaded; the training did "
                        "not finish: run selfcorrect train again")
    return model


def _read_card(spec: str, directory: Path) -> TrainedModel:
    """The card of an adapter directory, with a base model that is a known kind and, for a GGUF, present."""
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise UserError(f"--model {spec}: {card_path} is missing; lora: takes a directory written by selfcorrect train")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--model {spec}: {card_path} is not readable JSON ({err})") from None
    base = card.get("base_model") if isinstance(card, dict) else None
    if not base:
        raise UserError(f"--model {spec}: {card_path} has no field base_model; it should name the model trained")
    kind, _, source = str(base).partition(":")
    if base != "embedded" and not (kind in ("llamacpp", "hf") and source):
        raise UserError(f"--model {spec}: {card_path} field base_model is {base!r}; expected embedded, "
                        "llamacpp:PATH or hf:PATH_OR_ID")
    model = TrainedModel(directory, card, base)
    if model.on_llamacpp and not base_gguf(model).is_file():
        raise UserError(f"--model {spec}: the base model {base_gguf(model)} ({card_path} field base_model) is missing")
    return model


def base_gguf(model: TrainedModel) -> Path:
    """The GGUF file of a llama.cpp base."""
    return spec_gguf(model.base)


def spec_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec computes from: the embedded model's, a llamacpp: file or an hf: .gguf file
    (dequantised by transformers); None for other specs."""
    if spec == "embedded":
        from .llamacpp import embedded_model_path

        return embedded_model_path()
    if spec.startswith("llamacpp:"):
        return Path(spec.removeprefix("llamacpp:")).expanduser()
    source = spec.removeprefix("hf:")
    return Path(source).expanduser() if spec.startswith("hf:") and source.endswith(".gguf") else None


def absolute_spec(spec: str) -> str:
    """A base model spec with a local path made absolute, as a training card keeps it: the trained model must
    find its base from any directory."""
    kind, colon, source = spec.partition(":")
    if colon and kind in ("llamacpp", "hf") and Path(source).expanduser().exists():
        return f"{kind}:{Path(source).expanduser().resolve()}"
    return spec


def load_trained_model(spec: str):
    """The backend of `lora:DIR`: the base's engine with the adapter attached."""
    model = read_trained_model(spec)
    if model.on_llamacpp:
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(base_gguf(model), lora=model.directory / GGUF_ADAPTER_FILE)
    from .hf import TransformersBackend

    return TransformersBackend(str(model.directory))


def hf_base_source(adapter_dir: Path) -> str:
    """What transformers loads as the base of the PEFT adapter in `adapter_dir` (`hf:DIR`): the card's base
    (a GGUF base as its file), else the adapter config's base_model_name_or_path."""
    if (adapter_dir / CARD_FILE).is_file():
        model = _read_card(f"hf:{adapter_dir}", adapter_dir)
        return str(base_gguf(model)) if model.on_llamacpp else model.base.removeprefix("hf:")
    config_path = adapter_dir / PEFT_CONFIG_FILE
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--model hf:{adapter_dir}: {config_path} is not readable JSON ({err})") from None
    if not base:
        raise UserError(f"--model hf:{adapter_dir}: {config_path} names no base_model_name_or_path and there is no "
                        f"{CARD_FILE}; cannot tell which model the adapter belongs to")
    return base


def trained_questions(spec: str) -> set[str] | None:
    """The question hashes (train.leak.question_key) a trained model saw in training: of `lora:DIR`, and of
    `hf:DIR` when DIR is an adapter directory with a training card; None for a model spec that is neither."""
    if spec.startswith("lora:"):
        model = read_trained_model(spec)
    elif spec.startswith("hf:") and (Path(spec.removeprefix("hf:")).expanduser() / CARD_FILE).is_file():
        model = _read_card(spec, Path(spec.removeprefix("hf:")).expanduser())
    else:
        return None
    questions = model.card.get("trained_questions")
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise UserError(f"--model {spec}: {model.card_path} field trained_questions is missing or not a list of "
                        "question hashes; without it the evaluation cannot check for training items")
    return set(questions)
