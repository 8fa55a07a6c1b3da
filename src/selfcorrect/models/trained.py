"""The directory `selfcorrect train` writes, read back: a PEFT LoRA adapter, its llama.cpp copy `adapter.gguf`
when the base is a GGUF, and `training_card.json`.

The card's `base_model` (the spec the training started from) says which engine runs the trained model
(models/spec.py); its `trained_questions` let an evaluation refuse items the model was trained on.
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
    spec: str  # the spec that named the directory, for messages
    directory: Path
    card: dict
    base: str  # the base model's spec, from the card

    @property
    def card_path(self) -> Path:
        return self.directory / CARD_FILE

    def questions(self) -> set[str]:
        """The question hashes (split.question_key) the model saw in training."""
        questions = self.card.get("trained_questions")
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise UserError(f"--model {self.spec}: {self.card_path} field trained_questions is missing or not a list "
                            "of question hashes; without it the evaluation cannot check for training items")
        return set(questions)


def read_trained_model(spec: str, folder: str) -> TrainedModel:
    """The adapter directory `folder` (what follows `lora:` in the spec `spec`) and its card."""
    directory = Path(folder).expanduser()
    if not folder or not directory.is_dir():
        raise UserError(f"--model {spec}: no such directory; give the --output directory of selfcorrect train")
    return read_card(spec, directory)


def read_card(spec: str, directory: Path) -> TrainedModel:
    """The training card in `directory`, which must name a base model."""
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
    return TrainedModel(spec, directory, card, str(base))


def peft_base(adapter_dir: Path) -> str | None:
    """The base a PEFT adapter's own config names (base_model_name_or_path), for an adapter without a card."""
    config_path = adapter_dir / PEFT_CONFIG_FILE
    try:
        return json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--model hf:{adapter_dir}: {config_path} is not readable JSON ({err})") from None
