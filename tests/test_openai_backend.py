"""The OpenAI-compatible HTTP backend against a real server: llama-cpp-python's, serving the embedded GGUF
on 127.0.0.1 behind an API key. Runs go to it directly and through a proxy that injects 429s, 500s,
stalls, dropped and cut-off connections: the faulty run ends with the same turns. A server that is down
is one line and exit code 2, its cell recorded as failed, not graded."""

from __future__ import annotations

import json
import sqlite3

import pytest

from selfcorrect import evaluate
from selfcorrect.errors import UserError
from selfcorrect.models import load_model
from selfcorrect.models.base import BackendError
from selfcorrect.models.openai_http import OpenAIBackend
from selfcorrect.store import Store, Turn
from selfcorrect.tasks import Item

from conftest import API_KEY, SERVED_AS, cli, free_port
from fault_proxy import RETRY_AFTER_S, FaultProxy

MAX_TOKENS = 48  # short replies keep the runs quick on a loaded machine; the comparison needs no more
RUN = dict(task="arithmetic", limit=4, rounds=1, max_tokens=MAX_TOKENS, cache=False)
TIMEOUT_S = 10.0  # through the proxy: well above a reply's time here, so only the injected stall times out


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)


@pytest.fixture(scope="module")
def direct_run(llama_server, tmp_path_factory):
    """The run straight against the server, as `--model openai:...` loads it (default retries, timeout and
    requests in flight)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", API_KEY)
        return evaluate(model=f"openai:{SERVED_AS}@{llama_server}/v1", db=tmp_path_factory.mktemp("direct") / "runs.sqlite", **RUN)


def _cells(turns: list[Turn]) -> list[tuple]:
    return [(t.item_id, t.sample, t.round, t.messages, t.response, t.answer, t.correct) for t in turns]


@pytest.mark.slow
def test_a_run_against_a_real_server(direct_run, llama_server):
    report = direct_run.report()
    assert report["complete"] and direct_run.generated == 4 * 2
    assert {t.backend for t in direct_run.turns} == {f"openai:{SERVED_AS}@{llama_server}/v1"}
    for turn in direct_run.turns:
        assert turn.response.strip()
        # Token counts are the server's own usage figures.
        assert turn.prompt_tokens > 0 and 0 < turn.completion_tokens <= MAX_TOKENS
        # How the reply ended and what the server said it ran, as the server reported them.
        assert turn.finish_reasons == ["length" if turn.completion_tokens == MAX_TOKENS else "stop"]
        assert turn.served_by["model"]
    first, correction = direct_run.turns[:2]
    assert correction.messages[:2] == first.messages  # the correction continues the first conversation


@pytest.mark.slow
def test_faults_are_retried_and_the_run_ends_with_the_same_turns(llama_server, direct_run, api_key, tmp_path):
    with FaultProxy(llama_server, stall_s=TIMEOUT_S + 10) as proxy:
        # Two requests in flight: with more, queueing at the one-thread server could itself pass the timeout.
        backend = OpenAIBackend(SERVED_AS, f"{proxy.url}/v1", timeout=TIMEOUT_S, max_retries=8, max_in_flight=2)
        run = evaluate(model=f"openai:{SERVED_AS}@{proxy.url}/v1", backend=backend, db=tmp_path / "runs.sqlite", **RUN)
    for fault in ("429", "500", "stall", "drop", "cut"):
        assert proxy.injected(fault) >= 1, (fault, [entry["fault"] for entry in proxy.log])
    assert run.report()["complete"] and run.generated == 4 * 2
    assert _cells(run.turns) == _cells(direct_run.turns)
    store = Store(tmp_path / "runs.sqlite")
    assert store.failures(run.run_id) == []
    store.close()
    # A 429's retry (the next request with the same body) waited the Retry-After the proxy asked for, not
    # the client's first backoff (at most 0.5 s).
    for position, entry in enumerate(proxy.log):
        if entry["fault"] == "429":
            retry = next(later for later in proxy.log[position + 1:] if later["body"] == entry["body"])
            assert retry["received_at"] - entry["answered_at"] >= RETRY_AFTER_S * 0.95


def test_a_server_that_is_down_is_one_line_and_a_failed_cell(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens there
    db = tmp_path / "runs.sqlite"
    result = cli("run", "--model", f"openai:{SERVED_AS}@{url}", "--limit", "2", "--db", str(db),
                 env={"SELFCORRECT_HTTP_RETRIES": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "2 tries" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
        failed = connection.execute("SELECT item_id, round, error FROM failed_cells").fetchall()
    assert failed and all(round_ == 0 and url in error for _, round_, error in failed)


@pytest.mark.slow
def test_a_refused_key_and_a_wrong_path_are_final_with_what_to_fix(llama_server, monkeypatch):
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    with pytest.raises(BackendError, match="HTTP 401.*set OPENAI_API_KEY"):
        load_model(f"openai:{SERVED_AS}@{llama_server}/v1").complete(question, 8, 0.0, 0)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with pytest.raises(BackendError, match=r"HTTP 404 .*usually /v1"):
        load_model(f"openai:{SERVED_AS}@{llama_server}").complete(question, 8, 0.0, 0)


@pytest.mark.parametrize("spec", ["openai:m", "openai:@http://h/v1", "openai:m@ftp://h/v1", "openai:m@http://"])
def test_a_malformed_spec_names_the_flag_and_writes_nothing(spec, tmp_path):
    with pytest.raises(UserError, match=r"^--model openai:.*expected openai:MODEL@BASE_URL"):
        evaluate(model=spec, db=tmp_path / "runs.sqlite", limit=1)
    assert not (tmp_path / "runs.sqlite").exists()


def test_spec_parts_and_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("SELFCORRECT_HTTP_TIMEOUT", "7.5")
    monkeypatch.setenv("SELFCORRECT_HTTP_RETRIES", "3")
    # Model names may hold '/', ':' and '@'; the URL starts after the last '@'. Nothing is contacted.
    backend = load_model("openai:org/model:7b@q4@http://127.0.0.1:9/v1")
    assert (backend.model, backend.base_url) == ("org/model:7b@q4", "http://127.0.0.1:9/v1")
    assert backend.identity == "openai:org/model:7b@q4@http://127.0.0.1:9/v1"
    assert (backend.timeout, backend.max_retries) == (7.5, 3)
    monkeypatch.setenv("SELFCORRECT_HTTP_RETRIES", "many")
    with pytest.raises(UserError, match="SELFCORRECT_HTTP_RETRIES=many"):
        load_model("openai:m@http://127.0.0.1:9/v1")


def test_store_keeps_a_failed_cell_until_its_turn_is_written(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    store.create_run("r1", {}, [Item(id="a", question="q", target="1")])
    store.add_failure("r1", "a", 0, 1, "openai:m@http://h/v1: request failed after 2 tries (refused)")
    store.add_failure("r1", "a", 0, 1, "openai:m@http://h/v1: request failed after 2 tries (timeout)")
    [failure] = store.failures("r1")
    assert (failure["item_id"], failure["sample"], failure["round"]) == ("a", 0, 1)
    assert failure["error"].endswith("(timeout)")  # the latest error replaces the earlier one
    turn = Turn(item_id="a", sample=0, round=1, messages=[], response="1", feedback=[], answer="1", correct=True,
                reason="", extra={}, notes={}, prompt_tokens=1, completion_tokens=1, latency_s=0.0, backend="m")
    store.add_turn("r1", turn)
    assert store.failures("r1") == []
    store.close()


@pytest.mark.slow
def test_the_papers_protocol_through_the_server(llama_server, tmp_path):
    """`run --protocol yang2025` and the `reproduce` grid against the llama.cpp server: the paper's system message
    and prompts go over HTTP with the server's own sampling defaults, and BoolQ, which the paper scores from
    option probabilities that this server cannot give (it does not continue a started reply), is sampled
    instead, and the grid says why."""
    from conftest import SHARED_DATA

    env = {"OPENAI_API_KEY": API_KEY}
    model = f"openai:{SERVED_AS}@{llama_server}/v1"
    db = str(tmp_path / "runs.sqlite")
    done = cli("run", "--protocol", "yang2025", "--task", "gsm8k", "--data", str(SHARED_DATA / "gsm8k_test.jsonl"),
               "--model", model, "--limit", "1", "--samples", "2", "--max-tokens", str(MAX_TOKENS), "--db", db,
               "--json", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    # --samples wins; the temperature is the preset's: the server's own sampling defaults
    assert (report["config"]["samples"], report["config"]["temperature"]) == (2, "server")
    assert report["config"]["task"]["prompt"] == "yang2025"
    turn = json.loads(cli("export", report["run_id"], "--db", db, env=env).stdout.splitlines()[-1])
    assert turn["messages"][0] == {"role": "system", "content": "You are a helpful assistant!"}
    assert turn["messages"][3]["content"] == turn["messages"][1]["content"]  # the question again, word for word

    grid = cli("reproduce", "--model", model, "--tasks", "boolq", "--data", f"boolq={SHARED_DATA / 'boolq.jsonl'}",
               "--strategies", "reask", "--limit", "2", "--samples", "1", "--max-tokens", str(MAX_TOKENS),
               "--db", db, "--json", env=env)
    assert grid.returncode == 0, grid.stderr[-2000:]
    assert "gives no option probabilities (the server does not continue a started assistant reply" in grid.stderr
    (row,) = json.loads(grid.stdout)
    assert (row["task"], row["estimator"], row["items"]) == ("boolq", "sampling", 2)


def test_server_default_temperature_sends_no_temperature(tmp_path):
    """At `--temperature server` the request names no temperature (the server's defaults apply); at a number
    it names that number. What the backend sends is read on the server side."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from selfcorrect.models.base import SERVER_DEFAULT

    bodies = []

    class Recorder(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "4"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    with ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as recorder:
        threading.Thread(target=recorder.serve_forever, daemon=True).start()
        backend = OpenAIBackend("m", f"http://127.0.0.1:{recorder.server_address[1]}/v1")
        question = [{"role": "user", "content": "2+2?"}]
        assert backend.complete(question, 8, SERVER_DEFAULT, seed=1).text == "4"
        backend.complete(question, 8, 0.7, seed=1)
        recorder.shutdown()
    assert "temperature" not in bodies[0] and bodies[0]["seed"] == 1
    assert bodies[1]["temperature"] == 0.7
