"""Models served over HTTP by any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama,
hosted APIs), through the official `openai` client's chat completions.

Many requests are in flight at once, with threads rather than asyncio: the engine calls `complete` from
up to `max_in_flight` worker threads, each call blocks only its own thread, and a semaphore of that
size bounds the requests in flight. The sync `OpenAI` client is thread-safe; all threads share it and
its connection pool (the client keeps up to 100 connections alive, more than any sensible
`max_in_flight`).

Retries are the client's own. It retries connection errors, timeouts and the statuses 408, 409, 429 and
5xx up to `max_retries` times. Before a retry it waits what the server asks (`retry-after-ms`, else
`Retry-After` in seconds or as a date) when that is more than 0 and at most 120 s. A longer wait is not
retried at all: the error is final at once. Without a usable header it waits 0.5 s · 2^n, capped at
8 s, shortened by a random 0-25% (jitter), so clients that failed together do not retry together.

A request that still fails, or that the server refuses (bad key, unknown model), raises `BackendError`
with one line naming the spec and the last error; it is never turned into a reply to grade.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import openai

from ..errors import UserError
from .base import BackendError, Completion, Message

DEFAULT_TIMEOUT_S = 300.0  # a long reply from a busy server can take minutes; a stalled one should not hang a run
DEFAULT_RETRIES = 5  # with the client's backoff, about 15 s of waiting before a request is given up


def _env_number(name: str, default, kind: type, valid: Callable[[float], bool], expected: str):
    """A number from the environment (a setting without a flag yet), or `default` when it is unset."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise UserError(f"{name}={raw}: expected {expected}")
    return value


def _one_line(text: str, limit: int = 200) -> str:
    """A server's error message as one short line (bodies can be long JSON spread over lines)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class OpenAIBackend:
    """One model on one OpenAI-compatible endpoint. Loading contacts nothing: a server that is down is
    found at the first request."""

    def __init__(
        self, model: str, base_url: str, *, timeout: float | None = None, max_retries: int | None = None,
        max_in_flight: int = 8, api_key: str | None = None,
    ):
        self.model, self.base_url = model, base_url
        # The endpoint is part of the identity on purpose: the same model name on two servers (two
        # quantisations, two engines) must not share cached replies or runs.
        self.identity = f"openai:{model}@{base_url}"
        if timeout is None:
            timeout = _env_number("SELFCORRECT_HTTP_TIMEOUT", DEFAULT_TIMEOUT_S, float, lambda seconds: seconds > 0,
                                  "seconds above 0, e.g. 60")
        if max_retries is None:
            max_retries = _env_number("SELFCORRECT_HTTP_RETRIES", DEFAULT_RETRIES, int, lambda count: count >= 0,
                                      "a whole number of retries, 0 or more")
        self.timeout, self.max_retries = timeout, max_retries
        self.max_in_flight = max_in_flight
        self._slots = threading.Semaphore(max_in_flight)
        # Counts the HTTP requests of the current call in each thread, so a failure can say how many
        # tries it took (the client decides when to stop retrying, for reasons of its own).
        self._tries = threading.local()
        self.client = openai.OpenAI(
            base_url=base_url,
            # Local servers ignore the key, but the client refuses to start without one.
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=self.timeout,
            max_retries=self.max_retries,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count_try]}),
        )

    def _count_try(self, request) -> None:
        self._tries.count += 1

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        with self._slots:
            self._tries.count = 0
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                )
            except openai.APIStatusError as err:
                raise BackendError(self._refusal(err)) from None
            except openai.APITimeoutError:
                raise BackendError(self._gave_up(f"no reply within {self.timeout:g} s")) from None
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err  # the transport's own error says more than "Connection error."
                raise BackendError(self._gave_up(_one_line(cause) or type(cause).__name__)) from None
        # Servers that do not report usage (the field is optional in some) count as 0 tokens.
        usage = reply.usage
        # What the server says it ran, stored with every turn: a model id that changes behind the same
        # name, or a new `system_fingerprint` (its configuration, where it reports one), shows there.
        served_by = {"model": reply.model, "system_fingerprint": reply.system_fingerprint}
        return Completion(
            text=reply.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=reply.choices[0].finish_reason,
            served_by={key: value for key, value in served_by.items() if value},
        )

    def _gave_up(self, last_error: str) -> str:
        return f"{self.identity}: request failed after {self._tries.count} tries ({last_error})"

    def _refusal(self, err: openai.APIStatusError) -> str:
        """What a final HTTP error means and what to do about it."""
        status = err.status_code
        if status == 401:
            return f"{self.identity}: the server refused the API key (HTTP 401); set OPENAI_API_KEY to a key it accepts"
        if status == 403:
            return f"{self.identity}: access denied (HTTP 403: {_one_line(err.message)}); check OPENAI_API_KEY"
        if status == 404:
            return (
                f"{self.identity}: HTTP 404 at {err.request.url}: the server does not serve model '{self.model}' "
                "there, or BASE_URL lacks the API path (usually /v1)"
            )
        return self._gave_up(f"HTTP {status}: {_one_line(err.message)}")
