"""What a run is asked to do, as one value: `RunConfig`.

The command line, `reproduce` and `improve` each build one and vary it with `dataclasses.replace`; `evaluate`
takes one (or its fields as keywords). `check()` refuses bad settings with one line naming the flag, before
any model, task or store is touched. A protocol's preset is applied by `with_protocol`, the one place that
says which wins: a flag the user gave, else the protocol's setting, else the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import UserError
from .estimators import check_choice
from .grader_pool import DEFAULT_TIMEOUT_S
from .isolation import MODES
from .models.base import SERVER_DEFAULT
from .models.rate_limit import check_rates
from .models.spec import ModelSpec
from .protocols import protocol_settings
from .store import db_path

# The longest --grader-timeout: a day (a wait much longer overflows the operating system's poll).
MAX_GRADER_TIMEOUT_S = 86400.0


@dataclass(frozen=True)
class RunConfig:
    """A run's settings. See `evaluate` for what each does; only some define the run (its id), the others
    (`cache`, `grader_timeout`, `isolation`, the HTTP limits, `db`) say how it is carried out."""

    task: str = "arithmetic"
    model: str = "embedded"
    strategy: str = "reask"
    rounds: int = 1
    samples: int = 1
    temperature: float | str = 0.0
    limit: int | None = None
    seed: int = 0
    data: str | Path | None = None
    task_options: dict[str, str] = field(default_factory=dict)
    max_tokens: int | None = None
    estimator: str = "auto"
    critic_model: str | None = None
    icl_confident: int = 0
    icl_critical: int = 0
    budget: int | None = None
    split: str | None = None
    split_seed: int = 0
    test_share: float = 0.5
    allow_train_items: bool = False
    cache: bool = True
    grader_timeout: float = DEFAULT_TIMEOUT_S
    isolation: str = "auto"
    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    db: str | Path | None = None

    def __post_init__(self):
        if self.task_options is None:  # as evaluate() has always taken it: no options
            object.__setattr__(self, "task_options", {})

    def check(self) -> None:
        """Refuse (UserError) settings that are wrong whatever the task and model."""
        if self.rounds < 0:
            raise UserError(f"--rounds {self.rounds}: must be 0 or more (the number of correction turns after the first)")
        if self.samples < 1:
            raise UserError(f"--samples {self.samples}: must be at least 1")
        if self.temperature == SERVER_DEFAULT:
            if not ModelSpec.of(self.model).over_http:
                raise UserError(f"--temperature {SERVER_DEFAULT}: only openai: models have sampling defaults of their "
                                f"own; give {self.model} a number between 0 and 2")
        elif not 0.0 <= self.temperature <= 2.0:
            raise UserError(f"--temperature {self.temperature}: must be between 0 and 2")
        if self.samples > 1 and self.temperature == 0:
            raise UserError(
                f"--samples {self.samples} needs --temperature > 0 (e.g. --temperature 0.7): at temperature 0 every "
                "sample is the same greedy reply, and copies would inflate McNemar's test and the bootstrap; or drop "
                "--samples"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: must be at least 1 (or leave it out for every item)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens {self.max_tokens}: must be at least 1")
        check_grader_timeout(self.grader_timeout)
        check_isolation_mode(self.isolation)
        check_rates(self.concurrency, self.rpm, self.tpm)
        if self.budget is not None and self.budget < 1:
            raise UserError(f"--budget {self.budget}: must be at least 1 token")
        check_choice(self.estimator)
        db_path(self.db)  # a store in a missing directory, refused before a model loads

    @property
    def limits(self) -> dict:
        """The HTTP limits given (a model not served over HTTP refuses any: models.load_model)."""
        return {name: getattr(self, name) for name in ("concurrency", "rpm", "tpm") if getattr(self, name) is not None}


def run_config(config: RunConfig | None = None, **settings) -> RunConfig:
    """`config` (default: every setting at its default) with the settings given as keywords in place of its
    own; a keyword that is not a setting is a UserError naming it."""
    unknown = sorted(set(settings) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise UserError(f"evaluate: unknown setting {unknown[0]}; the settings are RunConfig's fields")
    if config is not None and not isinstance(config, RunConfig):
        raise UserError(f"evaluate: the first argument is a RunConfig, not {config!r}; give settings as keywords, "
                        "e.g. evaluate(task=\"gsm8k\")")
    return replace(config or RunConfig(), **settings)


# The settings a protocol fixes for each task (protocols.protocol_settings), besides its task options.
PRESET = ("samples", "temperature", "max_tokens", "estimator")


def with_protocol(config: RunConfig, protocol: str | None, given: set[str], sampled: bool = False) -> RunConfig:
    """`config` under `protocol`'s preset for its task and model: each of PRESET is the protocol's unless the
    user gave it (named in `given`), and the protocol's task options come first, the user's own on top.
    `sampled`: as the protocol samples its generative tasks (a multiple-choice task on a model that gives no
    option probabilities)."""
    if protocol is None:
        return config
    preset = protocol_settings(protocol, config.task, config.model, sampled=sampled)
    return replace(config, task_options={**preset["task_options"], **config.task_options},
                   **{name: preset[name] for name in PRESET if name not in given})


def check_grader_timeout(seconds: float) -> None:
    if not 0 < seconds <= MAX_GRADER_TIMEOUT_S:
        raise UserError(
            f"--grader-timeout {seconds:g}: must be more than 0 and at most {MAX_GRADER_TIMEOUT_S:g} seconds"
        )


def check_isolation_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--isolation {mode}: choose one of {', '.join(MODES)}")
