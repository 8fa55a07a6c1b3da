"""What a run id and a cached reply are tied to: the model's bytes (not its file name and size), the build
that computes with them, the prompt texts the run sends; what an HTTP server reports is kept with every
turn; how each reply ended is kept and reported; stores made before all this still open and report."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import llama_cpp
import pytest

from selfcorrect import evaluate, load_run
from selfcorrect.errors import UserError
from selfcorrect.models.identity import file_digest, llama_cpp_build
from selfcorrect.models.llamacpp import LlamaCppBackend
from selfcorrect.models.spec import embedded_model_path
from selfcorrect.models.ray_pool import pool_identity
from selfcorrect.strategies import STRATEGIES, register_strategy

from conftest import ScriptedBackend, cli, run_cli

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFCORRECT_HASH_CACHE", str(tmp_path / "hashes.json"))


def test_file_digest_follows_content_and_is_computed_once_per_file_version(tmp_path, monkeypatch):
    import selfcorrect.models.identity as identity

    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights-A" * 1000)
    first = file_digest(model)
    with monkeypatch.context() as patch:  # the second time the cached hash serves: nothing is hashed
        patch.setattr(identity.hashlib, "sha256", lambda: pytest.fail("hashed the same file version again"))
        assert file_digest(model) == first
    stamp = model.stat().st_mtime_ns
    model.write_bytes(b"weights-B" * 1000)  # same name and size, and the old mtime back (as `cp -p` keeps it)
    os.utime(model, ns=(stamp, stamp))
    assert file_digest(model) != first
    (tmp_path / "hashes.json").write_text("{not json")  # a damaged cache is only a cache
    assert file_digest(model) == file_digest(model)


def test_the_embedded_identity_names_its_bytes_and_its_llama_cpp_build(embedded):
    path = embedded_model_path()
    assert file_digest(path) in embedded.identity and str(path.stat().st_size) not in embedded.identity
    build = llama_cpp_build()
    assert embedded.identity.endswith(build) and build.startswith(f"llama.cpp-{llama_cpp.__version__}[")
    info = llama_cpp.llama_print_system_info().decode().removeprefix("CPU : ")  # "SSE3 = 1 | AVX = 1 | ..."
    enabled = {part.split(" = ")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")}
    assert "AVX2" in enabled and set(build[build.index("[") + 1:-1].split(",")) == enabled


def test_a_checkpoint_saved_over_the_old_one_makes_a_new_run_and_misses_the_cache(tmp_path):
    model = tmp_path / "model.gguf"
    shutil.copyfile(embedded_model_path(), model)
    db = str(tmp_path / "runs.sqlite")
    args = ("run", "--model", f"llamacpp:{model}", "--limit", "2", "--max-tokens", "24", "--db", db, "--json")
    env = {"SELFCORRECT_HASH_CACHE": str(tmp_path / "hashes.json")}
    # Processes of their own: each loads the model file anew (and frees it at its exit), as a user's would.
    first = json.loads(run_cli(*args, env=env).stdout)
    again = json.loads(run_cli(*args, env=env).stdout)
    assert again["run_id"] == first["run_id"] and again["generated"] == 0  # the same model resumes
    # "Re-train" it: other bytes, same file name and size (the model's name in its metadata changes).
    data = bytearray(model.read_bytes())
    at = data.index(b"Smollm2 135M")
    data[at:at + 7] = b"Retrain"
    model.write_bytes(bytes(data))
    retrained = json.loads(run_cli(*args, env=env).stdout)
    assert retrained["run_id"] != first["run_id"]
    assert retrained["generated"] == 4 and retrained["cache_hits"] == 0
    assert retrained["config"]["backend"] != first["config"]["backend"]


def test_editing_a_prompt_makes_a_new_run(tmp_path):
    db = tmp_path / "runs.sqlite"

    def strategy_saying(text: str):
        def correct(round):
            return round.ask(f"{text} {round.instruction}")
        return correct

    try:
        register_strategy("test-edited", "a strategy whose prompt is edited")(strategy_saying("Check it."))
        first = evaluate(limit=3, strategy="test-edited", backend=ScriptedBackend(), db=db)
        again = evaluate(limit=3, strategy="test-edited", backend=ScriptedBackend(), db=db)
        assert again.run_id == first.run_id and again.generated == 0
        register_strategy("test-edited", "a strategy whose prompt is edited")(strategy_saying("Check it twice."))
        edited = evaluate(limit=3, strategy="test-edited", backend=ScriptedBackend(), db=db)
    finally:
        del STRATEGIES["test-edited"]
    assert edited.run_id != first.run_id and edited.generated == 3
    assert edited.config["prompts"] != first.config["prompts"]


def test_a_prompt_constant_the_strategy_names_is_part_of_its_version(tmp_path, monkeypatch):
    import selfcorrect.strategies.builtin as builtin

    db = tmp_path / "runs.sqlite"
    before = evaluate(limit=2, strategy="self-refine", backend=ScriptedBackend(), db=db)
    monkeypatch.setattr(builtin, "NO_CHANGE", "NOTHING TO CHANGE")
    after = evaluate(limit=2, strategy="self-refine", backend=ScriptedBackend(), db=db)
    assert after.run_id != before.run_id


def _old_store(tmp_path) -> Path:
    """A store made by selfcorrect 0.1.0 (a real run of the embedded model, dumped as SQL)."""
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as connection:
        connection.executescript((FIXTURES / "store_0.1.0.sql").read_text())
    return db


def test_a_store_made_before_opens_and_reports_its_runs_as_of_unknown_prompts(tmp_path, embedded):
    db = _old_store(tmp_path)
    old = load_run("ceb590", db)
    report = old.report()
    assert report["complete"] and report["n_items"] == 3 and report["prompt_version"] is None
    assert report["replies"]["finish_reasons"] == {"unknown": 6}
    shown = cli("report", "ceb590", "--db", str(db))
    assert shown.returncode == 0 and "prompts: unknown version" in shown.stdout
    exported = cli("export", "ceb590", "--db", str(db))
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 6
    # The same command today is a new run, under today's prompts and model identity: nothing is resumed.
    new = evaluate(limit=3, backend=embedded, db=db)
    assert new.run_id != old.run_id and new.generated == 6
    assert new.report()["prompt_version"] == new.config["prompts"]
    assert load_run("ceb590", db).turns == old.turns


def test_each_reply_records_why_it_ended_and_the_report_counts_cut_replies(tmp_path, embedded):
    db = tmp_path / "runs.sqlite"
    run = evaluate(limit=3, max_tokens=3, backend=embedded, db=db, cache=False)
    for turn in run.turns:
        assert turn.finish_reasons == ["length"] and turn.completion_tokens == 3
    long_enough = evaluate(limit=3, max_tokens=64, backend=embedded, db=db, cache=False)
    for turn in long_enough.turns:
        assert turn.finish_reasons == ["stop" if turn.completion_tokens < 64 else "length"]
    shown = cli("report", run.run_id, "--db", str(db))
    assert "replies cut short: 6 of 6 at --max-tokens" in shown.stdout


def test_a_reply_cut_by_the_context_window_says_so():
    small = LlamaCppBackend(embedded_model_path(), n_ctx=96, max_in_flight=1)
    messages = [{"role": "user", "content": "Count slowly from one to one hundred, one number per line: " + "go " * 30}]
    reply = small.complete(messages, max_tokens=200, temperature=0.0, seed=0)
    assert reply.finish_reason == "context" and reply.prompt_tokens + reply.completion_tokens == 96


class _Server(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose deployment changes after three requests."""

    served = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).served += 1
            fingerprint = "fp_a" if self.served <= 3 else "fp_b"
        body = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": "served-model-v2",
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "The answer is 4."}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_what_an_http_server_reports_is_kept_with_every_turn_and_a_change_is_reported(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        db = tmp_path / "runs.sqlite"
        run = evaluate(model=f"openai:m@{url}", limit=3, db=db)
    finally:
        server.shutdown()
    assert {t.served_by["model"] for t in run.turns} == {"served-model-v2"}
    assert sorted(t.served_by["system_fingerprint"] for t in run.turns).count("fp_b") == 3
    assert all(t.finish_reasons == ["length"] for t in run.turns)
    shown = cli("report", run.run_id, "--db", str(db))
    assert "the server reported 2 different setups" in shown.stdout and "fp_b" in shown.stdout


def test_a_ray_pool_refuses_one_model_on_mixed_llama_cpp_builds():
    avx2 = "llamacpp:m.gguf:0123456789abcdef:llama.cpp-0.3.36[AVX,AVX2,FMA]"
    avx512 = "llamacpp:m.gguf:0123456789abcdef:llama.cpp-0.3.36[AVX,AVX2,AVX512,FMA]"
    assert pool_identity([avx2, avx2]) == avx2
    with pytest.raises(UserError, match="same weights on different llama.cpp builds or CPU instruction sets"):
        pool_identity([avx2, avx512])


def test_the_prompt_version_does_not_depend_on_where_selfcorrect_is_installed(monkeypatch):
    import selfcorrect.sandbox
    import selfcorrect.tasks.code
    from selfcorrect.prompt_version import prompt_version
    from selfcorrect.strategies import get_strategy
    from selfcorrect.tasks import load_task

    task = load_task("humaneval")
    strategy = get_strategy("exec-feedback")
    here = prompt_version(strategy, task, task.items[:3])
    for module in (selfcorrect.sandbox, selfcorrect.tasks.code):
        monkeypatch.setattr(module, "__file__", "/elsewhere/" + Path(module.__file__).name)
    assert prompt_version(strategy, task, task.items[:3]) == here
    # ...while the feedback text it shows is part of it.
    monkeypatch.setattr(selfcorrect.tasks.code, "_REPORT", "examples-report:")
    assert prompt_version(strategy, task, task.items[:3]) != here
    assert prompt_version(get_strategy("reask"), task, task.items[:3]) == prompt_version(
        get_strategy("reask"), task, task.items[:3])


def test_the_exact_estimators_answer_prefix_is_part_of_the_prompt_version(monkeypatch):
    import selfcorrect.exact
    from selfcorrect.prompt_version import prompt_version
    from selfcorrect.strategies import get_strategy
    from selfcorrect.tasks import load_task

    task = load_task("arithmetic")
    before = prompt_version(get_strategy("reask"), task, task.items[:3])
    monkeypatch.setattr(selfcorrect.exact, "ANSWER_PREFIX", "My answer:")
    assert prompt_version(get_strategy("reask"), task, task.items[:3]) != before


# The build the README's worked example ran on (this is what `selfcorrect runs` stores as its backend); the
# ids below are computed from it and the prompt texts of this version, so a change that gives the same run
# another id (a reworded prompt, a moved helper whose strings the prompt version hashes) fails here until the
# README's example is run again.
README_BUILD = ("llamacpp:SmolLM2-135M-Instruct.Q4_1.gguf:b179c9523d0e6a0f:"
                "llama.cpp-0.3.36[AVX,AVX2,BMI2,F16C,FMA,LLAMAFILE,OPENMP,REPACK,SSE3,SSSE3]")


@pytest.mark.parametrize("strategy", ["reask", "critique"])
def test_the_readme_worked_example_has_the_run_ids_this_version_gives(strategy, tmp_path):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = {name: run_id for name, run_id in re.findall(r"^(\w+): run ([0-9a-f]{12}), grader", readme, re.M)}
    header = re.search(r"^run ([0-9a-f]{12})  arithmetic · embedded · reask · 1 round", readme, re.M)
    assert header and shown["reask"] == header.group(1)  # the run's own report and compare's agree
    run = evaluate(strategy=strategy, backend=ScriptedBackend(identity=README_BUILD), db=tmp_path / "runs.sqlite",
                   cache=False)
    assert run.run_id == shown[strategy]
