"""Fine-tuning (`selfcorrect train`): input refused before anything is loaded or written, and real LoRA
trainings of the embedded model (loaded once per session by the trainer's cache): the loss falls, DPO starts
from the base as its reference, span masks cover exactly the trained messages, and a training interrupted
after a checkpoint resumes to the very adapter an uninterrupted one ends with."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfcorrect.errors import UserError

from conftest import ScriptedBackend, cli

ROWS = 16  # prompt/completion rows: four steps of four rows make one epoch


def source(recipe: str, question: str) -> dict:
    return {"recipe": recipe, "part": recipe, "run": "r1", "item": question, "sample": 0, "round": 0,
            "question_sha256": hashlib.sha256(question.encode()).hexdigest()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_rows() -> list[dict]:
    rows = []
    for n in range(ROWS):
        question = f"What is {n + 3} + {2 * n + 5}?"
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "completion": [{"role": "assistant", "content": f"The answer is {3 * n + 8}."}],
                     "source": source("sft", question)})
    return rows


def preference_rows() -> list[dict]:
    rows = []
    for n in range(4):
        question = f"What is {n + 2} * 3?"
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {3 * n + 6}."}],
                     "rejected": [{"role": "assistant", "content": f"The answer is {3 * n + 7}."}],
                     "source": source("scl", question)})
    return rows


def pam_row(n: int) -> dict:
    question = f"What is {n + 4} - 2?"
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"The answer is {n + 3}."},
                         {"role": "user", "content": "Review your previous answer and find problems with it."},
                         {"role": "assistant", "content": f"I subtracted wrongly. The answer is {n + 2}."}],
            "no_loss": [1], "source": source("pam", question)}


# --- refused before anything is loaded or written -------------------------------------------------------------

GOOD = sft_rows()[0]
BAD_FILES = {
    "missing field": ([preference_rows()[0], {k: v for k, v in preference_rows()[1].items() if k != "rejected"}],
                      ":2: field 'rejected' is missing"),
    "missing source": ([{k: v for k, v in GOOD.items() if k != "source"}], ":1: field 'source' is missing"),
    # The format is the recipe's: an sft row without its completion lacks that field.
    "no completion": ([{"prompt": GOOD["prompt"], "source": GOOD["source"]}], ":1: field 'completion' is missing"),
    "unknown recipe": ([{**GOOD, "source": {**GOOD["source"], "recipe": "dpo"}}],
                       ":1: field 'source.recipe' is 'dpo', not a recipe of selfcorrect data"),
    "mixed formats": ([GOOD, preference_rows()[0]], ":2: a preference row (prompt/chosen/rejected) in a file of "
                                                    "prompt/completion rows (line 1)"),
    "content not a string": ([GOOD, {**GOOD, "prompt": [{"role": "user", "content": 7}]}],
                             ":2: field 'prompt[0].content' must be a string"),
    "unknown role": ([{**GOOD, "completion": [{"role": "bot", "content": "4"}]}],
                     ":1: field 'completion[0].role' must be one of"),
    "no_loss on a user message": ([{**pam_row(0), "no_loss": [2]}], ":1: field 'no_loss' holds 2"),
    "no loss left": ([{**pam_row(0), "no_loss": [1, 3]}], ":1: field 'no_loss': no assistant message carries loss"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_rows_are_refused_naming_line_and_field(tmp_path, case):
    rows, message = BAD_FILES[case]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    from selfcorrect.train.trainer import train

    with pytest.raises(UserError) as refused:
        train(data, "embedded", tmp_path / "adapter")
    assert f"{data}{message}" in str(refused.value)
    assert not (tmp_path / "adapter").exists()


def test_not_json_and_missing_file(tmp_path):
    from selfcorrect.train.trainer import train

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not JSON"):
        train(data, "embedded", tmp_path / "adapter")
    with pytest.raises(UserError, match="no such file"):
        train(tmp_path / "missing.jsonl", "embedded", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown model spec"),
    ("llamacpp:/nonexistent/model.gguf", "no such file"),
    ("openai:m@http://127.0.0.1:9/v1", "can be fine-tuned"),
])
def test_unknown_or_untrainable_model_is_refused(tmp_path, spec, message):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    with pytest.raises(UserError, match=message):
        train(data, spec, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_missing_train_extra_is_one_line(tmp_path, monkeypatch):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    monkeypatch.setitem(sys.modules, "trl", None)  # what `import trl` meets when TRL is not installed
    with pytest.raises(UserError, match=r"needs the train extra: pip install 'selfcorrect\[train\]'"):
        train(data, "embedded", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_refusals_exit_2_with_one_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_FILES["mixed formats"][0])
    result = cli("train", str(data), "--output", str(tmp_path / "adapter"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {data}{BAD_FILES['mixed formats'][1]}"
                                                  "; a file holds rows of one format"]
    # without the extra: the CLI as a user runs it, in a Python where TRL cannot be imported
    good = write_jsonl(tmp_path / "good.jsonl", sft_rows())
    blocked = "import sys; sys.modules['trl'] = None; sys.argv[0] = 'selfcorrect'; from selfcorrect.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", blocked, "train", str(good), "--output", str(tmp_path / "adapter")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: selfcorrect train needs the train extra: "
                                                  "pip install 'selfcorrect[train]'"]
    assert not (tmp_path / "adapter").exists()


def test_output_that_holds_something_else_is_refused(tmp_path):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no training"):
        train(data, "embedded", tmp_path / "adapter")
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("rows", [sft_rows, preference_rows], ids=["sft", "dpo"])
def test_a_second_training_into_one_directory_is_refused_naming_the_first(tmp_path, rows):
    """While one process trains into a directory (here: holds its training lock, as `train` does until it ends),
    a training into it by another process, with either trainer, stops at once: one line naming the first, exit 2,
    nothing written. Once the first has ended (killed here), the next one goes on, and leaves no lock behind."""
    from selfcorrect.train.trainer import training_lock

    data, output = write_jsonl(tmp_path / "data.jsonl", rows()), tmp_path / "adapter"
    holding = ("import sys, time; from pathlib import Path; from selfcorrect.train.trainer import training_lock; "
               "lock = training_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)")
    first = subprocess.Popen([sys.executable, "-c", holding, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        second = cli("train", str(data), "--output", str(output))
    finally:
        first.kill()
        first.communicate()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: a training into --output {output} is already running (pid {first.pid} on "
                               f"host {socket.gethostname()}, since "), lines[0]
    assert not output.exists()
    with training_lock(output):
        pass
    assert not Path(f"{output}.locks").exists()


def test_the_training_lock_of_a_relative_output_sits_beside_it(tmp_path, monkeypatch):
    """`--output .` (or a path ending in ..) is locked beside the directory it names, not in `..locks`."""
    from selfcorrect.train.trainer import training_lock

    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path / "adapter")
    lock = training_lock(Path("."))
    try:
        assert lock.path == tmp_path / "adapter.locks" / "training.lock" and lock.path.exists()
    finally:
        lock.release()
    assert not (tmp_path / "adapter" / "..locks").exists() and not (tmp_path / "adapter.locks").exists()


@pytest.mark.parametrize("setting, refusal", [
    ({"batch_size": 0}, "--batch-size 0: must be above 0"),
    ({"learning_rate": -1.0}, "--lr -1.0: must be above 0"),
    ({"max_steps": 0}, "--max-steps 0: must be at least 1"),
])
def test_bad_hyperparameters_are_refused(tmp_path, setting, refusal):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    with pytest.raises(UserError, match=refusal):
        train(data, "embedded", tmp_path / "adapter", **setting)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("command", ["train", "improve"])
def test_every_training_option_reaches_the_training_from_both_commands(tmp_path, command):
    """`train` and `improve` take the same training options, generated from Hyperparameters: each flag is
    offered by both, and a bad value given to either is refused by the same check, naming the flag."""
    from dataclasses import fields

    from selfcorrect.train.settings import Hyperparameters

    shown = cli(command, "--help", env={"COLUMNS": "300"}).stdout
    assert all(setting.metadata["flag"] in shown for setting in fields(Hyperparameters))
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows())
    where = ([str(data), "--output", str(tmp_path / "adapter")] if command == "train" else
             ["--output", str(tmp_path / "loop"), "--db", str(tmp_path / "runs.sqlite")])
    for flag, refusal in (("--lora-r", "--lora-r 0: must be above 0"), ("--max-steps", "--max-steps 0: must be at least 1")):
        refused = cli(command, *where, flag, "0")
        assert refused.returncode == 2 and refused.stderr.strip() == f"error: {refusal}", refused.stderr
    if command == "improve":  # and every data option of `data`
        assert "--balance" in shown and "--clt-source" in shown and "--clt-share" in shown
        refused = cli(command, *where, "--strategy", "critique", "--clt-source", "gold")
        assert refused.returncode == 2 and "strategy 'critique' asks for replies" in refused.stderr, refused.stderr
    assert not (tmp_path / "runs.sqlite").exists() and not (tmp_path / "loop").exists()
    assert not (tmp_path / "adapter").exists()


def test_improve_runs_every_measurement_inside_the_isolation_asked(tmp_path, monkeypatch):
    """`improve --isolation` reaches each run the loop makes (the training part, the base and the trained model
    on the held-out part). The runs are made for real by a scripted model, the training is left out."""
    from dataclasses import replace

    from selfcorrect.train import loop, trainer

    real_evaluate, measured = loop.evaluate, []

    def evaluate(config, **progress):
        measured.append((config.split, config.model, config.isolation))
        return real_evaluate(replace(config, model="embedded"), backend=ScriptedBackend(identity=f"scripted:{config.model}"),
                             **progress)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(trainer, "check_trainable", lambda spec: None)
    monkeypatch.setattr(trainer, "train", lambda rows, model, adapter, **options: {"data": {"rows": 1}, "seconds": 0.0})
    output = tmp_path / "loop"
    done = cli("improve", "--output", str(output), "--recipe", "sft", "--task-opt", "n=12", "--isolation", "process",
               "--json", "--db", str(tmp_path / "runs.sqlite"))
    assert done.returncode == 0, done.stderr
    assert measured == [("train", "embedded", "process"), ("test", "embedded", "process"),
                        ("test", f"lora:{output / 'sft'}", "process")]


# --- real trainings of the embedded model ----------------------------------------------------------------------

RESUMABLE = dict(max_steps=4, batch_size=4, save_steps=2, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Four steps on the prompt/completion rows, never stopped: (data file, output directory, card)."""
    from selfcorrect.train.trainer import train

    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "data.jsonl", sft_rows())
    return data, folder / "adapter", train(data, "embedded", folder / "adapter", **RESUMABLE)


@pytest.mark.slow
@pytest.mark.model
def test_training_lowers_the_loss_and_writes_adapter_and_card(uninterrupted):
    data, output, card = uninterrupted
    losses = [log["loss"] for log in card["losses"]]
    assert [log["step"] for log in card["losses"]] == [1, 2, 3, 4]
    # 16 short rows seen once each: measured 1.13 -> 0.60 on an AMD EPYC (0.53 of the first). 0.8 is far from
    # either side: a training that learnt nothing stays near 1, and one CPU's rounding moves the ratio by hundredths.
    assert losses[-1] < 0.8 * losses[0], losses
    for name in ("adapter_model.safetensors", "adapter_config.json", "adapter.gguf", "training_card.json"):
        assert (output / name).is_file(), name
    assert json.loads((output / "training_card.json").read_text()) == card
    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.0)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    from selfcorrect.models.identity import file_digest
    from selfcorrect.models.spec import embedded_model_path

    assert card["base_model"] == "embedded"
    assert card["base_identity"] == f"{embedded_model_path().name}:{file_digest(embedded_model_path())}"
    assert card["data"] == {"path": str(data.resolve()), "sha256": file_digest(data), "recipe": "sft",
                            "format": "prompt/completion", "rows": ROWS}
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    assert card["trained_questions"] == sorted({row["source"]["question_sha256"] for row in lines})
    assert card["hyperparameters"]["max_steps"] == 4 and "beta" not in card["hyperparameters"]
    assert card["trained_tokens"] > 0 and card["tokens_per_second"] == pytest.approx(
        card["trained_tokens"] / card["seconds"], rel=0.01)


@pytest.mark.slow
@pytest.mark.model
def test_same_command_again_returns_the_finished_card_and_other_settings_are_refused(uninterrupted):
    from selfcorrect.train.trainer import train

    data, output, card = uninterrupted
    before = {path: path.stat().st_mtime_ns for path in output.rglob("*")}
    assert train(data, "embedded", output, **{**RESUMABLE, "save_steps": 3}) == card  # save_steps shapes nothing
    with pytest.raises(UserError, match=r"holds an adapter trained with another learning_rate \(0.0002, not 0.001\)"):
        train(data, "embedded", output, **{**RESUMABLE, "learning_rate": 1e-3})
    other = write_jsonl(data.with_name("other.jsonl"), sft_rows()[:8])
    with pytest.raises(UserError, match="holds an adapter trained with another data sha256"):
        train(other, "embedded", output, **RESUMABLE)
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*")} == before


@pytest.mark.slow
@pytest.mark.model
def test_interrupted_training_resumes_to_the_same_adapter(uninterrupted, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from selfcorrect.train.trainer import train

    data, full_output, full_card = uninterrupted

    class CtrlCAtStep3(TrainerCallback):  # Ctrl-C after the checkpoint of step 2, before the one of step 4
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    output = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train(data, "embedded", output, callbacks=(CtrlCAtStep3(),), **RESUMABLE)
    assert sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output / "training_card.json").exists() and not (output / "adapter_model.safetensors").exists()

    card = train(data, "embedded", output, **RESUMABLE)
    full, resumed = load_file(full_output / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    # Bit for bit: the checkpoint restores weights, optimizer, scheduler, random states and the data position,
    # and the same computations on the same machine give the same floats.
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert [log["loss"] for log in card["losses"]] == [log["loss"] for log in full_card["losses"]]
    assert card["trained_tokens"] == full_card["trained_tokens"]


@pytest.mark.slow
@pytest.mark.model
def test_dpo_starts_from_the_base_as_reference_and_writes_an_adapter(tmp_path):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows())
    card = train(data, "embedded", tmp_path / "adapter", max_steps=2, batch_size=2, save_steps=10)
    assert card["training"]["trainer"] == "DPOTrainer" and card["hyperparameters"]["beta"] == 0.1
    # LoRA's B starts at zero, so at the first step the policy is the reference: the DPO loss is -log sigmoid(0).
    assert card["losses"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert len(card["losses"]) == 2 and card["losses"][1]["loss"] < card["losses"][0]["loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert card["data"]["recipe"] == "scl"


@pytest.mark.slow
@pytest.mark.model
def test_span_masks_cover_exactly_the_messages_that_carry_loss(tmp_path):
    from selfcorrect.train.trainer import (Hyperparameters, base_model, build_trainer, read_training_data,
                                           span_masked_example)

    model, tokenizer, _ = base_model("embedded")
    row = {**pam_row(0), "messages": pam_row(0)["messages"] + [
        {"role": "user", "content": "And 5 - 2?"}, {"role": "assistant", "content": "The answer is 3."}]}
    example = span_masked_example(tokenizer, row["messages"], row["no_loss"])
    ids, mask = example["input_ids"], example["completion_mask"]
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    # Each trained message with its end-of-turn, as TRL trains a prompt/completion row's completion.
    assert [tokenizer.decode(run) for run in runs] == [f"{row['messages'][3]['content']}<|im_end|>\n",
                                                       f"{row['messages'][5]['content']}<|im_end|>\n"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)

    # TRL 1.16 turns the mask into the labels it trains on (-100: no loss).
    data = write_jsonl(tmp_path / "pam.jsonl", [row, pam_row(1)])
    import copy

    trainer, _ = build_trainer(copy.deepcopy(model), tokenizer, read_training_data(data), Hyperparameters(),
                               tmp_path / "checkpoints")
    labels = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    assert labels[tuple(ids)] == [token if bit else -100 for token, bit in zip(ids, mask)]


@pytest.mark.slow
@pytest.mark.model
def test_training_renders_conversations_as_llama_cpp_does(embedded):
    """The tokenizer transformers makes of the GGUF carries the GGUF's chat template: the conversation text and
    its tokens are the ones the embedded engine computes with when the trained model is measured."""
    from selfcorrect.train.trainer import base_model

    _, tokenizer, _ = base_model("embedded")
    conversation = pam_row(7)["messages"][:3]
    rendered = embedded.chat_format(messages=conversation).prompt
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == rendered
    tokens = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert list(tokens["input_ids"]) == embedded.llm.tokenize(rendered.encode(), add_bos=False, special=True)
