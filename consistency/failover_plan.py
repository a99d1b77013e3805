"""Moving a shard's primary between regions: failover, switchover, rejoin (DESIGN.md section 7).

Pure orchestration: the caller hands in :class:`ShardOps` (fence, promote, LSNs, etcd CAS, ...),
so this module never imports ``regionstore`` or ``infra`` and its ordering can be tested against
a recording fake while ``infra.failover`` wires PostgreSQL and etcd.

Why the steps come in this order (G1: no acknowledged write lost; G5: no write under a stale
epoch). Routers send the shard epoch they read from etcd; a store accepts a write only when its
own fence row holds exactly that epoch and is not fenced.

1. **Fence the old primary first, when it answers** (``fence_old``). Routers holding the old map
   can only ever reach the old primary; once its fence row says ``fenced``, every write there is
   refused (the fence takes the write lock exclusively, so writes in flight commit first and
   later ones read the fence). Its WAL position *after* the fence is then final: nothing can
   commit there any more, so "the target has received up to that LSN" proves the target holds
   every acknowledged commit.
2. **If the old primary does not answer**, the proof is synchronous replication: with
   ``synchronous_commit = on`` and ``FIRST 1 (target)`` the old primary acknowledged a commit only
   after the target had flushed it. So the target must be the shard's synchronous standby (the
   etcd record says so, and says region survival was on). The same fact keeps a dead-but-not-
   gone old primary harmless: if it comes back and a router with the old map writes there, the
   commit waits for its synchronous standby, which is the node we promote and which will never
   stream from it again, so the write is never acknowledged (the router answers 504 and the
   client's retry with the same Idempotency-Key goes to the new primary). Anything else needs
   ``accept_data_loss``, and the refusal says what may be lost.
3. **Compare-and-swap the shard record in etcd** (epoch + 1, primary = target) on the revision
   read in step 0: two operators racing both read epoch E, only one CAS wins, and only the
   winner promotes. Routers that pick up the new map right now are refused by the target (still
   a standby: read-only, or its replicated fence row says E): they answer 503 with Retry-After
   or hold the write briefly (router failover buffer); they never write.
4. **Promote** the target, then **wait out the routers' epoch leases**, then 5. **write the new
   epoch into it** (``set_epoch_in_db``). Only from this moment can a write succeed anywhere, and
   only with epoch E + 1, which only routers with the new map send, and only to the target. The
   old primary (fenced, or holding E, or unable to acknowledge) refuses them all.

   *Why the wait* (reads; G6 and linearizable ``strong`` reads). A router cut off from etcd's
   majority keeps its map, and the old primary, though it can no longer commit, still answers
   reads with what it had: without the wait such a router would serve, as ``strong``, a balance
   older than writes the new primary has acknowledged. So a router reads a shard's primary or
   standby only while its epoch is *confirmed*: within ``TOPOLOGY_CONFIRM_S`` of the **send**
   time of a linearizable etcd read that answered that epoch (``topology.EpochConfirmations``).
   Here, after the CAS has *completed* (at ``t_cas`` by our clock), we wait until
   ``t_cas + FAILOVER_LEASE_WAIT_S`` (the bound plus ``TOPOLOGY_CONFIRM_DRIFT_S`` for clock rate
   drift and scheduling) before the target accepts anything. The argument: take any router that
   still believes E. Its newest confirmation of E was a quorum read linearized before the CAS
   committed (one linearized after it would have answered E + 1), so it was *sent* before the
   CAS completed, i.e. before ``t_cas``; the router stops reading E's nodes at
   ``sent + TOPOLOGY_CONFIRM_S < t_cas + FAILOVER_LEASE_WAIT_S``, before the first write the new
   primary can acknowledge. A confirmation that *raced* the CAS is the same case: either etcd
   ordered it before the CAS (then it was sent before ``t_cas`` and its lease ends in time) or
   after (then it shows E + 1, confirms nothing about E, and the router reloads). A read that
   passes the check just before its lease ends reaches the old primary while the target still
   refuses writes, so it is concurrent with, never after, any new acknowledged write. The wait
   overlaps the promotion (it counts from the CAS), so it costs only what the promotion did not
   already take.
6. **Region survival again**: give the new primary a synchronous standby. In a switchover the
   old primary is rewound and rejoined as that standby *before* step 5, and named synchronous
   before any write is accepted, so no write is ever acknowledged without region survival.
   In a failover the old primary is gone, so the shard runs without region survival until
   ``rejoin``: the etcd record carries ``region_survival = false`` and ``txr status`` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from consistency import coherence
from consistency.errors import CasConflict, ConsistencyError
from consistency.limits import FAILOVER_LEASE_WAIT_S
from consistency.topology import Node, Shard

# A switchover waits for the standby to replay the fenced primary's last LSN. Locally that takes
# milliseconds; across a WAN a few round trips. Past this something is wrong with replication,
# and the old primary stays fenced (unavailable, never inconsistent) until the operator acts.
CATCHUP_TIMEOUT_S: Final = 30.0
# A failover with a reachable old primary waits this long for the target to receive its last
# LSN before it refuses (a sync standby is normally already there).
FAILOVER_CATCHUP_TIMEOUT_S: Final = 10.0
CATCHUP_POLL_S: Final = 0.02

Progress = Callable[[str], None]


class FailoverError(ConsistencyError):
    """The procedure could not run or stopped part way; the message says where and why."""


class FailoverRefused(FailoverError):
    """The procedure refused to start: running it could lose acknowledged writes, or it makes
    no sense (the target is not a standby of the shard)."""


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """The etcd shard record: :class:`Shard` plus whether a synchronous standby protects it."""

    shard: Shard
    # True when the primary names a streaming synchronous standby in another region (G1).
    region_survival: bool = True
    # Extra keys other writers stored; carried over untouched.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, **self.shard.to_json(), "region_survival": self.region_survival}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        known = {"name", "home_region", "primary", "standbys", "epoch", "region_survival"}
        return cls(
            Shard.from_json(d),
            bool(d.get("region_survival", True)),
            {k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True, slots=True)
class StandbyLsn:
    receive: int  # last WAL position flushed by the walreceiver
    replay: int  # last WAL position replayed


class ShardOps(Protocol):
    """What the procedures need from the world. Unreachable nodes are values (None), every
    other failure an exception."""

    def load(self, shard: str) -> tuple[ShardRecord, int]:
        """The shard's record and its etcd mod_revision."""
        ...

    def cas(self, shard: str, expected_revision: int, record: ShardRecord) -> int:
        """Write ``record`` if the key still has ``expected_revision``; raises CasConflict."""
        ...

    def fence_old(self, node: Node) -> int | None:
        """Fence ``node`` (refuse every write) and return its WAL flush LSN after the fence;
        None when it does not answer (bounded)."""
        ...

    def standby_lsn(self, node: Node) -> StandbyLsn | None:
        """A standby's receive/replay LSNs; None when it does not answer or is not a standby."""
        ...

    def stop(self, node: Node) -> None:
        """Shut ``node`` down cleanly (its last WAL is sent to its standbys first)."""
        ...

    def promote(self, node: Node) -> None: ...

    def set_epoch_in_db(self, node: Node, epoch: int) -> None:
        """Accept writes under ``epoch`` (only) on ``node``."""
        ...

    def await_sync_standby(self, primary: Node, standby: Node) -> None:
        """Name ``standby`` synchronous on ``primary`` and return once it is (or raise)."""
        ...

    def rejoin(self, node: Node, primary: Node) -> None:
        """Rewind ``node`` (stopped or crashed) and start it as a streaming standby of
        ``primary``."""
        ...

    def clear_sync_standby(self, primary: Node) -> None:
        """Let ``primary`` commit without waiting for any standby (or raise)."""
        ...

    def node_in(self, shard: str, region: str) -> Node:
        """The deployment's node of ``shard`` in ``region`` (also one etcd no longer lists)."""
        ...

    def node_role_changed(self, shard: str, primary: Node, standbys: tuple[Node, ...]) -> None:
        """Bookkeeping of the deployment (the local launcher's state file)."""
        ...


@dataclass(frozen=True, slots=True)
class FailoverResult:
    shard: str
    old_primary: str
    new_primary: str
    epoch: int
    region_survival: bool
    steps: tuple[tuple[str, float], ...]  # (step, seconds since start)
    data_loss_accepted: bool = False
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "old_primary": self.old_primary,
            "new_primary": self.new_primary,
            "epoch": self.epoch,
            "region_survival": self.region_survival,
            "data_loss_accepted": self.data_loss_accepted,
            "steps": [{"step": s, "at_s": round(t, 4)} for s, t in self.steps],
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class LeaseClock:
    """The clock the lease wait reads and sleeps on (a fake one in the unit tests)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def _wait_out_leases(lease: LeaseClock, since: float, clock: StepClock) -> None:
    """Block until ``FAILOVER_LEASE_WAIT_S`` has passed since ``since`` (the CAS's completion,
    or now when the CAS's time is unknown): no router still reads the old epoch's nodes."""
    left = FAILOVER_LEASE_WAIT_S - (lease.now() - since)
    if left > 0:
        lease.sleep(left)
    clock.step(f"waited out the routers' epoch leases ({FAILOVER_LEASE_WAIT_S:.2f}s since the CAS)")


class StepClock:
    """The steps of one procedure with their times (also rehome's), reported as they happen."""

    def __init__(self, progress: Progress) -> None:
        self._t0 = time.monotonic()
        self._last = self._t0
        self._progress = progress
        self.steps: list[tuple[str, float]] = []

    def step(self, what: str) -> None:
        now = time.monotonic()
        self.steps.append((what, now - self._t0))
        self._progress(f"[{now - self._t0:7.3f}s +{(now - self._last) * 1000:6.0f}ms] {what}")
        self._last = now


def _find_standby(rec: ShardRecord, region: str) -> Node:
    s = rec.shard
    if s.primary.region == region:
        raise FailoverRefused(f"{s.name}: {s.primary.name} in {region} is already the primary")
    for n in s.standbys:
        if n.region == region:
            return n
    regions = ", ".join(n.region for n in s.standbys) or "none"
    raise FailoverRefused(f"{s.name} has no standby in {region} (standbys in: {regions})")


def _wait_lsn(
    ops: ShardOps, node: Node, target_lsn: int, *, replay: bool, timeout_s: float
) -> StandbyLsn | None:
    """Poll ``node`` until its receive (or replay) LSN reaches ``target_lsn``; the last
    reading either way (None if it never answered)."""
    deadline = time.monotonic() + timeout_s
    last: StandbyLsn | None = None
    while True:
        got = ops.standby_lsn(node)
        if got is not None:
            last = got
            if (got.replay if replay else got.receive) >= target_lsn:
                return got
        if time.monotonic() > deadline:
            return last
        time.sleep(CATCHUP_POLL_S)


def fmt_lsn(lsn: int | None) -> str:
    return "unknown" if lsn is None else coherence.format_lsn(lsn)


def _cas(ops: ShardOps, rec: ShardRecord, rev: int, new: ShardRecord) -> int:
    try:
        return ops.cas(rec.shard.name, rev, new)
    except CasConflict as exc:
        raise FailoverError(
            f"{rec.shard.name}: the shard record changed in etcd since it was read (another "
            "operator?); nothing was promoted, re-read `txr status` and retry"
        ) from exc


def failover(
    ops: ShardOps,
    shard: str,
    to_region: str,
    *,
    accept_data_loss: bool = False,
    progress: Progress = lambda _m: None,
    lease_clock: LeaseClock | None = None,
) -> FailoverResult:
    """Promote ``shard``'s standby in ``to_region`` after its primary was lost (see module doc)."""
    lease = lease_clock or LeaseClock()
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    old = rec.shard.primary
    target = _find_standby(rec, to_region)
    clock.step(f"{shard}: epoch {rec.shard.epoch}, primary {old.name}, target {target.name}")

    old_lsn = ops.fence_old(old)
    notes: list[str] = []
    loss = False
    if old_lsn is not None:
        clock.step(f"fenced old primary {old.name} at LSN {fmt_lsn(old_lsn)}")
        got = _wait_lsn(ops, target, old_lsn, replay=False, timeout_s=FAILOVER_CATCHUP_TIMEOUT_S)
        if got is None or got.receive < old_lsn:
            what = (
                f"{target.name} received up to {fmt_lsn(got.receive if got else None)} but the "
                f"fenced old primary is at {fmt_lsn(old_lsn)}: commits between the two would "
                "be lost"
            )
            if not accept_data_loss:
                raise FailoverRefused(
                    f"{what}; wait for replication, or pass --accept-data-loss "
                    "(the old primary stays fenced)"
                )
            loss = True
            notes.append("data loss accepted: " + what)
        else:
            clock.step(f"{target.name} holds everything: received {fmt_lsn(got.receive)}")
    else:
        clock.step(f"old primary {old.name} does not answer (not fenced)")
        is_sync = rec.region_survival and rec.shard.standbys[:1] == (target,)
        if is_sync:
            clock.step(f"{target.name} is the synchronous standby: it holds every acked commit")
        else:
            got = ops.standby_lsn(target)
            what = (
                f"the old primary {old.name} is unreachable and {target.name} was not its "
                f"synchronous standby (region survival was "
                f"{'on' if rec.region_survival else 'off'}): every commit the old primary "
                f"acknowledged after {fmt_lsn(got.receive if got else None)} (what "
                f"{target.name} received) is lost"
            )
            if not accept_data_loss:
                raise FailoverRefused(what + "; pass --accept-data-loss to promote anyway")
            loss = True
            notes.append("data loss accepted: " + what)

    new_epoch = rec.shard.epoch + 1
    others = tuple(n for n in rec.shard.standbys if n != target)
    claimed = ShardRecord(
        replace(rec.shard, primary=target, standbys=others, epoch=new_epoch),
        region_survival=False,
        # Whoever finishes an interrupted failover (finish_promotion) names the old primary.
        extra={**rec.extra, "failover_from": old.name},
    )
    rev = _cas(ops, rec, rev, claimed)
    cas_done = lease.now()
    clock.step(f"etcd: epoch {rec.shard.epoch} -> {new_epoch}, primary {target.name}")
    ops.promote(target)
    clock.step(f"promoted {target.name}")
    _wait_out_leases(lease, cas_done, clock)
    ops.set_epoch_in_db(target, new_epoch)
    clock.step(f"fence row of {target.name} = epoch {new_epoch}: writes accepted")
    return _after_promotion(ops, claimed, rev, old.name, clock, loss, notes)


def _after_promotion(
    ops: ShardOps,
    claimed: ShardRecord,
    rev: int,
    old_name: str,
    clock: StepClock,
    loss: bool,
    notes: list[str],
) -> FailoverResult:
    """Steps 5 (bookkeeping) and 6 (a synchronous standby again, or a loud warning)."""
    shard, target, others = claimed.shard.name, claimed.shard.primary, claimed.shard.standbys
    ops.node_role_changed(shard, target, others)
    survival = False
    for cand in (n for n in others if n.region != target.region):
        try:
            ops.await_sync_standby(target, cand)
        except ConsistencyError as exc:
            notes.append(f"{cand.name} could not become synchronous: {exc}")
            continue
        rev = _cas(ops, claimed, rev, replace(claimed, region_survival=True))
        survival = True
        clock.step(f"{cand.name} is the synchronous standby: region survival restored")
        break
    if not survival:
        old_region = old_name.rsplit("@", 1)[-1]
        msg = (
            f"WARNING: {shard} now runs WITHOUT REGION SURVIVAL (no synchronous standby); "
            f"run `txr rejoin {shard} --node {old_region}` once {old_name} is back"
        )
        notes.append(msg)
        clock.step(msg)
    return FailoverResult(
        shard,
        old_name,
        target.name,
        claimed.shard.epoch,
        survival,
        tuple(clock.steps),
        loss,
        tuple(notes),
    )


def finish_promotion(
    ops: ShardOps,
    shard: str,
    *,
    progress: Progress = lambda _m: None,
    lease_clock: LeaseClock | None = None,
) -> FailoverResult:
    """Finish a failover that stopped after its epoch CAS (its actor died): the record already
    names the new primary at the new epoch, but that node is still a standby.

    Safe for the reason the CAS was: the CAS happened only after the proof (fence, or the target
    being the synchronous standby), and until the promotion the target is the old primary's
    synchronous standby still, so anything the old primary acknowledged meanwhile reached it.
    The CAS's time is unknown here, so the lease wait counts from now (it completed before).
    """
    lease = lease_clock or LeaseClock()
    since = lease.now()
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    target = rec.shard.primary
    if ops.standby_lsn(target) is None:
        raise FailoverRefused(
            f"{shard}: {target.name} is not in recovery (or does not answer): nothing to finish"
        )
    clock.step(f"{shard}: {target.name} named primary at epoch {rec.shard.epoch} but in recovery")
    ops.promote(target)
    clock.step(f"promoted {target.name}")
    _wait_out_leases(lease, since, clock)
    ops.set_epoch_in_db(target, rec.shard.epoch)
    clock.step(f"fence row of {target.name} = epoch {rec.shard.epoch}: writes accepted")
    old = rec.extra.get("failover_from")
    return _after_promotion(ops, rec, rev, str(old or "the old primary@?"), clock, False, [])


def degrade(ops: ShardOps, shard: str, *, progress: Progress = lambda _m: None) -> FailoverResult:
    """The synchronous standby is lost and the primary cannot commit: let it commit alone.

    The record says ``region_survival: false`` *before* the primary stops waiting: a failover
    relies on "the synchronous standby holds every acknowledged commit" only while the record
    says survival is on, so the record must never claim it while the primary may acknowledge a
    commit the standby has not flushed.
    """
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    if not rec.region_survival:
        raise FailoverRefused(f"{shard} already runs without region survival")
    _cas(ops, rec, rev, replace(rec, region_survival=False))
    clock.step(f"etcd: {shard} region survival off")
    ops.clear_sync_standby(rec.shard.primary)
    msg = (
        f"WARNING: {shard} now runs WITHOUT REGION SURVIVAL: its synchronous standby is lost; "
        "it is named synchronous again once it streams"
    )
    clock.step(msg)
    p = rec.shard.primary.name
    return FailoverResult(shard, p, p, rec.shard.epoch, False, tuple(clock.steps), False, (msg,))


def restore(ops: ShardOps, shard: str, *, progress: Progress = lambda _m: None) -> FailoverResult:
    """Name the shard's first standby synchronous again, then record region survival (in
    that order: the record claims survival only once it holds)."""
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    if rec.region_survival or not rec.shard.standbys:
        raise FailoverRefused(f"{shard}: nothing to restore")
    sb = rec.shard.standbys[0]
    ops.await_sync_standby(rec.shard.primary, sb)
    clock.step(f"{sb.name} is the synchronous standby again")
    _cas(ops, rec, rev, replace(rec, region_survival=True))
    clock.step(f"etcd: {shard} region survival on")
    p = rec.shard.primary.name
    return FailoverResult(shard, p, p, rec.shard.epoch, True, tuple(clock.steps))


def switchover(
    ops: ShardOps,
    shard: str,
    to_region: str,
    *,
    progress: Progress = lambda _m: None,
    lease_clock: LeaseClock | None = None,
) -> FailoverResult:
    """Planned move of ``shard``'s primary to its standby in ``to_region``, zero writes lost.

    Fence the old primary, wait until the target has *replayed* its final LSN, stop the old
    primary cleanly, CAS etcd, promote, name the old primary as the target's synchronous
    standby and rejoin it, and only then write the new epoch into the target: the first write
    the new primary accepts already waits for a standby in another region. The lease wait (see
    the module) sits before that write too: a router that still believes the old epoch would
    otherwise read the rejoined old primary, now a standby that may not have replayed it yet.
    """
    lease = lease_clock or LeaseClock()
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    old = rec.shard.primary
    target = _find_standby(rec, to_region)
    clock.step(f"{shard}: epoch {rec.shard.epoch}, primary {old.name}, target {target.name}")
    old_lsn = ops.fence_old(old)
    if old_lsn is None:
        raise FailoverError(
            f"{old.name} does not answer, so it cannot be fenced: use `txr failover`"
        )
    clock.step(f"fenced {old.name}: writes refused, final LSN {fmt_lsn(old_lsn)}")
    got = _wait_lsn(ops, target, old_lsn, replay=True, timeout_s=CATCHUP_TIMEOUT_S)
    if got is None or got.replay < old_lsn:
        raise FailoverError(
            f"{target.name} replayed only {fmt_lsn(got.replay if got else None)} of "
            f"{fmt_lsn(old_lsn)} within {CATCHUP_TIMEOUT_S}s; {old.name} stays fenced "
            "(writes refused): fix replication and retry, or fail over"
        )
    clock.step(f"{target.name} replayed {fmt_lsn(got.replay)}: caught up")
    ops.stop(old)
    clock.step(f"stopped {old.name} cleanly")

    new_epoch = rec.shard.epoch + 1
    others = tuple(n for n in rec.shard.standbys if n != target)
    claimed = ShardRecord(
        replace(rec.shard, primary=target, standbys=others, epoch=new_epoch),
        region_survival=False,
        extra=rec.extra,
    )
    rev = _cas(ops, rec, rev, claimed)
    cas_done = lease.now()
    clock.step(f"etcd: epoch {rec.shard.epoch} -> {new_epoch}, primary {target.name}")
    ops.promote(target)
    clock.step(f"promoted {target.name}")
    ops.rejoin(old, target)
    clock.step(f"{old.name} rewound and streaming from {target.name}")
    ops.await_sync_standby(target, old)
    clock.step(f"{old.name} is the synchronous standby of {target.name}")
    _wait_out_leases(lease, cas_done, clock)
    ops.set_epoch_in_db(target, new_epoch)
    clock.step(f"fence row of {target.name} = epoch {new_epoch}: writes accepted")
    standbys = (old, *others)
    ops.node_role_changed(shard, target, standbys)
    final = ShardRecord(
        replace(claimed.shard, standbys=standbys), region_survival=True, extra=rec.extra
    )
    _cas(ops, claimed, rev, final)
    clock.step("etcd: standbys and region survival recorded")
    return FailoverResult(shard, old.name, target.name, new_epoch, True, tuple(clock.steps))


def rejoin(
    ops: ShardOps, shard: str, node_region: str, *, progress: Progress = lambda _m: None
) -> FailoverResult:
    """Rewind the shard's former primary in ``node_region`` and make it a synchronous standby
    of the current primary; record it in etcd."""
    clock = StepClock(progress)
    rec, rev = ops.load(shard)
    primary = rec.shard.primary
    if primary.region == node_region:
        raise FailoverRefused(f"{shard}: the node in {node_region} is the current primary")
    if any(n.region == node_region for n in rec.shard.standbys):
        raise FailoverRefused(f"{shard}: the node in {node_region} is already a standby")
    node = ops.node_in(shard, node_region)
    clock.step(f"{shard}: rejoining {node.name} under {primary.name} (epoch {rec.shard.epoch})")
    # Belt and braces: if the old node came back as a primary it must refuse writes while we
    # rewind it (it cannot acknowledge any anyway; see the module doc).
    ops.fence_old(node)
    ops.rejoin(node, primary)
    clock.step(f"{node.name} rewound and streaming from {primary.name}")
    survival = rec.region_survival
    if not survival and node.region != primary.region:
        ops.await_sync_standby(primary, node)
        survival = True
        clock.step(f"{node.name} is the synchronous standby: region survival restored")
    standbys = (node, *rec.shard.standbys) if survival else (*rec.shard.standbys, node)
    ops.node_role_changed(shard, primary, standbys)
    new = ShardRecord(replace(rec.shard, standbys=standbys), survival, rec.extra)
    _cas(ops, rec, rev, new)
    clock.step("etcd: standby recorded")
    return FailoverResult(
        shard, node.name, primary.name, rec.shard.epoch, survival, tuple(clock.steps)
    )
