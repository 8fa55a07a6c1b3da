"""The Python API: `evaluate(...)` runs (or resumes) a self-correction run, `load_run(...)` reads one back,
`regrade(...)` grades a stored run's replies again with today's graders, `delete_run(...)` removes one.

The command line is a thin layer over these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .cache import CachedBackend
from .errors import UserError
from .estimators import choose_estimator, estimator_named
from .grader_pool import DEFAULT_TIMEOUT_S, GraderPool
from .isolation import IsolationUnavailable, using
from .models import Backend, check_model_spec, load_model, trained_questions
from .prompt_version import prompt_version
from .sandbox import isolation_for
from .split import check_no_leak, held_out_part
from .results import Run, read_run
from .run_config import RunConfig, check_grader_timeout, check_isolation_mode, run_config
from .store import Store, db_path
from .strategies import get_strategy
from .strategies.examples import check_examples_possible, correction_examples
from .tasks import Grade, Task, defining_identity, grader_version, load_task


@contextlib.contextmanager
def _traffic_recorded(backends: list[Backend], store: Store, run_id: str):
    """Within the block, count the requests of the HTTP clients of `backends` (the run's model and its critic:
    each one's `metered`, one meter per client), and store what each client's requests met with the run however
    the block ends (an error, Ctrl-C), when it sent any."""
    counted = []
    with contextlib.ExitStack() as metering:
        for backend in backends:
            if hasattr(backend, "metered"):
                counted.append(metering.enter_context(backend.metered()))
        try:
            yield
        finally:
            try:  # a Ray pool's meters count in its actors, and are read when they close
                metering.close()  # closes every meter, even after one fails (a dead actor), then raises that
            finally:  # what the others counted is stored all the same
                for meter in itertools.chain(*counted):
                    if meter.requests:
                        store.add_traffic(run_id, meter.as_dict())


def run_id_for(config: dict) -> str:
    """Runs are identified by a hash of everything that defines them, so the same config resumes. How the
    task's grader was chosen (given or inferred from the data) is in the config but not in the hash: the same
    grader grades the same replies alike, so `--grader number` resumes a run whose grader was inferred as number."""
    defining = {**config, "task": defining_identity(config["task"])}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]


def code_isolation(task: Task, mode: str) -> str | None:
    """The boundary `task`'s model-written code will run inside in isolation `mode` ("bubblewrap" or
    "process only"), None for a task that runs no code; UserError for "strict" where bubblewrap fails."""
    if task.execution_feedback is None:  # set by exactly the tasks that run code (selfcorrect.tasks.Task)
        return None
    try:
        return isolation_for(mode)
    except IsolationUnavailable as problem:
        raise UserError(f"{problem}; without --isolation strict, code runs in the process-only sandbox "
                        "(see docs/limits.md)") from None


def evaluate(
    config: RunConfig | None = None,
    *,
    backend: Backend | None = None,
    critic_backend: Backend | None = None,
    on_start: Callable[[str, int, int], None] = lambda run_id, total, done: None,
    on_turn: Callable[[], None] = lambda: None,
    **settings,
) -> Run:
    """Run `task` on `model` with `rounds` correction rounds of `strategy`; resume if this run exists.

    The settings are a `RunConfig` (`config`), or its fields as keywords (`evaluate(task="gsm8k", limit=20)`),
    or both (the keywords replace the config's fields). Everything is validated before the store is opened, so bad input leaves it untouched. `backend`
    passes an already loaded model (it must be the one `model` names). `estimator` is "exact" (option
    log-probabilities, multiple choice only), "sampling", or "auto" (exact where the task and model allow
    it and one sample per item was asked for). `temperature` is a number, or "server" (`SERVER_DEFAULT`) for an
    openai: model: the request leaves sampling to the server's defaults. `on_start(run_id, total, done)` and `on_turn()` report
    progress (one tick per turn, or per scoring pass of the exact estimator). `icl_confident` and
    `icl_critical` put that many in-context examples of kept and of fixed answers before each correction
    prompt; `budget` is the tokens per correction round that the compute-matched baselines may spend.
    Each grade may take `grader_timeout` seconds (not part of the run's identity: it changes no grade that
    finishes); one that takes longer is recorded as wrong, with the reason "grader timeout".
    `split` ("train" or "test") keeps only the items of that part of a seeded split by question content
    (`split_seed`, `test_share` of the questions in "test"; see split.py), before `limit`. A trained
    model (`lora:DIR`) is refused items whose question was in its training data unless `allow_train_items`.
    `isolation` ("auto", "strict" or "process", see selfcorrect.isolation) says what boundary model-written
    code runs inside; "strict" refuses a code task where bubblewrap does not work. Each grade records the
    boundary it ran inside; the mode is not part of the run's identity.
    `concurrency` (default 64), `rpm` and `tpm` apply to an openai: model this call loads: the most requests in
    flight (lowered while the server answers 429 or 503, see models/rate_limit.py) and ceilings on requests and
    tokens per minute; none is part of the run's identity.
    One process at a time runs a given run (`Store.lock_run`): while another does, this raises UserError
    naming it. Ctrl-C ends the call within seconds with the finished turns stored (see `run_cells`).
    """
    asked = run_config(config, **settings)
    asked.check()
    the_task = load_task(asked.task, Path(asked.data).expanduser() if asked.data is not None else None,
                         asked.task_options)
    the_strategy = get_strategy(asked.strategy)
    if asked.budget is not None and not the_strategy.baseline:
        raise UserError(f"--budget: only the compute-matched baselines (self-consistency, best-of-n) use it, not "
                        f"'{asked.strategy}'")
    if the_strategy.needs_execution_feedback and not the_task.execution_feedback:
        raise UserError(
            f"--strategy {asked.strategy}: needs execution feedback, which only code tasks give (humaneval, mbpp, "
            f"custom --grader code); task '{the_task.name}' has none"
        )
    if the_strategy.needs_critic and asked.critic_model is None:
        raise UserError(f"--strategy {asked.strategy}: needs a second model; pass --critic-model SPEC (e.g. embedded)")
    check_examples_possible(the_task, asked.icl_confident, asked.icl_critical)
    code_isolation(the_task, asked.isolation)
    check_model_spec(asked.model)
    if asked.critic_model is not None:
        check_model_spec(asked.critic_model)
    items = held_out_part(the_task.items, asked.split, asked.split_seed, asked.test_share)
    items = items[:asked.limit] if asked.limit else items
    check_no_leak([(item.id, item.question) for item in items], trained_questions(asked.model), asked.model,
                  asked.allow_train_items)
    backend = backend or load_model(asked.model, **asked.limits)
    critic = None
    if the_strategy.needs_critic:
        critic = critic_backend or (backend if asked.critic_model == asked.model else load_model(asked.critic_model))
    chosen = choose_estimator(asked.estimator, the_task, the_strategy, backend, asked.model, asked.rounds,
                              asked.samples, asked.temperature)
    stored = {
        "estimator": chosen.name,
        "task": the_task.identity,
        "model": asked.model,
        "backend": backend.identity,
        "strategy": the_strategy.name,
        "upper_bound": the_strategy.oracle,  # the strategy reads the gold answer: not a method, a ceiling
        "critic": critic.identity if critic else None,
        "rounds": asked.rounds,
        "samples": asked.samples,
        "temperature": asked.temperature,
        "max_tokens": asked.max_tokens or the_task.max_tokens,
        "seed": asked.seed,
        "limit": asked.limit,
        # The prompt texts the run sends: an edited prompt makes a new run rather than resuming this one.
        "prompts": prompt_version(the_strategy, the_task, items),
    }
    # Options that are off leave the stored config (and so the ids of earlier runs) as they were.
    if asked.icl_confident or asked.icl_critical:
        stored["icl"] = {"confident": asked.icl_confident, "critical": asked.icl_critical}
    if asked.budget is not None:
        stored["budget"] = asked.budget
    if asked.split is not None:
        stored["split"] = {"part": asked.split, "seed": asked.split_seed, "test_share": asked.test_share}
    run_id = run_id_for(stored)

    def examples(item) -> str:
        return correction_examples(the_task, item, asked.icl_confident, asked.icl_critical, asked.seed)

    # The models whose HTTP requests are counted, each once (a critic may be the model itself), before the cache
    # wraps them.
    models = [backend] if critic in (None, backend) else [backend, critic]
    store = Store(db_path(asked.db))
    try:  # one process at a time per run: a second one stops here, before it writes anything
        run_lock = store.lock_run(run_id)
    except BaseException:
        store.close()
        raise
    if asked.cache:
        backend = CachedBackend(backend, store)
        critic = critic and CachedBackend(critic, store)
    try:
        store.create_run(run_id, stored, items, task_spec={"task": asked.task, "data": _data_argument(asked.data),
                                                           "options": asked.task_options})
        with _traffic_recorded(models, store, run_id):
            on_start(run_id, chosen.total(the_task, items, asked.samples, asked.rounds), store.count(run_id, chosen.table))
            generated, cache_hits = chosen.run(
                run_id, the_task, items, the_strategy, backend, store, samples=asked.samples, rounds=asked.rounds,
                temperature=asked.temperature, max_tokens=stored["max_tokens"], seed=asked.seed, critic=critic,
                budget=asked.budget, grader_timeout=asked.grader_timeout, isolation=asked.isolation, on_turn=on_turn,
                examples=examples,
            )
        return read_run(store, run_id, generated, cache_hits)
    finally:
        try:
            store.close()
        finally:
            run_lock.release()


def load_run(run_id: str, db: str | Path | None = None) -> Run:
    """A stored run by its id (or an unambiguous prefix of it)."""
    store = Store(db_path(db), create=False)
    try:
        return read_run(store, store.find_run(run_id))
    finally:
        store.close()


def delete_run(run_id: str, db: str | Path | None = None) -> dict:
    """Delete a stored run (or the one an unambiguous prefix names): its turns, items, scoring passes, failed
    cells and HTTP record; the response cache keeps its replies, so running it again reuses them. Refused
    (UserError) while a process runs it. Returns {"run_id", "db", "deleted": {table: rows}}."""
    store = Store(db_path(db), create=False)
    try:
        run_id = store.find_run(run_id)
        with store.lock_run(run_id, "deleting", "wait for it to finish, or stop it, then delete the run"):
            return {"run_id": run_id, "db": str(store.path), "deleted": store.delete_run(run_id)}
    finally:
        store.close()


def regrade(
    run_id: str, db: str | Path | None = None, grader_timeout: float = DEFAULT_TIMEOUT_S, all_turns: bool = False,
    task_spec: dict | None = None, isolation: str = "auto",
) -> dict:
    """Grade a stored run's replies again with today's graders; nothing is generated.

    The task is loaded again as the run loaded it and must still give the run's items. Turns that today's
    graders (`grader_version()`) already graded are left alone unless `all_turns`; grades that timed out
    are always tried again. The new grades are written in one transaction once all are made, so an error
    or Ctrl-C leaves the store as it was. Returns a summary: turns regraded and skipped, verdicts changed.
    A run stored before runs kept how their task was loaded needs `task_spec` ({"task", "data",
    "options"}, as `evaluate` took them); the run's items must come out of it unchanged. `isolation` as for
    `evaluate`. It holds the run's lock as `evaluate` does: while another process runs or regrades the run,
    this raises UserError naming it.
    """
    check_grader_timeout(grader_timeout)
    check_isolation_mode(isolation)
    store = Store(db_path(db), create=False)
    try:
        run_id = store.find_run(run_id)
        # A run going on would add turns graded as they come while these are graded again: one at a time.
        with store.lock_run(run_id, "regrading", "wait for it to finish, or stop it, then regrade the run again"):
            return _regrade(store, run_id, grader_timeout, all_turns, task_spec, isolation)
    finally:
        store.close()


def _regrade(store: Store, run_id: str, grader_timeout: float, all_turns: bool, task_spec: dict | None,
             isolation: str) -> dict:
    """`regrade` of the run `run_id` of the open `store`, holding the run's lock."""
    today = grader_version()
    summary = {"run_id": run_id, "grader_version": today, "regraded": 0, "skipped": 0, "changed": 0,
               "now_right": 0, "now_wrong": 0, "timeouts": 0, "note": None}
    config = store.config(run_id)
    if not estimator_named(config["estimator"]).stores_replies:
        return {**summary, "note": "the exact estimator grades no reply (its figures come from option "
                                   "probabilities): nothing to regrade"}
    task, items = _task_again(store, run_id, config, task_spec)
    code_isolation(task, isolation)
    turns = store.turns(run_id)
    due = [turn for turn in turns if all_turns or turn.grader_version != today or turn.extra.get("grader_timeout")]
    with using(isolation):
        grades = _grade_all(task, [(items[turn.item_id], turn.response) for turn in due], grader_timeout) if due else []
    regraded = [
        replace(turn, answer=new.answer, correct=new.correct, reason=new.reason, extra=new.extra,
                grader_version=today)
        for turn, new in zip(due, grades)
    ]
    store.regrade_turns(run_id, regraded)
    flipped = [new for old, new in zip(due, regraded) if old.correct != new.correct]
    return {
        **summary, "regraded": len(regraded), "skipped": len(turns) - len(due), "changed": len(flipped),
        "now_right": sum(turn.correct for turn in flipped), "now_wrong": sum(not turn.correct for turn in flipped),
        "timeouts": sum(bool(turn.extra.get("grader_timeout")) for turn in regraded),
    }


def grade_reply(task: str, item_id: str, reply: str | Callable[[], str], *, data: str | Path | None = None,
                task_options: dict[str, str] | None = None, grader_timeout: float = DEFAULT_TIMEOUT_S,
                isolation: str = "auto") -> Grade:
    """The grade of `reply` to item `item_id` of `task`, by the task's grader in a grading process (within
    `grader_timeout` seconds, model-written code inside `isolation`'s boundary), as a run would grade it.
    `reply` may be a function that returns it, called once everything else is checked (a reply read from
    standard input is not waited for when a flag is wrong)."""
    check_grader_timeout(grader_timeout)
    check_isolation_mode(isolation)
    the_task = load_task(task, Path(data).expanduser() if data is not None else None, task_options)
    code_isolation(the_task, isolation)
    found = [candidate for candidate in the_task.items if candidate.id == item_id]
    if not found:
        raise UserError(f"--item {item_id}: no such item in task '{task}' (ids look like {the_task.items[0].id!r})")
    text = reply() if callable(reply) else reply
    with GraderPool(grader_timeout, processes=1) as graders, using(isolation):
        return graders.limit(the_task.grade)(found[0], text)


def _grade_all(task: Task, replies: list[tuple], grader_timeout: float) -> list:
    """The grades of (item, reply) pairs, made by as many grading processes at once as there are CPUs."""
    with GraderPool(grader_timeout) as graders:
        grade = graders.limit(task.grade)
        threads = ThreadPoolExecutor(graders.processes)
        try:
            return list(threads.map(lambda pair: grade(*pair), replies))
        finally:
            threads.shutdown(cancel_futures=True)  # on Ctrl-C, start no other grade


def task_from_spec(spec: dict) -> Task:
    """The task loaded as a run recorded how it loaded it ({"task", "data", "options"}, the runs' task_spec)."""
    return load_task(spec["task"], Path(spec["data"]) if spec["data"] is not None else None, spec["options"])


def _task_again(store: Store, run_id: str, config: dict, given: dict | None) -> tuple[Task, dict]:
    """The run's task loaded again as the run loaded it (or as `given` says, for runs that did not keep it),
    and its items by id; a UserError when that is impossible or the items are no longer the run's."""
    spec = store.task_spec(run_id) or given
    if spec is None:
        raise UserError(f"run {run_id}: stored before runs kept how their task was loaded; give it as the run "
                        "was made: --task, and --data, --task-opt, --field, --grader where the run had them")
    try:
        task = task_from_spec(spec)
    except UserError as problem:
        raise UserError(f"run {run_id}: its task cannot be loaded again: {problem}") from None
    # Everything but the data file's path must match: the items, options and the data's hash among it.
    had, has = defining_identity(config["task"]), defining_identity(task.identity)
    changed = sorted(key for key in had.keys() | has.keys() if key != "data" and had.get(key) != has.get(key))
    if changed:
        if "data_sha256" in changed:
            what = f"the data file {spec['data']} has changed since the run"
        else:
            what = f"its task now differs in {', '.join(changed)}"
        raise UserError(f"run {run_id}: {what}, so its items differ from the ones the run's replies answer")
    items = {item.id: item for item in task.items}
    for stored in store.items(run_id):
        item = items.get(stored["item_id"])
        if item is None or (item.question, item.target) != (stored["question"], stored["target"]):
            raise UserError(f"run {run_id}: item {stored['item_id']} now loads differently from the one the run "
                            "asked, so its replies cannot be graded again")
    return task, items


def _data_argument(data: str | Path | None) -> str | None:
    """`data` as a later regrade must pass it: a local path made absolute (it may run elsewhere), else as
    given (hf:DATASET)."""
    if data is None:
        return None
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else str(data)
