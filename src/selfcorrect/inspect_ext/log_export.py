"""A stored run as an Inspect eval log (`selfcorrect export RUN --format inspect --output FILE`), built from
inspect_ai's own log types and written by its own writer, so `inspect view` opens it and `read_eval_log` reads it.

The log reads as if `selfcorrect_rounds` and `selfcorrect_scorer` had made the run inside Inspect: one sample
per (item, sample) of the run, with the item's id as its id and the sample number + 1 as its epoch; its
messages are the whole conversation after the last round; its store keeps every round's reply as the solver
keeps them; its score holds each round's verdict as the run graded it ("round_0" .. "round_N"); the results
carry CL, CS, RSS and acc_0 .. acc_N from the same metrics as `inspect eval`. As in the run's report, only items
with every turn stored are written. A run made with the exact estimator holds option probabilities, not
conversations, and is refused.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from inspect_ai.log import (
    EvalConfig, EvalDataset, EvalLog, EvalMetric, EvalPlan, EvalPlanStep, EvalResults, EvalSample, EvalScore,
    EvalSpec, EvalStats, write_eval_log,
)
from inspect_ai.model import (
    ChatMessage, ChatMessageAssistant, ChatMessageSystem, ChatMessageUser, GenerateConfig, ModelOutput, ModelUsage,
)
from inspect_ai.scorer import SampleScore

from ..errors import UserError
from ..store import Store
from .metrics import cl, cs, round_accuracy, rss
from .scorer import rounds_score
from .solver import ROUNDS_KEY, round_record

if TYPE_CHECKING:  # only for annotations: importing api pulls in the engine
    from ..results import Run

SOLVER = "selfcorrect/selfcorrect_rounds"
SCORER = "selfcorrect_scorer"
_MESSAGE_TYPES = {"system": ChatMessageSystem, "user": ChatMessageUser, "assistant": ChatMessageAssistant}


def _message(stored: dict) -> ChatMessage:
    return _MESSAGE_TYPES[stored["role"]](content=stored["content"])


def _sample(item: dict, sample: int, turns: list, model: str) -> EvalSample:
    """The Inspect sample of one conversation, from its turns (round 0 first)."""
    last = turns[-1]
    messages = [_message(message) for message in last.messages]
    first_reply = next(i for i, message in enumerate(last.messages) if message["role"] == "assistant")
    usage = ModelUsage(input_tokens=sum(turn.prompt_tokens for turn in turns),
                       output_tokens=sum(turn.completion_tokens for turn in turns))
    usage.total_tokens = usage.input_tokens + usage.output_tokens
    return EvalSample(
        id=item["item_id"], epoch=sample + 1, input=messages[:first_reply], target=item["target"],
        messages=messages, output=ModelOutput.from_content(model=model, content=last.response),
        scores={SCORER: rounds_score([(turn.correct, turn.answer, turn.reason) for turn in turns])},
        store={ROUNDS_KEY: [round_record(turn.round, turn.response, turn.feedback, turn.notes) for turn in turns]},
        metadata={"selfcorrect_item": item["item_id"]}, model_usage={model: usage},
        # The conversation's turns ran one after another: their summed latency (generation and grading) is its time.
        total_time=sum(turn.latency_s for turn in turns), working_time=sum(turn.latency_s for turn in turns),
    )


def _results(samples: list[EvalSample], total: int) -> EvalResults:
    """CL, CS, RSS and acc_0 .. acc_N of the samples, by the metrics `selfcorrect_scorer` carries."""
    scores = [SampleScore(score=sample.scores[SCORER], sample_id=sample.id) for sample in samples]
    values = {name: float(make()(scores)) for name, make in (("cl", cl), ("cs", cs), ("rss", rss))} if scores else {}
    values.update(round_accuracy()(scores))
    return EvalResults(
        total_samples=total, completed_samples=len(samples),
        scores=[EvalScore(name=SCORER, scorer=SCORER, scored_samples=len(samples),
                          metrics={name: EvalMetric(name=name, value=value) for name, value in values.items()})],
    )


def _run_times(run: Run) -> tuple[str, str | None]:
    """When the run was first made and when its latest turn was stored, as its store recorded them."""
    store = Store(run.db_path, create=False)
    try:
        return store.run_times(run.run_id)
    finally:
        store.close()


def eval_log(run: Run) -> EvalLog:
    """The run as an Inspect eval log; UserError for a run made with the exact estimator."""
    if not run.estimation.stores_replies:
        raise UserError(
            f"run {run.run_id}: it used the {run.estimator} estimator, which stores option probabilities, not the "
            "conversations an Inspect log holds; export it with --format jsonl instead"
        )
    config = run.config
    model = f"selfcorrect/{config['model']}"
    complete, _ = run.correctness()
    turns: dict[tuple[str, int], list] = {}
    for turn in sorted(run.turns, key=lambda turn: turn.round):
        turns.setdefault((turn.item_id, turn.sample), []).append(turn)
    items = {item["item_id"]: item for item in run.items}
    samples = [_sample(items[item_id], sample, turns[(item_id, sample)], model)
               for item_id in complete for sample in range(config["samples"])]
    solver_args = {"strategy": config["strategy"], "rounds": config["rounds"]}
    created, last_turn = _run_times(run)
    return EvalLog(
        status="success" if len(complete) == len(run.items) else "cancelled",
        eval=EvalSpec(
            created=created, run_id=run.run_id, task=f"selfcorrect/{config['task']['task']}", task_args=config["task"],
            solver=SOLVER, solver_args=solver_args,
            dataset=EvalDataset(name=config["task"]["task"], samples=len(run.items),
                                sample_ids=[item["item_id"] for item in run.items]),
            model=model, model_generate_config=GenerateConfig(
                temperature=config["temperature"], max_tokens=config["max_tokens"], seed=config["seed"]),
            config=EvalConfig(epochs=config["samples"]),
            packages={"selfcorrect": version("selfcorrect"), "inspect_ai": version("inspect_ai")},
            metadata={"selfcorrect_run": run.run_id, "selfcorrect_config": config},
        ),
        plan=EvalPlan(steps=[EvalPlanStep(solver=SOLVER, params=solver_args)]),
        results=_results(samples, len(run.items) * config["samples"]),
        # From when the run was first made to when its latest turn was stored (a resumed run's pauses included).
        stats=EvalStats(started_at=created, completed_at=last_turn or ""),
        samples=samples,
    )


def write_inspect_log(run: Run, path: Path) -> None:
    """Write the run as an Inspect eval log to `path`: JSON when it ends in .json, else Inspect's .eval archive."""
    log = eval_log(run)  # built whole before the file is opened: a refusal writes nothing
    try:
        write_eval_log(log, str(path), format="json" if path.suffix.lower() == ".json" else "eval")
    except OSError as error:
        raise UserError(f"--output {path}: cannot write it ({error.strerror or error})") from None
