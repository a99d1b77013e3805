"""Circuit breakers for the router's calls to remote primaries (issue 16, "Overload").

A breaker counts consecutive failures to reach one node; at ``failures_max`` it opens, and
calls are refused at once (the caller answers 503 ``region_unavailable`` with Retry-After)
instead of queueing behind a peer that does not answer. After ``open_s`` one probe goes
through (half-open): success closes the breaker, failure re-opens it. A probe that never
reports (its caller was cancelled) is replaced by the next one after another ``open_s``.

Only the caller decides what a failure is: the router counts "could not reach the node before
my own deadline", never a timeout that the client's short Request-Timeout caused, so one
tenant cannot open a breaker for all. Imports nothing of the router but its limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from router.limits import BREAKER_FAILURES_MAX, BREAKER_OPEN_S


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures_max: int = BREAKER_FAILURES_MAX,
        open_s: float = BREAKER_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures_max = failures_max
        self._open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() - self._opened_at < self._open_s else "half_open"

    def allow(self) -> bool:
        """May a call go to the node now? In half-open state, True for one probe at a time."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self._open_s:
            return False
        if self._probe_at is not None and now - self._probe_at < self._open_s:
            return False  # a probe is out
        self._probe_at = now
        return True

    def retry_after_s(self) -> int:
        """Whole seconds until the next probe may go (at least 1), for Retry-After."""
        if self._opened_at is None:
            return 1
        left = self._open_s - (self._clock() - self._opened_at)
        return max(1, math.ceil(left))

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probe_at = None

    def failure(self) -> None:
        self._failures += 1
        if self._probe_at is not None or self._failures >= self._failures_max:
            self._opened_at = self._clock()
            self._probe_at = None
