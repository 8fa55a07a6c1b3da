"""Models served over HTTP by any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama,
hosted APIs), through the official `openai` client's chat completions.

Many requests are in flight at once, with threads rather than asyncio: the engine calls `complete` from
one worker thread per request it may have in flight (`max_in_flight`, `--concurrency`, default 64), each
call blocks only its own thread, and every thread shares the one thread-safe `OpenAI` client and its
connection pool (sized to keep a connection alive per request in flight). At N = 512 that is 512 threads
that each wait on a socket: their stacks are reserved, not touched, so memory grows by tens of kB per
thread, and `run_cells` starts no more threads than there are conversations to run.

Retries are ours, not the client's (it is built with max_retries=0), so that the adaptive limit
(`rate_limit.AdaptiveLimit`) sees every 429 and 503: it lowers the requests in flight on them and raises
them again after successes, and when the server asks for a pause (`retry-after-ms`, else `Retry-After` in
seconds or as a date) no request starts until it is over. What is retried and how long we wait are the
`openai` client's rules: connection errors, timeouts and the statuses 408, 409, 429 and 5xx, up to
`max_retries` times; a wait the server asks for is kept when it is more than 0 and at most 120 s, and a
longer one makes the error final at once; without one, 0.5 s * 2^n, capped at 8 s, shortened by a random
0-25% (jitter), so clients that failed together do not retry together. Optional ceilings on requests and
tokens per minute (`--rpm`, `--tpm`) hold requests back before they are sent; tokens are counted as the
prompt's characters / 4 plus `max_tokens` before the request, and corrected to the usage the server
reports once it answers.

A request that still fails, or that the server refuses (bad key, unknown model), raises `BackendError`
with one line naming the spec and the last error; it is never turned into a reply to grade.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import random
import time
from functools import partial
from typing import Callable, Iterator

import openai

from ..errors import UserError
from .base import SERVER_DEFAULT, BackendError, Completion, Message
from .openai_logprobs import continuation_problem, label_probs, scoring_request
from .rate_limit import AdaptiveLimit, RateCeiling, TrafficMeter, check_rates

DEFAULT_TIMEOUT_S = 300.0  # a long reply from a busy server can take minutes; a stalled one should not hang a run
DEFAULT_RETRIES = 5  # with the backoff, about 15 s of waiting before a request is given up
DEFAULT_CONCURRENCY = 64  # keeps a vLLM or SGLang server's batch busy; hosted APIs bring it down (429s)
# The `openai` client's retry rules, kept now that the loop is ours.
RETRIED_STATUSES = (408, 409, 429)  # and 5xx
OVERLOAD_STATUSES = (429, 503)  # the adaptive limit goes down on these
MAX_PAUSE_S = 120.0  # a longer Retry-After makes the error final
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
CHARS_PER_TOKEN = 4  # the --tpm estimate of a prompt's tokens before the server counts them


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


def pause_asked(headers) -> float | None:
    """The seconds a response asks the client to wait (`retry-after-ms`, else `Retry-After` in seconds or as
    an HTTP date), or None when it asks nothing readable."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) / scale
        except (TypeError, ValueError):
            pass
    try:
        return email.utils.mktime_tz(email.utils.parsedate_tz(headers.get("retry-after"))) - time.time()
    except (TypeError, ValueError, OverflowError):
        return None


def backoff_s(retry: int) -> float:
    """The wait before retry number `retry` (0 for the first) when the server asked for none."""
    return min(FIRST_BACKOFF_S * 2.0 ** min(retry, 100), MAX_BACKOFF_S) * (1 - 0.25 * random.random())


class OpenAIBackend:
    """One model on one OpenAI-compatible endpoint. Loading contacts nothing: a server that is down is
    found at the first request. `max_in_flight` is the most requests in flight (`--concurrency`);
    `adaptive=False` keeps it fixed whatever the server answers; `rpm` and `tpm` are ceilings per minute."""

    def __init__(
        self, model: str, base_url: str, *, timeout: float | None = None, max_retries: int | None = None,
        max_in_flight: int = DEFAULT_CONCURRENCY, api_key: str | None = None, adaptive: bool = True,
        rpm: float | None = None, tpm: float | None = None,
    ):
        check_rates(max_in_flight, rpm, tpm)
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
        self.limit = AdaptiveLimit(max_in_flight, adaptive=adaptive)
        self.requests_per_minute = RateCeiling(rpm) if rpm else None
        self.tokens_per_minute = RateCeiling(tpm) if tpm else None
        # The client's own pool keeps 100 connections alive; with more requests in flight, the others would
        # open a connection per request.
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=max(max_in_flight, 100) + 16, max_keepalive_connections=max(max_in_flight, 100),
        )
        self.client = openai.OpenAI(
            base_url=base_url,
            # Local servers ignore the key, but the client refuses to start without one.
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=self.timeout,
            max_retries=0,  # retried by `_request`, which the limit must see
            http_client=openai.DefaultHttpxClient(limits=limits),
        )

    @contextlib.contextmanager
    def metered(self) -> Iterator[list[TrafficMeter]]:
        """`with backend.metered() as meters:` counts the requests sent in the block: one `TrafficMeter` per HTTP
        client the backend sends through (here one; a Ray pool has one per actor)."""
        with self.limit.metered() as meter:
            yield [meter]

    def complete(self, messages: list[Message], max_tokens: int, temperature: float | str, seed: int) -> Completion:
        # At SERVER_DEFAULT the request names no temperature, and the server samples with its own defaults.
        sampling = {} if temperature == SERVER_DEFAULT else {"temperature": temperature}
        reply = self._request(model=self.model, messages=messages, max_tokens=max_tokens, seed=seed, **sampling)
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

    def _request(self, **create_kwargs):
        """`client.chat.completions.create(**create_kwargs)` within the limits, retried as the module says:
        the ChatCompletion, or BackendError with one line."""
        estimate = self._token_estimate(create_kwargs)
        for tries in range(1, self.max_retries + 2):
            wait = backoff_s(tries - 1)
            ticket = self.limit.acquire()
            try:
                self._wait_for_rates(estimate)
                reply = self.client.chat.completions.create(**create_kwargs)
            except openai.APIStatusError as err:
                status, pause = err.status_code, pause_asked(err.response.headers)
                kept = pause if pause is not None and 0 < pause <= MAX_PAUSE_S else None
                if status in OVERLOAD_STATUSES:
                    self.limit.overloaded(ticket, status, kept)
                final = status not in RETRIED_STATUSES and status < 500
                if final or tries > self.max_retries or (pause is not None and pause > MAX_PAUSE_S):
                    raise BackendError(self._refusal(err, tries)) from None
                if kept is not None:  # after an overload the limit holds every request until the pause ends
                    wait = 0 if status in OVERLOAD_STATUSES else kept
            except openai.APITimeoutError:
                if tries > self.max_retries:
                    raise BackendError(self._gave_up(f"no reply within {self.timeout:g} s", tries)) from None
            except openai.APIConnectionError as err:
                if tries > self.max_retries:
                    cause = err.__cause__ or err  # the transport's own error says more than "Connection error."
                    raise BackendError(self._gave_up(_one_line(cause) or type(cause).__name__, tries)) from None
            else:
                self.limit.succeeded()
                if self.tokens_per_minute and reply.usage:
                    self.tokens_per_minute.give_back(estimate - reply.usage.prompt_tokens - reply.usage.completion_tokens)
                return reply
            finally:
                self.limit.release()
            self.limit.retrying()
            time.sleep(wait)

    def _wait_for_rates(self, estimate: int) -> None:
        if self.requests_per_minute:
            self.requests_per_minute.take(1)
        if self.tokens_per_minute:
            self.tokens_per_minute.take(estimate)

    def _token_estimate(self, create_kwargs: dict) -> int:
        """The tokens a request may cost, before the server counts them: the prompt's characters / 4 plus
        the most it may generate."""
        if not self.tokens_per_minute:
            return 0
        characters = sum(len(message["content"]) for message in create_kwargs.get("messages", []))
        return characters // CHARS_PER_TOKEN + (create_kwargs.get("max_tokens") or 0)

    def _gave_up(self, last_error: str, tries: int) -> str:
        return f"{self.identity}: request failed after {tries} tries ({last_error})"

    def _refusal(self, err: openai.APIStatusError, tries: int) -> str:
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
        return self._gave_up(f"HTTP {status}: {_one_line(err.message)}", tries)

    def option_probs(self, messages: list[Message], answer_prefix: str, labels: list[str]) -> list[float]:
        """P(label | conversation, assistant reply so far = answer_prefix), renormalised over `labels`, from
        the server's token log-probabilities (models/openai_logprobs.py); BackendError where it cannot."""
        problem = self.option_scoring_problem()
        if problem is not None:
            raise BackendError(f"{self.identity}: cannot score options: {problem}")
        reply = self._request(model=self.model, **scoring_request(messages, answer_prefix))  # its errors name us
        try:
            return label_probs(reply, labels)
        except BackendError as error:
            raise BackendError(f"{self.identity}: {error}") from None

    def option_scoring_problem(self) -> str | None:
        """Why this server cannot score options, or None: asked once (three one-token requests), then
        remembered. Called from the thread that chooses the estimator and runs the scoring passes."""
        if not hasattr(self, "_option_scoring_problem"):
            self._option_scoring_problem = continuation_problem(partial(self._request, model=self.model))
        return self._option_scoring_problem
