"""Conversations sharded over Ray actors (`selfcorrect run --ray ADDRESS`). Each actor owns a backend in its
own process on some node of the cluster: the embedded engine (or any `--model`) on CPU nodes, or a client of
one OpenAI-compatible server per GPU node (`--ray-model`).

`RayPool` is a Backend like any other. The engine on the driver calls `complete` from one thread per
conversation in flight, grades each reply and writes each turn to the one run store; the response cache
stays on the driver too. Only generation (and option scoring) leaves the driver, so a run on Ray is
stored, cached and resumed like any run; what the HTTP requests of its actors met is counted in each actor and
stored with the run, as a local HTTP model's is (`RayPool.metered`).

A request goes to the actor picked by a stable hash of the conversation's first message: every turn of a
conversation (and every sample of an item) meets the actor whose llama.cpp decoder still holds the earlier
turns in its KV cache. Ray runs an actor's methods on a pool of threads, so the requests routed to one
actor reach its backend together and are batched as they would be locally. Within the actor, `Lanes`
keeps each engine worker of the driver on one thread, since the embedded decoder gives each calling thread
its own KV slot (as it does to the engine's workers in a local run).

Needs the `ray` extra; ray is imported only when a pool is started.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

from ..errors import UserError
from .base import BackendError, Completion, Message, counts_prompt_tokens, option_scoring_problem, scores_options
from .rate_limit import TrafficMeter
from .spec import ModelSpec, check_model_spec

INSTALL_HINT = "needs the ray extra: pip install 'selfcorrect[ray]'"
# Ray fixes an actor's thread pool when the actor is created, before its backend is loaded and can say how
# many requests it takes at once; so the pool is sized from the spec: an HTTP model's concurrency, or the most
# a local engine batches (llama.cpp 16, transformers 8). `Lanes` lets exactly the backend's `max_in_flight`
# requests in at once; the spare threads answer the driver (`served`) while every lane is busy.
LOCAL_BATCH = 16
SPARE_THREADS = 2
DEFAULT_ACTORS = 2


def actor_threads(spec: str, concurrency: int | None) -> int:
    """The threads of an actor that loads `spec`, at `--concurrency` `concurrency` (None: the default)."""
    if ModelSpec.of(spec).over_http:
        from .openai_http import DEFAULT_CONCURRENCY

        return (concurrency or DEFAULT_CONCURRENCY) + SPARE_THREADS
    return LOCAL_BATCH + SPARE_THREADS


def ray_backend(model: str, address: str, actors: int | None = None, actor_specs: Sequence[str] = (),
                concurrency: int | None = None) -> RayPool:
    """Join the Ray cluster at `address` (`local` starts one on this machine, `auto` finds the one this
    node belongs to) and start the actors: one per spec of `actor_specs`, or else `actors` actors (default
    2) that each load `model`; an HTTP model's actor keeps up to `concurrency` requests in flight."""
    if actor_specs and actors is not None:
        raise UserError("--ray-actors and --ray-model: give one of them (--ray-model starts one actor per spec)")
    actors = DEFAULT_ACTORS if actors is None else actors
    if actors < 1:
        raise UserError(f"--ray-actors {actors}: must be at least 1")
    specs = list(actor_specs) or [model] * actors
    for spec in dict.fromkeys(specs):
        check_model_spec(spec)  # a malformed spec fails here, before a cluster is started or joined
    if concurrency is not None and not all(ModelSpec.of(spec).over_http for spec in specs):
        raise UserError("--concurrency: only for models served over HTTP (openai:MODEL@BASE_URL); local models on "
                        "Ray actors take as many requests at once as their engine batches")
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray: {INSTALL_HINT}") from None
    try:
        # Actors' own output stays in Ray's logs: forwarded, it would interleave with the report (and --json).
        # What goes wrong in an actor reaches the driver as the error of the request.
        ray.init(address=None if address == "local" else address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise UserError(f"--ray {address}: cannot join a Ray cluster there ({_last_line(err)})") from None
    return RayPool.start(specs, concurrency)


class Lanes:
    """`n` threads, each running one request at a time, and which caller runs on which.

    A caller is an engine worker on the driver, which runs its conversations one after another; the
    embedded decoder keeps one KV slot per thread that calls it. Kept on one thread, a caller finds its
    conversation's earlier turns in that thread's slot, and its next conversation takes over a slot the
    last one no longer needs. The driver has a worker for every slot of every actor, so a caller may find
    its thread busy with another: it then takes the idle thread used longest ago (and that thread's next
    turn of another conversation computes its conversation again; the replies stay the same)."""

    def __init__(self, n: int):
        self.threads = [ThreadPoolExecutor(1, thread_name_prefix=f"lane{i}") for i in range(n)]
        self.idle = deque(range(n))  # least recently used first
        self.lane_of: dict[int, int] = {}  # caller -> the thread it ran on last
        self.changed = threading.Condition()

    def run(self, caller: int, work, *args):
        """`work(*args)` on the caller's thread, waiting for an idle thread if there is none."""
        with self.changed:
            self.changed.wait_for(lambda: self.idle)
            lane = self.lane_of.get(caller)
            if lane not in self.idle:
                lane = self.idle[0]
            self.idle.remove(lane)
            self.lane_of[caller] = lane
        try:
            return self.threads[lane].submit(work, *args).result()
        finally:
            with self.changed:
                self.idle.append(lane)
                self.changed.notify()


class ModelActor:
    """One backend in a Ray worker process, with a count of what it served."""

    def load(self, spec: str, concurrency: int | None = None) -> dict:
        """Load the model `spec` names (an HTTP model with `concurrency` requests in flight); returns what the
        driver needs to know about it."""
        import ray

        from . import load_model

        self.backend = load_model(spec, concurrency=concurrency)
        self.lanes = Lanes(getattr(self.backend, "max_in_flight", 1))
        self.requests: Counter[str] = Counter()  # conversation's first message -> requests served
        self.counting = threading.Lock()
        self.meters: dict[int, tuple[contextlib.ExitStack, list]] = {}  # open meters of HTTP traffic, by key
        self.meter_keys = itertools.count()
        return {
            "identity": self.backend.identity,
            "max_in_flight": getattr(self.backend, "max_in_flight", 1),
            "scores_options": scores_options(self.backend),
            "counts_tokens": counts_prompt_tokens(self.backend),
            "node": ray.util.get_node_ip_address(),
        }

    def complete(
        self, messages: list[Message], max_tokens: int, temperature: float, seed: int, caller: int
    ) -> Completion:
        with self.counting:
            self.requests[messages[0]["content"]] += 1
        return self.lanes.run(caller, self.backend.complete, messages, max_tokens, temperature, seed)

    def option_probs(self, messages: list[Message], answer_prefix: str, labels: list[str]) -> list[float]:
        return self.backend.option_probs(messages, answer_prefix, labels)  # backends serialise their scoring

    def option_scoring_problem(self) -> str | None:
        return option_scoring_problem(self.backend)

    def count_tokens(self, messages: list[Message], answer_prefix: str = "") -> int:
        return self.backend.count_tokens(messages, answer_prefix)

    def served(self) -> dict[str, int]:
        """Replies generated so far, by the first message of their conversation."""
        with self.counting:
            return dict(self.requests)

    def open_meter(self) -> int | None:
        """Start counting the HTTP requests of this actor's model (its `metered`); the meter's key for
        `close_meter`, or None for a model that sends none."""
        if not hasattr(self.backend, "metered"):
            return None
        metering = contextlib.ExitStack()
        meters = metering.enter_context(self.backend.metered())
        with self.counting:
            key = next(self.meter_keys)
            self.meters[key] = (metering, meters)
        return key

    def close_meter(self, key: int) -> list[dict]:
        """Stop the meter `open_meter` gave `key`, and return what the requests met (TrafficMeter.as_dict)."""
        with self.counting:
            metering, meters = self.meters.pop(key)
        metering.close()
        return [meter.as_dict() for meter in meters]

    def decoder_counters(self) -> dict[str, int]:
        """The embedded engine's KV cache counters (see `BatchDecoder`); empty for other backends."""
        decoder = getattr(self.backend, "decoder", None)
        return dict(decoder.counters) if decoder else {}


def pool_identity(identities: list[str]) -> str:
    """The identity of a pool whose actors report these identities: one run measures one model.

    Actors that all load the same weights make the pool that model, so a run on Ray is the same run (same
    run id, same cached replies) as a local run of it. HTTP servers of one model are another matter: an
    endpoint is part of an HTTP model's identity, because two servers of one model name may run different
    weights or engines. A pool of several endpoints is named by all of them: its replies never merge with
    those of one of its servers, nor of another set of servers. Actors of different models are refused, and
    so are actors of one GGUF on different llama.cpp builds or CPUs (mixed nodes), whose replies differ.
    """
    distinct = sorted(set(identities))
    if len(distinct) == 1:
        return distinct[0]
    models = sorted({identity.rpartition("@")[0] if identity.startswith("openai:") else identity
                     for identity in distinct})
    weights = {identity.rpartition(":")[0] for identity in models}  # a llama.cpp identity ends with its build
    if len(models) > 1 and all(m.startswith("llamacpp:") for m in models) and len(weights) == 1:
        raise UserError(f"--ray: the actors run the same weights on different llama.cpp builds or CPU instruction "
                        f"sets ({', '.join(m.rpartition(':')[2] for m in models)}), which give different replies; "
                        "run the actors on nodes of one kind, or with one build")
    if len(models) > 1:
        raise UserError(f"--ray-model: the actors serve different models ({', '.join(models)}); "
                        "one run measures one model, give specs of the same model")
    return f"ray[{'+'.join(distinct)}]"


def route(messages: list[Message], n_actors: int) -> int:
    """The actor of a conversation: a hash of its first message that is the same in every process (Python's
    `hash` of a string is salted per process)."""
    digest = hashlib.sha256(messages[0]["content"].encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_actors


class RayPool:
    """A backend whose requests are served by Ray actors, each conversation by one of them."""

    def __init__(self, actors: list, descriptions: list[dict]):
        self.actors, self.nodes = actors, [description["node"] for description in descriptions]
        self.identity = pool_identity([description["identity"] for description in descriptions])
        self.max_in_flight = sum(description["max_in_flight"] for description in descriptions)
        # Option scoring (the exact estimator, P(True)) and token counting are offered only where every
        # actor's model has them, so that the engine sees the abilities it would see in a local run of the
        # model (models.base.option_scoring_problem asks for them by name).
        if all(description["scores_options"] for description in descriptions):
            self.option_probs, self.option_scoring_problem = self._option_probs, self._option_scoring_problem
        if all(description["counts_tokens"] for description in descriptions):
            self.count_tokens = self._count_tokens

    @classmethod
    def start(cls, specs: list[str], concurrency: int | None = None) -> RayPool:
        """One actor per spec, spread over the nodes of the cluster this process has joined
        (`ray.init`); an HTTP model's actor keeps up to `concurrency` requests in flight. A model that fails
        to load raises here the error it raised in its actor."""
        import ray

        actor_class = ray.remote(ModelActor)
        actors = [actor_class.options(max_concurrency=actor_threads(spec, concurrency), scheduling_strategy="SPREAD")
                  .remote() for spec in specs]
        loading = [actor.load.remote(spec, concurrency) for actor, spec in zip(actors, specs)]  # all load at once
        try:
            return cls(actors, [_get(loaded) for loaded in loading])
        except BaseException:  # a model that failed to load, or actors of different models
            for actor in actors:
                ray.kill(actor)
            raise

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        caller = threading.get_ident()  # the engine worker: see `Lanes`
        return self._call(route(messages, len(self.actors)), "complete", messages, max_tokens, temperature, seed, caller)

    def served(self) -> list[dict[str, int]]:
        """Per actor, the replies it generated by first message of their conversation: where the work went."""
        return [self._call(index, "served") for index in range(len(self.actors))]

    @contextlib.contextmanager
    def metered(self) -> Iterator[list[TrafficMeter]]:
        """`with pool.metered() as meters:` counts the HTTP requests the actors' models send in the block, as a
        local HTTP model counts its own: one `TrafficMeter` per actor with such a model (each keeps its own
        limit on requests in flight). They count in the actors' processes: `meters` is filled when the block
        ends, from every actor still there (one that is gone took its count with it; the run meets it at its
        first request, and says so)."""

        def call(index: int, method: str, *args):
            try:
                return self._call(index, method, *args)
            except BackendError:  # the actor is gone
                return None

        keys = [call(index, "open_meter") for index in range(len(self.actors))]
        meters: list[TrafficMeter] = []
        try:
            yield meters
        finally:
            for index, key in enumerate(keys):
                if key is not None:
                    meters.extend(TrafficMeter(**counted) for counted in call(index, "close_meter", key) or [])

    def close(self) -> None:
        """Stop the actors (they also end with the driver process)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def _call(self, index: int, method: str, *args):
        import ray

        try:
            return _get(getattr(self.actors[index], method).remote(*args))
        except ray.exceptions.RayActorError as error:
            raise BackendError(
                f"{self.identity}: the Ray actor {index} on node {self.nodes[index]} is gone ({_last_line(error)})"
            ) from None


    def _option_probs(self, messages: list[Message], answer_prefix: str, labels: list[str]) -> list[float]:
        return self._call(route(messages, len(self.actors)), "option_probs", messages, answer_prefix, labels)

    def _option_scoring_problem(self) -> str | None:
        """The first actor's reason it cannot score (an HTTP server that cannot), or None when all can; asked
        once."""
        if not hasattr(self, "_scoring_problem"):
            asked = (self._call(index, "option_scoring_problem") for index in range(len(self.actors)))
            self._scoring_problem = next(filter(None, asked), None)
        return self._scoring_problem

    def _count_tokens(self, messages: list[Message], answer_prefix: str = "") -> int:
        return self._call(route(messages, len(self.actors)), "count_tokens", messages, answer_prefix)


def _get(result):
    """The value of an actor's `result`. An error the backend raised inside the actor (BackendError,
    UserError) is raised here as itself, one line, not wrapped in Ray's RayTaskError with the remote
    traceback."""
    import ray

    try:
        return ray.get(result)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (BackendError, UserError)):
            raise error.cause from None
        raise


def _last_line(error: Exception) -> str:
    """Ray's errors end with the line that says why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
