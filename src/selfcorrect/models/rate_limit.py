"""How many requests an HTTP model gets at once, and how fast: an adaptive in-flight limit (AIMD) and
token-bucket ceilings on requests and tokens per minute, with a meter of what happened.

`AdaptiveLimit` lets at most `limit` requests in flight. The limit starts at the ceiling the user chose
(`--concurrency`). When the server says it is overloaded (HTTP 429 or 503) it becomes DECREASE times the
requests in flight at that moment (or times the limit, if fewer were in flight; floor 1), as TCP halves its
flight size rather than its window: a server that takes 32 at once refuses the 33rd, and the limit drops to
16 at once, not from 256 to 128 to 64 with a burst of refusals at each step. After each `limit` successes
since it last changed it grows by 1, up to the ceiling again: additive increase, multiplicative decrease. A burst of requests sent under the old limit fails
together; only the first of them lowers the limit (each request carries the number of decreases made
before it was sent, and an overload reported by a request sent before the latest decrease is not counted
again), so one overloaded moment halves the limit once, not down to 1. When the server asks for a pause
(Retry-After), no request starts until it is over.

`RateCeiling` is a token bucket refilled at `per_minute / 60` per second that holds one second's worth, so
requests (or tokens) are spread evenly rather than sent in a burst at the start of each minute.

`TrafficMeter` counts what the requests of one run met: requests sent, retries, 429s and 503s, the most
in flight at once and the lowest the limit went. A backend serving several runs (the `reproduce` grid)
keeps one meter open per run.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from ..errors import UserError

DECREASE = 0.5  # the limit's factor on an overload
MAX_CONCURRENCY = 1024  # one thread per request in flight


def check_rates(concurrency: int | None, rpm: float | None, tpm: float | None) -> None:
    """Refuse a concurrency or a rate ceiling that cannot work, naming the flag."""
    if concurrency is not None and not 1 <= concurrency <= MAX_CONCURRENCY:
        raise UserError(f"--concurrency {concurrency}: must be between 1 and {MAX_CONCURRENCY} (requests in flight)")
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} {value:g}: must be more than 0 (a ceiling per minute)")


@dataclass
class TrafficMeter:
    """What the requests sent while the meter was open met."""

    concurrency: int  # the ceiling of requests in flight
    requests: int = 0  # HTTP requests sent, retries included
    retried: int = 0  # of them, repeats of a request that had failed
    rate_limited: int = 0  # answered HTTP 429
    unavailable: int = 0  # answered HTTP 503
    peak_in_flight: int = 0  # the most requests in flight at once
    lowest_limit: int = 0  # the lowest the adaptive limit went (the ceiling if it never went down)

    def as_dict(self) -> dict:
        return asdict(self)


class AdaptiveLimit:
    """At most `limit` requests in flight; the limit adapts to overloads (see the module) unless
    `adaptive` is False, when it stays at `ceiling` (pauses the server asks for are kept either way)."""

    def __init__(self, ceiling: int, adaptive: bool = True, clock: Callable[[], float] = time.monotonic):
        self.ceiling, self.adaptive, self.clock = ceiling, adaptive, clock
        self.limit = float(ceiling)
        self.in_flight = 0
        self.successes = 0  # since the limit last changed
        self.decreases = 0  # how many times the limit went down: a request's ticket
        self.paused_until = 0.0  # no request starts before this (clock time)
        self.meters: list[TrafficMeter] = []
        self.changed = threading.Condition()

    def acquire(self) -> int:
        """Wait for a free slot and the end of any pause; returns the request's ticket for `overloaded`."""
        with self.changed:
            while True:
                pause = self.paused_until - self.clock()
                if pause <= 0 and self.in_flight < int(self.limit):
                    break
                self.changed.wait(pause if pause > 0 else None)
            self.in_flight += 1
            for meter in self.meters:
                meter.requests += 1
                meter.peak_in_flight = max(meter.peak_in_flight, self.in_flight)
            return self.decreases

    def release(self) -> None:
        with self.changed:
            self.in_flight -= 1
            self.changed.notify()

    def succeeded(self) -> None:
        with self.changed:
            self.successes += 1
            if self.adaptive and self.successes >= self.limit and self.limit < self.ceiling:
                self.limit = min(self.ceiling, self.limit + 1)
                self.successes = 0
                self.changed.notify()

    def overloaded(self, ticket: int, status: int, pause_s: float | None) -> None:
        """The request sent with `ticket` was answered `status` (429 or 503), asking for `pause_s` seconds of
        quiet if the server said so."""
        with self.changed:
            for meter in self.meters:
                meter.rate_limited += status == 429
                meter.unavailable += status == 503
            if pause_s:
                self.paused_until = max(self.paused_until, self.clock() + pause_s)
            if self.adaptive and ticket == self.decreases:
                self.limit = max(1.0, min(self.limit, self.in_flight) * DECREASE)
                self.successes = 0
                self.decreases += 1
                for meter in self.meters:
                    meter.lowest_limit = min(meter.lowest_limit, int(self.limit))

    def retrying(self) -> None:
        with self.changed:
            for meter in self.meters:
                meter.retried += 1

    @contextlib.contextmanager
    def metered(self) -> Iterator[TrafficMeter]:
        """A meter that counts every request while the block runs."""
        meter = TrafficMeter(concurrency=self.ceiling, lowest_limit=int(self.limit))
        with self.changed:
            self.meters.append(meter)
        try:
            yield meter
        finally:
            with self.changed:
                self.meters.remove(meter)


class RateCeiling:
    """A token bucket: `take(amount)` waits until the bucket holds `amount` (or is full, for an amount larger
    than it holds), then takes it, so that over any stretch of time at most `per_minute` per minute go
    through, plus one second's worth at the start. `give_back` returns what an estimate took too much."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = per_minute / 60.0  # per second
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.clock, self.sleep = clock, sleep
        self.filled_at = clock()
        self.lock = threading.Lock()

    def take(self, amount: float) -> None:
        needed = min(amount, self.capacity)
        while True:
            with self.lock:
                self._refill()
                if self.level >= needed:
                    self.level -= amount  # may go below 0: a large amount delays those after it
                    return
                wait = (needed - self.level) / self.rate
            self.sleep(wait)

    def give_back(self, amount: float) -> None:
        with self.lock:
            self._refill()
            self.level = min(self.capacity, self.level + amount)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.filled_at) * self.rate)
        self.filled_at = now
