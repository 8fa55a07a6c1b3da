"""What a backend is: something that turns a conversation into a completion, with token counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
# The temperature that leaves sampling to the server's own defaults (the model's generation config on vLLM):
# only OpenAI-compatible servers have defaults of their own to leave it to. Every other temperature is a number.
SERVER_DEFAULT = "server"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False  # served from the response cache, not generated now
    # Why generation ended: "stop" (the model ended its reply), "length" (max_tokens reached) or "context"
    # (cut short by the model's context window); None where a backend cannot tell.
    finish_reason: str | None = None
    # What an HTTP server reported running the request (its model id, `system_fingerprint`); {} in-process.
    served_by: dict = field(default_factory=dict)


class BackendError(Exception):
    """A request the backend could not complete (server down, retries exhausted). Its message is one line
    naming the model and what failed. The engine records the cell as failed, never as a wrong answer, and
    a rerun of the same command retries it."""


class Backend(Protocol):
    # Names the weights and engine, so a run (and a cached response) is tied to what produced it.
    identity: str

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        """One assistant reply to `messages`; the same seed gives the same reply."""
        ...


def scores_options(backend: Backend) -> bool:
    """Whether `backend` has option scoring at all (`option_probs`); a server may still refuse it, which
    `option_scoring_problem` asks."""
    return callable(getattr(backend, "option_probs", None))


def option_scoring_problem(backend: Backend) -> str | None:
    """Why `backend` cannot score option labels (the exact estimator, P(True)), or None when it can; the one
    place this is decided. A backend without `option_probs` cannot. One with an `option_scoring_problem` of
    its own (an HTTP server, a Ray pool of them) is asked: a server is probed once, and BackendError says that
    it could not be reached. Any other (a model computed in this process) can."""
    if not scores_options(backend):
        return "it cannot score option labels"
    ask = getattr(backend, "option_scoring_problem", None)
    return ask() if ask is not None else None


def counts_prompt_tokens(backend: Backend) -> bool:
    """Whether `backend` counts a prompt's tokens without sending it (`count_tokens`: models with their
    tokenizer in this process), so that a scoring pass's cost can be added to a turn's."""
    return callable(getattr(backend, "count_tokens", None))
