"""The exact estimator over HTTP: option scores from a server's token log-probabilities.

The server is llama-cpp-python's own, serving the embedded GGUF, with one change (tests/continuing_server.py):
it continues a final assistant message, as vLLM and SGLang do when asked and llama.cpp's llama-server does
by default. Its scores must be the embedded backend's, computed in process from the same weights; and the
paper's BoolQ cell run against it must be scored exactly, pass for pass what the embedded model gives. The
other side, a server that does not continue a started reply (llama-cpp-python's unchanged), is in
test_openai_backend.py: the probe finds it out and the grid samples instead, saying why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from selfcorrect.models.spec import embedded_model_path
from selfcorrect.models.openai_http import OpenAIBackend
from selfcorrect.protocols import YANG2025_ANSWER_PREFIX
from selfcorrect.reproduce import run_grid
from selfcorrect.store import Store

from conftest import free_port, serving

SERVED_AS = "smollm2-continuing"


@pytest.fixture(scope="module")
def continuing_server(tmp_path_factory):
    port = free_port()
    argv = [sys.executable, str(Path(__file__).parent / "continuing_server.py"), str(embedded_model_path()),
            str(port), SERVED_AS]
    with serving(argv, port, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield f"{url}/v1"


CONVERSATIONS = [
    ([{"role": "system", "content": "You are a helpful assistant!"},
      {"role": "user", "content": "The following is a multiple choice questions (with answers).\n\nWhere would you "
       "keep milk cold?\nA. oven\nB. fridge\nC. desk\nD. garden\nE. car\nPlease directly answer the right choice.\n"}],
     ["A", "B", "C", "D", "E"]),
    ([{"role": "user", "content": "is the sun a star? (please answer true or false)."},
      {"role": "assistant", "content": "The answer is: false\n"},
      {"role": "user", "content": "is the sun a star? (please answer true or false)."}],
     ["false", "true"]),
]


@pytest.mark.slow
def test_server_scores_are_the_embedded_models(continuing_server, embedded):
    backend = OpenAIBackend(SERVED_AS, continuing_server)
    assert backend.option_scoring_problem() is None
    for messages, labels in CONVERSATIONS:
        over_http = backend.option_probs(messages, YANG2025_ANSWER_PREFIX, labels)
        in_process = embedded.option_probs(messages, YANG2025_ANSWER_PREFIX, labels)
        # One llama.cpp build on one machine on both sides (measured agreement ~1e-8), so the bound needs no
        # scaling to the CPU: it is far above rounding and far below any scoring mistake (a wrong position moves
        # these by tenths).
        assert over_http == pytest.approx(in_process, abs=1e-4), labels


@pytest.mark.slow
def test_the_papers_boolq_cell_is_scored_exactly_over_http(continuing_server, shared_data, tmp_path):
    """`reproduce` on BoolQ against the server: exact, with no note of sampling, and every scoring pass (the
    first answer's and each given answer's after the question is asked again) equal to the embedded model's."""
    notes = []
    cells = {}
    for model in (f"openai:{SERVED_AS}@{continuing_server}", "embedded"):
        ((_, _, run),) = run_grid(model, ["boolq"], strategies=("reask",), data={"boolq": shared_data / "boolq.jsonl"},
                                  limit=2, db=tmp_path / "runs.sqlite", on_note=notes.append)
        assert run.estimator == "exact"
        store = Store(tmp_path / "runs.sqlite")
        cells[model] = {(s.item_id, s.given): (s.messages, s.probs) for s in store.option_scores(run.run_id)}
        store.close()
    assert notes == []
    over_http, in_process = cells.values()
    assert len(over_http) == 2 * 3 and over_http.keys() == in_process.keys()
    for key, (messages, probs) in over_http.items():
        assert messages == in_process[key][0]
        assert probs == pytest.approx(in_process[key][1], abs=1e-4), key
