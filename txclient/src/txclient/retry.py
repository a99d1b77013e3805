"""Retry policy: what an answer means for the call, the backoff, and the retry budget.

Pure and clock-injected, so the sync and async clients share it and tests drive it with a fake
clock. What may be retried, and what the caller may conclude:

| answer                               | write (has a key)      | account open (no key) | read  |
|--------------------------------------|------------------------|-----------------------|-------|
| connection refused / connect timeout | retry, not sent        | retry, not sent       | retry |
| connection dropped, timeout, 500/502 | retry, outcome unknown | OutcomeUnknown now    | retry |
| 429 rate_limited (Retry-After)       | retry, not started     | retry, not started    | retry |
| 503 region_unavailable (Retry-After) | retry elsewhere        | retry elsewhere       | retry |
| 504 outcome_unknown                  | retry, outcome unknown | OutcomeUnknown now    | retry |
| any other 4xx                        | definite: raised       | definite: raised      | raise |

A 503 or a connection failure also marks the region down, so the next attempt goes to the next
best region.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from txclient import limits

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Verdict:
    retry: bool
    # The write may have been applied (its outcome is unknown until a retry answers).
    unknown: bool
    # The region did not answer: move to the next best one.
    move: bool
    retry_after_s: float | None = None


DEFINITE = Verdict(retry=False, unknown=False, move=False)
NOT_SENT = Verdict(retry=True, unknown=False, move=True)
MAYBE_SENT = Verdict(retry=True, unknown=True, move=True)
TIMED_OUT = Verdict(retry=True, unknown=True, move=False)


def verdict_for_status(status: int, retry_after_s: float | None) -> Verdict:
    if status == 429:
        return Verdict(retry=True, unknown=False, move=False, retry_after_s=retry_after_s)
    if status == 503:
        return Verdict(retry=True, unknown=False, move=True, retry_after_s=retry_after_s)
    if status >= 500:
        # 504 outcome_unknown, and a 500/502 from something between us and the router.
        return Verdict(retry=True, unknown=True, move=False, retry_after_s=retry_after_s)
    return DEFINITE


def parse_retry_after(value: str | None, now_wall: float | None = None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date), bounded; None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = now_wall if now_wall is not None else time.time()
        seconds = (when - datetime.fromtimestamp(now, UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), limits.RETRY_AFTER_S_MAX)


class Backoff:
    """Full jitter: the n-th retry (n from 0) sleeps uniform(0, min(cap, base * 2**n)), and at
    least what the server asked for in ``Retry-After``."""

    def __init__(
        self,
        base_s: float = limits.BACKOFF_BASE_S,
        cap_s: float = limits.BACKOFF_CAP_S,
        rng: random.Random | None = None,
    ) -> None:
        assert 0 < base_s <= cap_s
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng or random.Random()

    def ceiling_s(self, retry: int) -> float:
        # 2**retry overflows nothing: the exponent is bounded by ATTEMPTS_MAX.
        return min(self.cap_s, self.base_s * 2.0 ** min(retry, limits.ATTEMPTS_MAX))

    def delay_s(self, retry: int, retry_after_s: float | None = None) -> float:
        jitter: float = self._rng.uniform(0.0, self.ceiling_s(retry))
        return max(jitter, retry_after_s or 0.0)


class RetryBudget:
    """A token bucket per client: a retry takes one token; tokens return with time and with
    successful calls, up to the bucket's size. Thread-safe."""

    def __init__(
        self,
        tokens_max: float = limits.RETRY_BUDGET_TOKENS_MAX,
        refill_per_s: float = limits.RETRY_BUDGET_REFILL_PER_S,
        success_credit: float = limits.RETRY_BUDGET_SUCCESS_CREDIT,
        clock: Clock = time.monotonic,
    ) -> None:
        assert tokens_max >= 1
        assert refill_per_s >= 0
        assert success_credit >= 0
        self.tokens_max = tokens_max
        self.refill_per_s = refill_per_s
        self.success_credit = success_credit
        self._clock = clock
        self._tokens = tokens_max
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.tokens_max, self._tokens + (now - self._at) * self.refill_per_s)
        self._at = now

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens

    def try_spend(self) -> bool:
        """Take a token for one retry; False (and nothing taken) when the budget is spent."""
        with self._lock:
            self._refill()
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    def on_success(self) -> None:
        with self._lock:
            self._refill()
            self._tokens = min(self.tokens_max, self._tokens + self.success_credit)
