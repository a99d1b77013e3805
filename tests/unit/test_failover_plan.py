"""The order of the failover procedures, against a recording fake of our own ShardOps (which
passes the same contract as the real one: tests/contracts/shard_ops.py)."""

from __future__ import annotations

import pytest

from consistency import failover_plan as fo
from consistency.errors import CasConflict
from consistency.limits import FAILOVER_LEASE_WAIT_S, TOPOLOGY_CONFIRM_S
from consistency.topology import Node, Shard
from tests.contracts.shard_ops import check_shard_ops

OLD = Node("s-1@a", "a", "h", 1)
SB = Node("s-1@b", "b", "h", 2)
NODES = (OLD, SB)


class Fake:
    """Records every operation; also the lease clock: each operation takes ``step_s`` of fake
    time, and the procedure's sleeps are recorded (and advance the clock) instead of slept."""

    def __init__(
        self, *, old_alive: bool, survival: bool = True, lsn: int = 100, step_s: float = 0.1
    ) -> None:
        self.now = 1000.0
        self.step_s = step_s
        self.lease = fo.LeaseClock(now=lambda: self.now, sleep=self._sleep)
        self.rec = fo.ShardRecord(Shard("s-1", "a", OLD, (SB,), 1), survival)
        self.rev = 10
        self.old_alive = old_alive
        self.lsn = lsn
        self.calls: list[str] = []
        self.conflict = False
        # The nodes out of recovery (a standby_lsn of None); promote() adds one.
        self.primaries: set[Node] = {OLD}
        self.cas_at: float | None = None
        self.writable_at: float | None = None

    def _sleep(self, seconds: float) -> None:
        self.calls.append("lease wait")
        self.now += seconds

    def _op(self, what: str) -> None:
        self.calls.append(what)
        self.now += self.step_s

    def load(self, shard: str) -> tuple[fo.ShardRecord, int]:
        return self.rec, self.rev

    def cas(self, shard: str, expected_revision: int, record: fo.ShardRecord) -> int:
        self._op(f"cas epoch={record.shard.epoch} survival={record.region_survival}")
        if self.conflict or expected_revision != self.rev:
            raise CasConflict("x")
        if record.shard.epoch != self.rec.shard.epoch:
            self.cas_at = self.now  # the epoch CAS completes here
        self.rec, self.rev = record, self.rev + 1
        return self.rev

    def fence_old(self, node: Node) -> int | None:
        self._op(f"fence {node.name}")
        if node not in NODES:
            return None
        return 120 if self.old_alive else None

    def standby_lsn(self, node: Node) -> fo.StandbyLsn | None:
        if node not in NODES or node in self.primaries:
            return None
        return fo.StandbyLsn(self.lsn, self.lsn)

    def stop(self, node: Node) -> None:
        self._op(f"stop {node.name}")

    def promote(self, node: Node) -> None:
        self._op(f"promote {node.name}")
        self.primaries.add(node)

    def set_epoch_in_db(self, node: Node, epoch: int) -> None:
        self._op(f"epoch {node.name} {epoch}")
        self.writable_at = self.now

    def await_sync_standby(self, primary: Node, standby: Node) -> None:
        self._op(f"sync {primary.name} <- {standby.name}")

    def rejoin(self, node: Node, primary: Node) -> None:
        self._op(f"rejoin {node.name} -> {primary.name}")

    def clear_sync_standby(self, primary: Node) -> None:
        self._op(f"nosync {primary.name}")

    def node_in(self, shard: str, region: str) -> Node:
        return next(n for n in NODES if n.region == region)

    def node_role_changed(self, shard: str, primary: Node, standbys: tuple[Node, ...]) -> None:
        self._op(f"roles {primary.name}")


def test_the_fake_keeps_the_shard_ops_contract() -> None:
    f = Fake(old_alive=True)
    check_shard_ops(f, "s-1", Node("s-1@c", "c", "h", 3))


def test_failover_dead_primary_sync_standby_order() -> None:
    f = Fake(old_alive=False)
    out = fo.failover(f, "s-1", "b", lease_clock=f.lease)
    assert f.calls == [
        "fence s-1@a",
        "cas epoch=2 survival=False",
        "promote s-1@b",
        "lease wait",
        "epoch s-1@b 2",
        "roles s-1@b",
    ]
    assert out.epoch == 2
    assert not out.region_survival
    assert f.rec.shard.primary == SB
    assert f.rec.shard.standbys == ()


def test_failover_refuses_without_sync_proof_unless_accepted() -> None:
    f = Fake(old_alive=False, survival=False)
    with pytest.raises(fo.FailoverRefused, match="lost"):
        fo.failover(f, "s-1", "b", lease_clock=f.lease)
    assert "promote s-1@b" not in f.calls
    assert not any(c.startswith("cas") for c in f.calls)
    out = fo.failover(f, "s-1", "b", accept_data_loss=True, lease_clock=f.lease)
    assert out.data_loss_accepted
    assert "promote s-1@b" in f.calls


def test_failover_alive_primary_behind_standby_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fo, "FAILOVER_CATCHUP_TIMEOUT_S", 0.05)
    f = Fake(old_alive=True, lsn=100)  # fenced at LSN 120, the standby holds 100
    with pytest.raises(fo.FailoverRefused, match="would be lost"):
        fo.failover(f, "s-1", "b", lease_clock=f.lease)
    assert f.calls == ["fence s-1@a"]


def test_switchover_fences_first_and_accepts_writes_only_with_a_sync_standby() -> None:
    f = Fake(old_alive=True, lsn=120)
    out = fo.switchover(f, "s-1", "b", lease_clock=f.lease)
    assert f.calls == [
        "fence s-1@a",
        "stop s-1@a",
        "cas epoch=2 survival=False",
        "promote s-1@b",
        "rejoin s-1@a -> s-1@b",
        "sync s-1@b <- s-1@a",
        "lease wait",
        "epoch s-1@b 2",
        "roles s-1@b",
        "cas epoch=2 survival=True",
    ]
    assert out.region_survival
    assert f.rec.shard.standbys == (OLD,)


def test_cas_conflict_stops_before_promotion() -> None:
    f = Fake(old_alive=False)
    f.conflict = True
    with pytest.raises(fo.FailoverError, match="changed"):
        fo.failover(f, "s-1", "b", lease_clock=f.lease)
    assert not any(c.startswith("promote") for c in f.calls)


def test_rejoin_restores_survival() -> None:
    f = Fake(old_alive=False)
    fo.failover(f, "s-1", "b", lease_clock=f.lease)
    f.calls.clear()
    out = fo.rejoin(f, "s-1", "a")
    assert f.calls[1:3] == ["rejoin s-1@a -> s-1@b", "sync s-1@b <- s-1@a"]
    assert out.region_survival
    assert f.rec.region_survival
    assert f.rec.shard.standbys == (OLD,)


def test_finish_promotion_after_an_actor_died_past_the_cas() -> None:
    f = Fake(old_alive=False)

    class Died(Exception):
        pass

    def die(node: Node) -> None:
        raise Died

    real_promote = f.promote
    f.promote = die  # type: ignore[method-assign]
    with pytest.raises(Died):
        fo.failover(f, "s-1", "b", lease_clock=f.lease)
    assert f.rec.shard.primary == SB
    assert f.rec.extra["failover_from"] == OLD.name
    f.promote = real_promote  # type: ignore[method-assign]
    f.calls.clear()
    out = fo.finish_promotion(f, "s-1", lease_clock=f.lease)
    assert f.calls == ["promote s-1@b", "lease wait", "epoch s-1@b 2", "roles s-1@b"]
    assert out.epoch == 2
    # Once promoted there is nothing left to finish.
    f.primaries.add(SB)
    with pytest.raises(fo.FailoverRefused, match="nothing to finish"):
        fo.finish_promotion(f, "s-1", lease_clock=f.lease)


def test_degrade_records_no_survival_before_the_primary_stops_waiting() -> None:
    f = Fake(old_alive=True)
    out = fo.degrade(f, "s-1")
    assert f.calls == ["cas epoch=1 survival=False", "nosync s-1@a"]
    assert not out.region_survival
    with pytest.raises(fo.FailoverRefused):
        fo.degrade(f, "s-1")
    f.calls.clear()
    out = fo.restore(f, "s-1")
    # The reverse order: the standby is synchronous before the record claims survival.
    assert f.calls == ["sync s-1@a <- s-1@b", "cas epoch=1 survival=True"]
    assert out.region_survival
    assert f.rec.region_survival


def _assert_lease_waited_out(f: Fake) -> None:
    """The target accepts writes only after every router lease of the old epoch has ended: a
    lease confirmed by a read sent before the CAS completed ends before cas_at + the bound."""
    assert f.cas_at is not None
    assert f.writable_at is not None
    assert f.writable_at - f.cas_at >= FAILOVER_LEASE_WAIT_S - 1e-9  # float sums of fake time
    assert FAILOVER_LEASE_WAIT_S > TOPOLOGY_CONFIRM_S  # the drift margin is real


@pytest.mark.parametrize("step_s", [0.0, 0.3, 2.0])
def test_failover_accepts_writes_only_after_the_lease_wait(step_s: float) -> None:
    f = Fake(old_alive=False, step_s=step_s)
    fo.failover(f, "s-1", "b", lease_clock=f.lease)
    _assert_lease_waited_out(f)
    # The wait counts from the CAS and overlaps the promotion: no longer than it must be.
    assert f.writable_at is not None
    assert f.cas_at is not None
    assert f.writable_at - f.cas_at <= max(FAILOVER_LEASE_WAIT_S, step_s) + step_s + 1e-9
    if step_s > FAILOVER_LEASE_WAIT_S:
        assert "lease wait" not in f.calls  # the promotion alone outlasted the leases


def test_switchover_accepts_writes_only_after_the_lease_wait() -> None:
    f = Fake(old_alive=True, lsn=120, step_s=0.05)
    fo.switchover(f, "s-1", "b", lease_clock=f.lease)
    _assert_lease_waited_out(f)


def test_finish_promotion_waits_a_whole_lease_from_its_own_start() -> None:
    f = Fake(old_alive=False, step_s=0.0)
    # A dead actor's CAS already names the standby primary at epoch 2; it is still in recovery.
    f.rec = fo.ShardRecord(Shard("s-1", "a", SB, (), 2), False)
    start = f.now
    fo.finish_promotion(f, "s-1", lease_clock=f.lease)
    # The dead actor's CAS time is unknown (at most "now"), so the wait is whole.
    assert f.writable_at is not None
    assert f.writable_at - start >= FAILOVER_LEASE_WAIT_S - 1e-9
    assert f.calls == ["promote s-1@b", "lease wait", "epoch s-1@b 2", "roles s-1@b"]
