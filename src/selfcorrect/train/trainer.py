"""Fine-tuning: a LoRA adapter trained with TRL and PEFT on a training-data file, written with a training card.

`train(data, model, output)` (the `train` command) reads one of the three row formats `selfcorrect data` writes
(train/data.py describes them; a row's format is its recipe's, named in its `source`): prompt/completion rows go to TRL's SFTTrainer with the loss on the completion only,
preference rows to its DPOTrainer (the reference is the base itself: TRL disables the adapter of a PEFT model
to compute it), and span-masked traces (`messages` + `no_loss`) are tokenized here into `input_ids` and a
`completion_mask` that TRL 1.16's SFTTrainer turns into labels (-100 where the mask is 0) when
`completion_only_loss` is on.

The base is loaded by transformers: `embedded` and `llamacpp:PATH.gguf` as their GGUF file, dequantised (the
weights llama.cpp computes with, in float32), `hf:` as models/hf.py loads it. Its tokenizer carries the GGUF's
own chat template, so training renders conversations exactly as llama.cpp does when the trained model is
measured (the same text and the same tokens: tests/test_train_lora.py checks it).

Everything that can be wrong with the input is checked before the model is loaded or anything is written. A
training is seeded (LoRA initialisation, data order, dropout) and checkpoints into `output/checkpoints/`; run
the same command again after it was killed and it resumes from the last whole checkpoint, with the optimizer,
scheduler, random states and data position restored, so it ends with the same adapter as an uninterrupted run.
One process at a time trains into a directory (a lock beside it, `OUTPUT.locks/`, as a run is locked): a second
one is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..files import write_atomically
from ..progress import duration
from ..store import ProcessLock
from ..models.spec import LLAMACPP, ModelSpec, check_model_spec
from ..models.hf import import_torch, load_pretrained, locate
from ..models.identity import file_digest, files_digest
from ..api import code_isolation
from ..grader_pool import DEFAULT_TIMEOUT_S
from ..isolation import using
from ..run_config import check_isolation_mode
from ..models.trained import CARD_FILE, GGUF_ADAPTER_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from .data import FORMATS, RECIPES, all_recipes
from .rl import Episodes, Rewards, build_rl_trainer, load_episodes
from .settings import Hyperparameters

INSTALL_HINT = "needs the train extra: pip install 'selfcorrect[train]'"
# The attention and MLP projections of Llama-like models (SmolLM2, Llama, Qwen, Mistral).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROLES = ("system", "user", "assistant")
CHECKPOINTS = "checkpoints"
# Counters and timings the trainers put in their log lines beside what they measure (the card keeps `step` and
# our own `seconds`).
LOG_BOOKKEEPING = ("epoch", "num_tokens", "num_input_tokens_seen", "total_flos", "train_runtime", "train_loss",
                   "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")
# What an rl training's log lines say of its rollouts (train/rl.py logs them), as the progress names them.
RL_PROGRESS = (("r1", "r1"), ("r2", "r2"), ("right->wrong", "right_to_wrong"), ("wrong->right", "wrong_to_right"))
# The TRL trainer of each row format.
TRAINERS = {"prompt/completion": "SFTTrainer", "span-masked": "SFTTrainer", "preference": "DPOTrainer",
            "episode": "GRPOTrainer"}
# What a training in `checkpoints/` was started with: a rerun resumes it only when these are the same.
SETTINGS = "settings.json"
# Checkpoints kept: the last one, and the one before in case the process was killed while writing the last.
KEEP_CHECKPOINTS = 2
# Log lines (and card losses) per training, about: one every total_steps / LOGS_PER_TRAINING steps.
LOGS_PER_TRAINING = 100


@dataclass(frozen=True)
class TrainingData:
    """A validated training-data file: its rows without `source`, and what their sources say."""

    path: Path
    row_format: str
    rows: list[dict]
    recipe: str
    questions: list[str]  # question_sha256 of the rows, sorted, unique


def check_trainable(spec: str) -> None:
    """Refuse (UserError) a model spec that cannot be fine-tuned here, or a missing `train` extra."""
    model = check_model_spec(spec)
    if model.is_adapter:
        raise UserError(f"--model {spec}: is a trained adapter; train from its base model")
    if not model.trainable:
        raise UserError(f"--model {spec}: only embedded, llamacpp:PATH.gguf and hf:PATH_OR_ID models can be "
                        "fine-tuned (their weights are needed)")
    try:
        import_torch()  # first, with the thread policy models/hf.py explains
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        raise UserError(f"selfcorrect train {INSTALL_HINT}") from None
    if model.engine == LLAMACPP:
        _check_llama_cpp_adapter(model)


def _check_llama_cpp_adapter(spec: ModelSpec) -> None:
    """A model trained from a llama.cpp base runs on llama.cpp with its adapter written as GGUF, which
    export_gguf can do for some architectures only: refuse the others before training rather than after."""
    from .export_gguf import SUPPORTED_ARCHITECTURES, read_base

    path = spec.gguf
    try:
        architecture = read_base(path).architecture
    except (OSError, ValueError) as error:
        raise UserError(f"--model {spec.text}: cannot read it as GGUF ({error})") from None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"--model {spec.text}: a {architecture} model cannot be fine-tuned for llama.cpp here (its LoRA "
                        f"is written for {', '.join(sorted(SUPPORTED_ARCHITECTURES))} models); train hf:{path} "
                        "to measure it on transformers")


def read_training_data(path: Path) -> TrainingData:
    """The rows of a JSONL training-data file, each checked to hold the fields of one format (the same for the
    whole file), with messages of known roles and string contents; UserError naming file:line and field."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a JSONL file written by `selfcorrect data`")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); give a JSONL file") from None
    row_format, first_line, rows, recipes, questions = None, 0, [], set(), set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            raise UserError(f"{where}: not JSON ({error.msg}); each line is one row") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row is a JSON object, not {type(row).__name__}")
        this_format = _row_format(row, where)  # its recipe's
        if row_format is None:
            row_format, first_line = this_format, number
        elif this_format != row_format:
            raise UserError(f"{where}: a {this_format} row ({'/'.join(FORMATS[this_format])}) in a file of "
                            f"{row_format} rows (line {first_line}); a file holds rows of one format")
        _check_row(row, row_format, where)
        recipes.add(row["source"]["recipe"])
        questions.add(row["source"]["question_sha256"])
        rows.append({field: row[field] for field in FORMATS[row_format]})  # `source` is not for the trainer
    if not rows:
        raise UserError(f"{path}: no rows; give a JSONL file written by `selfcorrect data`")
    return TrainingData(path, row_format, rows, "+".join(sorted(recipes)) if len(recipes) > 1 else recipes.pop(),
                        sorted(questions))


def _row_format(row: dict, where: str) -> str:
    """The row format of the recipe the row's `source` names (train/data.py registers each recipe's)."""
    if "source" not in row:
        raise UserError(f"{where}: field 'source' is missing (every row names its recipe and question there)")
    source = row["source"]
    if not isinstance(source, dict):
        raise UserError(f"{where}: field 'source' must be an object with recipe and question_sha256")
    for key in ("recipe", "question_sha256"):
        if not isinstance(source.get(key), str) or not source[key]:
            raise UserError(f"{where}: field 'source.{key}' must be a non-empty string")
    recipe = all_recipes().get(source["recipe"])
    if recipe is None:
        raise UserError(f"{where}: field 'source.recipe' is {source['recipe']!r}, not a recipe of selfcorrect data "
                        f"({', '.join(RECIPES)})")
    return recipe.row_format


def _check_row(row: dict, row_format: str, where: str) -> None:
    for field in FORMATS[row_format]:
        if field not in row:
            raise UserError(f"{where}: field '{field}' is missing (a {row_format} row holds "
                            f"{', '.join(FORMATS[row_format])} and source)")
    if row_format == "episode":
        for field in ("prompt", "correction"):
            if _check_messages(row[field], where, field)[-1]["role"] != "user":
                raise UserError(f"{where}: field '{field}' must end with a user message (an attempt follows it)")
        task = row["task"]
        if not (isinstance(task, dict) and isinstance(task.get("task"), str) and isinstance(task.get("options"), dict)
                and isinstance(task.get("data"), (str, type(None)))):
            raise UserError(f"{where}: field 'task' must be an object with task, data and options (how the task loads)")
        for field in ("item", "target"):
            if not isinstance(row[field], str):
                raise UserError(f"{where}: field '{field}' must be a string")
        return
    if row_format == "span-masked":
        messages = _check_messages(row["messages"], where, "messages")
        no_loss = row["no_loss"]
        if not isinstance(no_loss, list) or not all(type(index) is int for index in no_loss):
            raise UserError(f"{where}: field 'no_loss' must be a list of message indices")
        for index in no_loss:
            if not 0 <= index < len(messages) or messages[index]["role"] != "assistant":
                raise UserError(f"{where}: field 'no_loss' holds {index}, which is not the index of an assistant "
                                "message in 'messages'")
        if all(m["role"] != "assistant" or i in no_loss for i, m in enumerate(messages)):
            raise UserError(f"{where}: field 'no_loss': no assistant message carries loss")
        return
    prompt = _check_messages(row["prompt"], where, "prompt")
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: field 'prompt' must end with a user message (the reply to train follows it)")
    for field in FORMATS[row_format][1:]:
        for index, message in enumerate(_check_messages(row[field], where, field)):
            if message["role"] != "assistant":
                raise UserError(f"{where}: field '{field}[{index}].role' must be assistant")


def _check_messages(messages: Any, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: field '{field}[{index}]' must be an object with role and content")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: field '{field}[{index}].role' must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: field '{field}[{index}].content' must be a string")
    return messages


def base_identity(spec: str) -> str | None:
    """The base's weights by content (models/identity.py), or None for a Hub id (known once loaded)."""
    weights = locate(_source(ModelSpec.of(spec)))[2]
    return weights and weights.removeprefix("hf:")


def _source(model: ModelSpec) -> str:
    """What transformers loads for `model`: its GGUF file, else its directory or Hub id."""
    return str(model.gguf) if model.gguf is not None else model.source


def train(data: str | Path, model: str, output: str | Path, *, callbacks: tuple = (), isolation: str = "auto",
          **hyperparameters) -> dict:
    """Train a LoRA adapter of `model` (a spec) on the rows of `data` into the directory `output`, and return its
    training card. Keyword arguments are the fields of `Hyperparameters`; `callbacks` are extra transformers
    `TrainerCallback`s. An `output` that holds the finished training of the same base, data and hyperparameters
    returns its card; an unfinished one resumes. While another process trains into `output`, UserError names it.
    `isolation` is what model-written code an rl training grades runs inside (as `evaluate` takes it)."""
    try:
        settings = Hyperparameters(**hyperparameters)
    except TypeError as error:
        raise UserError(f"train: {error}") from None
    settings.check()
    check_isolation_mode(isolation)
    check_trainable(model)
    model = ModelSpec.of(model).absolute()  # the card's base must be found from anywhere
    rows = read_training_data(Path(data).expanduser())
    settings.check_for(rows.row_format, len(rows.rows))
    init = init_adapter(settings.init, model) if settings.init is not None else None
    episodes = None
    if rows.row_format == "episode":
        episodes = load_episodes(rows.rows, rows.path)
        for task in episodes.tasks.values():
            code_isolation(task, isolation)
    output = Path(output).expanduser()
    started = {
        "base_model": model,
        "base_identity": base_identity(model),
        "data_sha256": file_digest(rows.path),
        "hyperparameters": settings.shaping(rows.row_format),
    }
    if init is not None:  # the adapter started from, by content
        started["hyperparameters"]["init"] = init.identity
    with training_lock(output):  # a second process training into `output` stops here, naming the first
        finished = _check_output(output, started)
        return finished if finished is not None else _train(model, rows, settings, output, started, callbacks,
                                                            episodes, init, isolation)


@dataclass(frozen=True)
class InitAdapter:
    """The trained adapter an rl training starts from (`--init lora:DIR`)."""

    spec: str  # lora:DIR, the directory resolved (the card names it so, found from anywhere)
    directory: Path
    identity: str  # the spec and its PEFT files' digest
    questions: list[str]  # the questions it was trained on: the new card lists them too


def init_adapter(spec: str, model: str) -> InitAdapter:
    """`--init`'s adapter, checked to be a model trained by selfcorrect train from `model` (an absolute spec) with
    its PEFT files whole; UserError otherwise."""
    named = check_model_spec(spec)
    if named.kind != "lora":
        raise UserError(f"--init {spec}: give a trained model, lora:DIR (the --output of selfcorrect train)")
    trained = named.trained
    if ModelSpec.of(trained.base).absolute() != model:
        raise UserError(f"--init {spec}: was trained from {trained.base}, not from --model {model}")
    files = [trained.directory / PEFT_CONFIG_FILE, trained.directory / PEFT_WEIGHTS_FILE]
    for file in files:
        if not file.is_file():
            raise UserError(f"--init {spec}: {file} is missing; the adapter was not saved whole")
    resolved = f"lora:{trained.directory.resolve()}"
    return InitAdapter(resolved, trained.directory.resolve(), f"{resolved}:{files_digest(files)}",
                       sorted(trained.questions()))


def training_lock(output: Path) -> ProcessLock:
    """Claim `output` for this process's training until the lock is released: two trainings into one directory
    would write the same checkpoints and adapter. Locked as a run is (store.ProcessLock), with the lock file
    beside the directory (`OUTPUT.locks/`), which the checks of what `output` holds need not know of."""
    # Named from the resolved path: `--output .` locks `../NAME.locks`, not a folder called `..locks`.
    return ProcessLock(Path(f"{Path(output).expanduser().resolve()}.locks") / "training.lock", f"--output {output}",
                       lambda _: f"a training into --output {output} is already running")


def _train(model: str, rows: TrainingData, settings: Hyperparameters, output: Path, started: dict,
           callbacks: tuple, episodes: Episodes | None, init: InitAdapter | None, isolation: str) -> dict:
    """`train` from the point where `output` is known to be new or an unfinished training of these settings."""
    print(f"loading {model} for training", file=sys.stderr, flush=True)
    base, tokenizer, weights = base_model(model)
    base = copy.deepcopy(base)
    if started["base_identity"] is None:  # a Hub id: named by the revision it resolved to
        started["base_identity"] = weights.removeprefix("hf:")
    checkpoints = output / CHECKPOINTS
    rewards = None
    try:
        if episodes is not None:
            rewards = Rewards(episodes, DEFAULT_TIMEOUT_S)
        trainer, progress = build_trainer(base, tokenizer, rows, settings, checkpoints, callbacks, rewards, init)
        checkpoints.mkdir(parents=True, exist_ok=True)  # the first write, once the rows are tokenized
        write_atomically(checkpoints / SETTINGS, json.dumps(started, indent=1))
        resume = _last_whole_checkpoint(checkpoints)
        if resume:
            print(f"resuming from {resume}", file=sys.stderr, flush=True)
        with _quiet_libraries(), using(isolation):  # an rl episode's code is graded in the sandbox, as a run's
            trainer.train(resume_from_checkpoint=resume)
            # adapter_config.json + adapter_model.safetensors, of the adapter trained (not rl's frozen reference)
            trainer.model.save_pretrained(str(output), selected_adapters=["default"])
    finally:
        if rewards is not None:
            rewards.close()
    state = trainer.state
    seconds = progress.seconds(state)
    card = {
        "base_model": model,
        "base_identity": started["base_identity"],
        "data": {"path": str(rows.path.resolve()), "sha256": started["data_sha256"], "recipe": rows.recipe,
                 "format": rows.row_format, "rows": len(rows.rows)},
        "hyperparameters": started["hyperparameters"],
        "training": {"trainer": TRAINERS[rows.row_format],
                     "target_modules": TARGET_MODULES, "steps": state.global_step, "device": str(trainer.args.device),
                     "dtype": str(base.dtype).removeprefix("torch."), "optimizer": str(trainer.args.optim.value),
                     "lr_scheduler": str(trainer.args.lr_scheduler_type.value), "software": _versions()},
        # What each log line measured: the loss, and what else the trainer logs (learning rate, gradient norm,
        # token accuracy, DPO's rewards and margins), for the curves of the improve page; not its bookkeeping.
        "losses": [{key: value for key, value in log.items()
                    if isinstance(value, (int, float)) and key not in LOG_BOOKKEEPING}
                   for log in state.log_history if "loss" in log],
        "seconds": round(seconds, 3),
        "trained_tokens": state.num_input_tokens_seen,
        "tokens_per_second": round(state.num_input_tokens_seen / seconds, 1) if seconds else 0.0,
        # An rl training from an adapter: the questions that one was trained on too, for the leak check.
        "trained_questions": sorted(set(rows.questions) | set(init.questions if init else ())),
    }
    if init is not None:
        card["init"] = init.spec
    gguf = ModelSpec.of(model).gguf
    if gguf is not None:
        card["gguf_adapter"] = _export_gguf(output, gguf)
    write_atomically(output / CARD_FILE, json.dumps(card, indent=1))  # last: a card marks a finished training
    return card


def _check_output(output: Path, started: dict) -> dict | None:
    """The card of a finished training of the same settings in `output`, None when there is none or an
    unfinished one of the same settings; UserError when `output` holds something else."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: is a file; give a directory for the adapter")
    card_path, settings_path = output / CARD_FILE, output / CHECKPOINTS / SETTINGS
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        held = {"base_model": card["base_model"], "base_identity": card["base_identity"],
                "data_sha256": card["data"]["sha256"], "hyperparameters": card["hyperparameters"]}
        difference = _difference(held, started)
        if difference:
            raise UserError(f"--output {output}: holds an adapter trained with another {difference}; give another "
                            "directory (or delete this one to train again)")
        return card
    if settings_path.is_file():
        difference = _difference(json.loads(settings_path.read_text()), started)
        if difference:
            raise UserError(f"--output {output}: holds an unfinished training with another {difference}; run that "
                            "command again to resume it, or give another directory")
        return None
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output {output}: is not empty and holds no training; give a new or empty directory")
    return None


def _difference(held: dict, wanted: dict) -> str | None:
    """The first setting in which `held` differs from `wanted`, as 'data (sha256 ...)'; None if none."""
    for key in ("base_model", "base_identity", "data_sha256", "hyperparameters"):
        if key == "base_identity" and None in (held[key], wanted[key]):
            continue  # a Hub id before loading: its revision is not known yet
        if key == "hyperparameters":
            for name in sorted(set(held[key]) | set(wanted[key])):
                if held[key].get(name) != wanted[key].get(name):
                    return f"{name} ({held[key].get(name)}, not {wanted[key].get(name)})"
        elif held[key] != wanted[key]:
            return f"{key.replace('_', ' ')} ({held[key]}, not {wanted[key]})"
    return None


def base_model(spec: str):
    """(model, tokenizer, weights identity) of a base model spec, loaded by transformers once per process and
    kept (models/hf.py), in bfloat16 on a GPU that computes in it natively (half the memory, full speed),
    float32 on the CPU. Train a copy: PEFT wraps the model it is given in place."""
    torch = import_torch()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    with _quiet_libraries():
        model, tokenizer, weights = load_pretrained(_source(ModelSpec.of(spec)), dtype, f"--model {spec}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only pads: the collator masks padding out of the loss
    return model, tokenizer, weights


def span_masked_example(tokenizer, messages: list[dict], no_loss: list[int]) -> dict:
    """`input_ids` of the whole conversation and its `completion_mask`: 1 on the tokens of each assistant
    message not in `no_loss`. A message's tokens are what TRL trains as the completion of a prompt/completion
    row: from the end of the conversation before it plus the assistant header, to the end of the conversation
    up to it (so its end-of-turn token is learnt too)."""
    from trl.data_utils import common_prefix_length

    def ids(conversation: list[dict], add_generation_prompt: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                add_generation_prompt=add_generation_prompt)
        return list(encoded["input_ids"])

    input_ids = ids(messages)
    mask = [0] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index in no_loss:
            continue
        start, end = ids(messages[:index], add_generation_prompt=True), ids(messages[: index + 1])
        if common_prefix_length(end, input_ids) < len(end) or common_prefix_length(start, end) < len(start):
            raise UserError("the model's chat template renders a conversation differently from its beginning; "
                            "span-masked rows need one that renders each message after the ones before")
        mask[len(start): len(end)] = [1] * (len(end) - len(start))
    return {"input_ids": input_ids, "completion_mask": mask}


def build_trainer(base, tokenizer, rows: TrainingData, settings: Hyperparameters, checkpoints: Path,
                  callbacks: tuple = (), rewards: Rewards | None = None, init: InitAdapter | None = None):
    """(TRL trainer of a LoRA adapter of `base` on `rows`, checkpointing into `checkpoints`; its progress
    callback, which also keeps the training time). Episode rows need `rewards`; `init` is the adapter an rl
    training starts from (a new one otherwise)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback

    cuda = torch.cuda.is_available()
    if rows.row_format == "episode":  # a step takes batch / generations questions, whole groups only
        steps_per_epoch = len(rows.rows) // (settings.batch_size // settings.generations)
    else:
        steps_per_epoch = math.ceil(len(rows.rows) / settings.batch_size)
    total_steps = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    common = dict(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        seed=settings.seed,
        data_seed=settings.seed,
        max_length=None,  # rows are never cut: a cut completion would teach a reply that does not end
        bf16=cuda and base.dtype == torch.bfloat16,
        activation_checkpointing=cuda,  # saves a GPU's memory; on the CPU it would only cost time
        logging_steps=max(1, total_steps // LOGS_PER_TRAINING),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=KEEP_CHECKPOINTS,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # our own progress (`_progress_callback`): a bar with the loss on a terminal, lines off it
        report_to="none",
        dataloader_pin_memory=cuda,
    )
    peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                             target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    with _quiet_libraries():
        if rows.row_format == "episode":
            from peft import PeftModel

            if init is not None:  # trained on from where it stopped; TRL keeps a frozen copy as the KL's reference
                try:
                    base = PeftModel.from_pretrained(base, str(init.directory), is_trainable=True)
                except (OSError, ValueError, RuntimeError) as error:
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise UserError(f"--init {init.spec}: peft cannot load the adapter onto its base ({reason})") from None
                peft_config = None
            trainer = build_rl_trainer(base, tokenizer, rows.rows, settings, common, peft_config, rewards)
        elif rows.row_format == "preference":
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(model=base, args=DPOConfig(beta=settings.beta, **common), processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(rows.rows), peft_config=peft_config)
        else:
            from trl import SFTConfig, SFTTrainer

            if rows.row_format == "span-masked":
                dataset = Dataset.from_list([span_masked_example(tokenizer, r["messages"], r["no_loss"])
                                             for r in rows.rows])
            else:
                dataset = Dataset.from_list(rows.rows)
            # completion_only_loss: TRL masks the prompt of prompt/completion rows, and applies the
            # completion_mask of pre-tokenized rows only when it is on.
            trainer = SFTTrainer(model=base, args=SFTConfig(completion_only_loss=True, **common),
                                 processing_class=tokenizer, train_dataset=dataset, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = _progress_callback()()
    trainer.add_callback(progress)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer, progress


def _last_whole_checkpoint(checkpoints: Path) -> str | None:
    """The latest checkpoint written to the end: the Trainer writes trainer_state.json last, so a checkpoint
    without it was cut short by a kill (the one before it is kept for that case)."""
    whole = [path for path in checkpoints.glob("checkpoint-*")
             if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()]
    return str(max(whole, key=lambda path: int(path.name.removeprefix("checkpoint-")))) if whole else None


@functools.lru_cache(maxsize=1)
def _progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Progress on stderr: a bar with the latest loss on a terminal; off a terminal, one line per log.
        Also the training clock: each log in the state's history gets the seconds trained so far, so that a
        resumed training's time (and tokens/s) counts the time of the steps its checkpoint holds."""

        def __init__(self):
            self.bar = None
            self.started = time.monotonic()
            self.first_step = 0
            self.before = 0.0  # seconds trained before this process, by the checkpoint resumed from

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.first_step = state.global_step  # of this process: a resumed training starts at its checkpoint
            self.before = next((log["seconds"] for log in reversed(state.log_history) if "seconds" in log), 0.0)
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                                file=sys.stderr, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if control.should_save:  # log at every checkpoint, so that its history holds the time trained
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.log_history:
                return
            state.log_history[-1]["seconds"] = round(self.seconds(state), 3)
            if "loss" not in (logs or {}):
                return
            # An rl training's rollouts: attempt 1's and 2's mean rewards and the shares that flipped.
            episodes = {name: logs[key] for name, key in RL_PROGRESS if logs.get(key) is not None}
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", **{name: f"{value:.3f}" for name, value in episodes.items()})
                return
            said = "".join(f", {name} {value:.3f}" for name, value in episodes.items())
            done = state.global_step - self.first_step
            left = (f", about {duration(self.seconds_here() / done * (state.max_steps - state.global_step))} left"
                    if done >= 2 else "")  # once the first steps (loading, the first checkpoint) are behind
            print(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}{said} "
                  f"({self.seconds(state):.0f} s{left})", file=sys.stderr, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def seconds(self, state) -> float:
            return self.before + self.seconds_here()

        def seconds_here(self) -> float:
            return time.monotonic() - self.started

    return Progress


def _export_gguf(output: Path, gguf: Path) -> str | None:
    """Write the adapter for llama.cpp (GGUF_ADAPTER_FILE) beside the PEFT one; the file name, or None when this
    base's architecture has no llama.cpp adapter writer (only an `hf:FILE.gguf` base: it runs on transformers,
    and `check_trainable` refuses llama.cpp bases of such architectures before training)."""
    from .export_gguf import write_gguf_adapter

    try:
        write_gguf_adapter(output, output / GGUF_ADAPTER_FILE, gguf)
    except UserError as error:
        print(f"note: no llama.cpp adapter written: {error}", file=sys.stderr)
        return None
    return GGUF_ADAPTER_FILE


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")}


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Loading and preparing print progress bars of their own (de-quantising the GGUF, each dataset `map`),
    which off a terminal flood the output with carriage returns; our progress says what matters. The GGUF
    loader's bar is a plain tqdm that no switch of transformers turns off, so it is replaced while we run."""
    from unittest import mock

    import datasets
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    datasets_bars, transformers_bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_loader, "tqdm", functools.partial(gguf_loader.tqdm, disable=True)), \
                warnings.catch_warnings():
            # Notes to library developers, about things that do not apply here: TRL reads a property
            # transformers renamed, and PEFT cannot look up the config of a base loaded from a GGUF file to
            # see whether its vocabulary grew (it did not: no tokens are added).
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", "Could not find a config file in", UserWarning)
            # TRL 1.16's rollout function (train/rl.py) is marked experimental; the version is pinned.
            warnings.filterwarnings("ignore", "You are using 'rollout_func'", UserWarning)
            yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
