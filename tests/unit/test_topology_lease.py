"""The read lease on a shard's epoch (topology.EpochConfirmations), on a fake clock."""

from __future__ import annotations

from consistency.limits import (
    FAILOVER_LEASE_WAIT_S,
    TOPOLOGY_CONFIRM_INTERVAL_S,
    TOPOLOGY_CONFIRM_S,
    TOPOLOGY_CONFIRM_TIMEOUT_S,
    TOPOLOGY_WAKE_WAIT_S,
)
from consistency.topology import EpochConfirmations


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_unconfirmed_until_a_quorum_read_shows_the_epoch() -> None:
    clock = Clock()
    c = EpochConfirmations(1.0, clock)
    assert not c.confirmed("s-1", 1)
    c.record(clock.t, {"s-1": 1})
    assert c.confirmed("s-1", 1)
    assert not c.confirmed("s-2", 1)  # per shard


def test_lease_counts_from_the_send_not_the_answer() -> None:
    clock = Clock()
    c = EpochConfirmations(1.0, clock)
    sent = clock.t
    clock.t += 0.7  # a slow quorum read: answered 0.7 s after it was sent
    c.record(sent, {"s-1": 1})
    clock.t = sent + 0.99
    assert c.confirmed("s-1", 1)
    clock.t = sent + 1.0
    assert not c.confirmed("s-1", 1)  # 0.3 s after the answer, yet past the bound


def test_a_newer_epoch_ends_the_old_one_at_once() -> None:
    clock = Clock()
    c = EpochConfirmations(1.0, clock)
    c.record(clock.t, {"s-1": 1, "s-2": 1})
    clock.t += 0.1
    c.record(clock.t, {"s-1": 2, "s-2": 1})
    assert not c.confirmed("s-1", 1)  # the router's map still says 1: it must not read
    assert c.confirmed("s-1", 2)
    assert c.confirmed("s-2", 1)
    assert c.epoch_seen("s-1") == 2


def test_an_answer_sent_earlier_never_overrides_a_later_one() -> None:
    clock = Clock()
    c = EpochConfirmations(1.0, clock)
    early = clock.t
    clock.t += 0.2
    late = clock.t
    c.record(late, {"s-1": 2})  # a refresh sent later answered first
    c.record(early, {"s-1": 1})  # the slow confirmation, sent before the CAS, answers last
    assert c.epoch_seen("s-1") == 2
    assert not c.confirmed("s-1", 1)
    # An equally old answer does not extend a lease either.
    c.record(late, {"s-1": 3})
    assert c.epoch_seen("s-1") == 2


def test_refreshing_keeps_the_lease_and_stopping_lapses_it() -> None:
    clock = Clock()
    c = EpochConfirmations(TOPOLOGY_CONFIRM_S, clock)
    for _ in range(20):
        c.record(clock.t, {"s-1": 1})
        clock.t += TOPOLOGY_CONFIRM_INTERVAL_S
        assert c.confirmed("s-1", 1)
    # Cut off: no more answers. Still served within the bound of the last send, then never.
    last_sent = clock.t - TOPOLOGY_CONFIRM_INTERVAL_S
    clock.t = last_sent + TOPOLOGY_CONFIRM_S - 0.001
    assert c.confirmed("s-1", 1)
    clock.t = last_sent + TOPOLOGY_CONFIRM_S
    assert not c.confirmed("s-1", 1)


def test_the_bounds_fit_together() -> None:
    # Several confirmation rounds per lease, a round ends before its answer is worthless, and
    # the failover waits strictly longer than any lease.
    assert TOPOLOGY_CONFIRM_INTERVAL_S * 2 < TOPOLOGY_CONFIRM_S
    assert TOPOLOGY_CONFIRM_TIMEOUT_S < TOPOLOGY_CONFIRM_S
    # A read that woke the loop outwaits the round it started.
    assert TOPOLOGY_WAKE_WAIT_S > TOPOLOGY_CONFIRM_TIMEOUT_S
    assert FAILOVER_LEASE_WAIT_S > TOPOLOGY_CONFIRM_S


def test_the_race_with_a_failover_cas() -> None:
    """A confirmation sent just before the CAS completed, answered after it with the old epoch
    (etcd ordered it first): its lease ends before the failover lets the new primary write."""
    clock = Clock()
    c = EpochConfirmations(TOPOLOGY_CONFIRM_S, clock)
    sent = clock.t
    cas_done = sent + 0.001  # the CAS completes right after the read was sent
    clock.t = cas_done + 0.2
    c.record(sent, {"s-1": 1})  # answered after the CAS, linearized before it
    assert c.confirmed("s-1", 1)  # still serving the old primary, but...
    clock.t = cas_done + FAILOVER_LEASE_WAIT_S  # ...the new primary's first write
    assert not c.confirmed("s-1", 1)
