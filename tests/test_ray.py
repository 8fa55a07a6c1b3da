"""Conversations sharded over Ray actors, on a local Ray cluster the tests start. Two actors each load the
embedded model: a run through them equals the local run turn for turn (same run id), both actors serve,
each conversation stays on one actor, the exact estimator scores the same, and `selfcorrect run --ray`
joining the cluster resumes a run by generating only its lost turns. A BackendError inside an actor, a
model that fails to load there and a dead actor all arrive as one line. Actors of an HTTP model count its
requests, which the run stores."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import ray

from selfcorrect import evaluate, load_run
from selfcorrect.errors import UserError
from selfcorrect.models.base import BackendError
from selfcorrect.models.ray_pool import Lanes, RayPool

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mock_server import MockServer  # noqa: E402

# Short replies keep the runs quick on a loaded 2-core machine; greedy, so replies are comparable.
RUN = dict(task="arithmetic", limit=6, rounds=1, max_tokens=48, cache=False)


def rows(run) -> list[tuple]:
    return [(t.item_id, t.sample, t.round, t.messages, t.response, t.correct, t.completion_tokens, t.backend)
            for t in run.turns]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """The address of a Ray cluster on this machine, for this module."""
    # The HTTP actors of the error tests meet a closed port: fail at the first try rather than retry.
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                       runtime_env={"env_vars": {"SELFCORRECT_HTTP_RETRIES": "0"}})
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    """Two actors, each with its own embedded model."""
    pool = RayPool.start(["embedded", "embedded"])
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def ray_run(pool, tmp_path_factory):
    return evaluate(**RUN, backend=pool, db=tmp_path_factory.mktemp("ray") / "runs.sqlite")


@pytest.mark.slow
@pytest.mark.model
def test_run_on_ray_is_the_local_run_with_conversations_kept_on_one_actor(pool, ray_run, embedded, tmp_path):
    local = evaluate(**RUN, backend=embedded, db=tmp_path / "local.sqlite")
    assert ray_run.report()["complete"] and ray_run.generated == 6 * 2
    assert pool.max_in_flight == 2 * embedded.max_in_flight
    # Where a reply was computed changes nothing: same run, same replies, same backend identity.
    assert ray_run.run_id == local.run_id
    assert rows(ray_run) == rows(local)

    served = pool.served()
    assert all(served), f"an actor served nothing: {served}"
    questions = {turn.messages[0]["content"] for turn in ray_run.turns}
    for question in questions:
        actors = [counts[question] for counts in served if question in counts]
        assert actors == [2], f"{question!r}: replies per actor {actors}, expected both turns on one actor"
    assert set().union(*served) == questions
    # And within its actor on the sequence slot that holds it: no earlier reply had to be computed again.
    counters = [ray.get(actor.decoder_counters.remote()) for actor in pool.actors]
    assert sum(c["prompt_tokens_replayed"] for c in counters) == 0, counters
    assert sum(c["requests"] for c in counters) >= 6 * 2


@pytest.mark.slow
@pytest.mark.model
def test_exact_estimator_scores_on_ray_as_locally(pool, embedded, shared_data, tmp_path):
    options = dict(task="mcq", data=shared_data / "commonsense_qa.jsonl", limit=1, estimator="exact", cache=False)
    on_ray = evaluate(**options, backend=pool, db=tmp_path / "ray.sqlite")
    local = evaluate(**options, backend=embedded, db=tmp_path / "local.sqlite")
    assert on_ray.estimator == "exact" and on_ray.run_id == local.run_id
    assert len(on_ray.scores) == len(local.scores) == 6  # K + 1 passes, five options
    for remote, here in zip(on_ray.scores, local.scores):
        assert (remote.item_id, remote.given, remote.messages) == (here.item_id, here.given, here.messages)
        # The same llama.cpp build on the same machine on both sides: only the batch a pass shares differs
        # (measured differences near 1e-7), whatever the CPU.
        assert remote.probs == pytest.approx(here.probs, abs=1e-5)


@pytest.mark.slow
@pytest.mark.model
def test_cli_on_ray_resumes_a_run_generating_only_the_lost_turns(cluster, ray_run, tmp_path):
    db = tmp_path / "runs.sqlite"
    shutil.copy(ray_run.db_path, db)
    # Lose what a kill would lose: the correction of one conversation and the whole of another.
    with sqlite3.connect(db) as store:
        lost = store.execute(
            "DELETE FROM turns WHERE (item_id = 'arith-1' AND round = 1) OR item_id = 'arith-4'").rowcount
    assert lost == 3

    result = run_cli("run", "--ray", cluster, "--ray-actors", "2", "--limit", "6", "--max-tokens", "48",
                     "--no-cache", "--db", str(db), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["run_id"] == ray_run.run_id and report["complete"]
    assert report["generated"] == lost
    assert rows(load_run(ray_run.run_id, db)) == rows(ray_run)


@pytest.mark.slow
def test_http_traffic_of_the_actors_is_recorded_with_the_run(cluster, tmp_path):
    """Actors that each send requests to an HTTP server count them in their process; the run stores what each
    actor's requests met, as it does for a local HTTP model, and the report sums what the server saw."""
    with MockServer(latency=0.05, jitter=0.0) as server:
        spec = f"openai:mock@{server.url}/v1"
        pool = RayPool.start([spec, spec], concurrency=4)
        try:
            run = evaluate(**RUN, model=spec, backend=pool, db=tmp_path / "runs.sqlite")
        finally:
            pool.close()
        sent = len(server.stats()["requests"])
    assert run.report()["complete"] and sent == 6 * 2
    assert run.report()["http"]["requests"] == sent
    assert sum(row["requests"] for row in run.traffic) == sent and 1 <= len(run.traffic) <= 2
    assert all(row["concurrency"] == 4 for row in run.traffic)  # each actor's own client


@pytest.mark.slow
def test_backend_error_inside_an_actor_arrives_as_itself(cluster, tmp_path):
    spec = f"openai:m@http://127.0.0.1:{closed_port()}/v1"
    pool = RayPool.start([spec])
    try:
        with pytest.raises(BackendError) as caught:
            pool.complete([{"role": "user", "content": "What is 1 + 1?"}], 8, 0.0, 0)
        assert type(caught.value) is BackendError
        message = str(caught.value)
        assert message.startswith(f"{spec}: request failed")
        assert "\n" not in message
        # Through a run: the cell is recorded as failed and the user gets the same line.
        with pytest.raises(UserError, match="request failed"):
            evaluate(task="arithmetic", limit=2, model=spec, backend=pool, db=tmp_path / "runs.sqlite")
    finally:
        pool.close()


@pytest.mark.slow
def test_dead_actor_is_a_backend_error_naming_it_and_its_node(cluster):
    pool = RayPool.start([f"openai:m@http://127.0.0.1:{closed_port()}/v1"])
    ray.kill(pool.actors[0])
    with pytest.raises(BackendError, match=rf"the Ray actor 0 on node {pool.nodes[0]} is gone \(.*killed") as caught:
        pool.complete([{"role": "user", "content": "What is 1 + 1?"}], 8, 0.0, 0)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_model_failing_to_load_in_an_actor_is_one_line(cluster, tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(UserError, match=f"llamacpp:{missing}: no such file") as caught:
        RayPool.start([f"llamacpp:{missing}"])
    assert type(caught.value) is UserError and "\n" not in str(caught.value)


@pytest.mark.slow
def test_servers_of_one_model_make_a_pool_named_by_all_of_them_and_different_models_are_refused(cluster):
    first, second = (f"openai:m@http://127.0.0.1:{port}/v1" for port in (closed_port(), closed_port() + 1))
    pool = RayPool.start([first, second], concurrency=24)
    try:
        # Neither server's identity: its replies must not merge with a run on one of them.
        assert pool.identity not in (first, second)
        assert first in pool.identity and second in pool.identity
        assert pool.max_in_flight == 48  # --concurrency requests per HTTP client
    finally:
        pool.close()
    with pytest.raises(UserError, match="different models"):
        RayPool.start([first, f"openai:other@http://127.0.0.1:{closed_port()}/v1"])


@pytest.mark.parametrize("args, message", [
    (["--ray-actors", "3"], "--ray-actors and --ray-model: only with --ray"),
    (["--ray", "local", "--ray-actors", "0"], "--ray-actors 0: must be at least 1"),
    (["--ray", "local", "--ray-model", "openai:no-url"], "expected openai:MODEL@BASE_URL"),
    (["--ray", "local", "--ray-model", "embedded", "--ray-actors", "2"], "give one of them"),
])
def test_bad_ray_options_are_one_line_before_any_cluster(args, message, tmp_path):
    result = run_cli("run", *args, "--db", str(tmp_path / "runs.sqlite"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs.sqlite").exists()


def test_without_the_ray_extra_the_cli_says_how_to_install_it(tmp_path):
    # The import of ray fails as it does where the extra is not installed.
    program = ("import sys; sys.modules['ray'] = None; from selfcorrect.cli import main; "
               f"sys.argv = ['selfcorrect', 'run', '--ray', 'local', '--db', {str(tmp_path / 'r.sqlite')!r}]; main()")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --ray: needs the ray extra: pip install 'selfcorrect[ray]'"


def test_lanes_keep_a_caller_on_its_thread_and_never_run_two_requests_on_one():
    lanes = Lanes(2)
    thread = lambda: threading.current_thread().name  # noqa: E731
    first = lanes.run(1, thread)
    assert lanes.run(1, thread) == first and lanes.run(2, thread) != first
    # Caller 1's thread busy: caller 3, which last ran there, takes the other; a third request waits.
    lanes.run(3, thread)
    release = threading.Event()

    def until_idle(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(lanes.idle) != n:
            assert time.monotonic() < deadline, f"{len(lanes.idle)} idle threads, expected {n}"
            time.sleep(0.01)

    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(lanes.run, 1, lambda: (release.wait(), thread())[1])
        until_idle(1)
        assert pool.submit(lanes.run, 3, thread).result() != first
        blocked = pool.submit(lanes.run, 4, lambda: (release.wait(), thread())[1])
        until_idle(0)
        waiting = pool.submit(lanes.run, 5, thread)
        # Both threads are busy: it can only run once one is released. (Lanes that ran it anyway would show it
        # within this wait; the wait cannot make right ones fail.)
        assert not wait([waiting], timeout=0.2).done
        release.set()
        assert held.result() == first and waiting.result() in {first, blocked.result()}
