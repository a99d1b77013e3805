"""The circuit breaker's state machine (router.breaker), on a hand-driven clock."""

from __future__ import annotations

from router.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    b = CircuitBreaker(failures_max=3, open_s=2.0, clock=clock)
    b.failure()
    b.failure()
    b.success()  # an answer in between resets the count
    b.failure()
    b.failure()
    assert b.allow()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open"
    assert not b.allow()
    assert b.retry_after_s() == 2
    clock.now += 1.5
    assert not b.allow()
    assert b.retry_after_s() == 1


def test_half_open_lets_one_probe_through_and_its_outcome_decides() -> None:
    clock = Clock()
    b = CircuitBreaker(failures_max=1, open_s=2.0, clock=clock)
    b.failure()
    clock.now += 2.0
    assert b.state == "half_open"
    assert b.allow(), "the probe"
    assert not b.allow(), "one probe at a time"
    b.failure()  # the probe failed: open for another period
    assert b.state == "open"
    assert not b.allow()
    clock.now += 2.0
    assert b.allow()
    b.success()
    assert b.state == "closed"
    assert all(b.allow() for _ in range(5))


def test_a_probe_that_never_reports_is_replaced() -> None:
    clock = Clock()
    b = CircuitBreaker(failures_max=1, open_s=2.0, clock=clock)
    b.failure()
    clock.now += 2.0
    assert b.allow()
    clock.now += 1.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow(), "the lost probe's lease ran out"
