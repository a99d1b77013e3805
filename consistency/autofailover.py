"""Automatic failover: when a region's controllers may promote a shard's standby, and how.

One controller runs in every region (``infra.controller`` wires it). Each round it queries every
shard's primary and synchronous standby, publishes what it saw (its *verdict*) in etcd under a
lease, reads every region's verdicts, and decides per shard with :func:`decide`. Everything that
touches the world is behind :class:`ControllerIO`, so the rules below are tested with a fake
clock and a recording fake (tests/unit/test_autofailover.py) that keeps the same contract as
the real I/O (tests/contracts/test_controller_io.py).

Why these rules keep G1 (no acknowledged write lost) and "never two primaries accepting writes":

- **Majority.** A shard is failed over only when more than half of *all* regions' controllers
  (not of those that answer) each saw its primary fail every query for ``detection_s``. A region
  cut off from the others cannot publish at all (its etcd member has no quorum), and one region
  alone is never a majority, so a partition of one region can trigger a failover of the primary
  *inside* it (which the two others lost) but never of a primary the majority still reaches.
- **Freshness.** Verdicts live under a lease (a dead controller's vanish within its TTL) and
  count only while their publication counter keeps moving (``verdict_stale_s``), so a stuck
  controller's old "down" cannot add to a majority.
- **A pause is no failure.** "Unreachable for" restarts at every successful query; a pause
  shorter than ``detection_s`` (GC, SIGSTOP, a slow checkpoint) never reaches it.
- **One actor.** The action runs under an etcd lock per shard (the same lock operator commands
  take), and re-reads the shard after taking it: if the epoch or primary changed meanwhile (an
  operator, or another controller, already acted), it does nothing (:func:`still_valid`).
- **The same proofs as an operator.** The action is ``consistency.failover_plan.failover`` itself:
  fence the old primary if it answers, else rely on synchronous replication (the target must be
  the synchronous standby of a shard whose record says region survival was on), epoch CAS,
  promote. Without that proof it refuses, and the decision says so loudly (``refused``).
- **No flapping.** At most one automatic failover per shard within ``anti_flap_s`` (the time of
  the last one is in etcd, so every controller sees it).
- **A lost synchronous standby** (a majority cannot reach it for ``detection_s`` while the
  primary answers) leaves the primary unable to commit at all; the controller then clears the
  synchronous standby and records ``region_survival: false`` (the state a failover leaves too),
  so the shard takes writes again, loudly without region survival, and names the standby
  synchronous again once a majority reaches it (``restore``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from consistency.limits import (
    FAILOVER_ANTI_FLAP_S,
    FAILOVER_DETECTION_S,
    PROBE_IDLE_INTERVAL_S,
    PROBE_INTERVAL_S,
    VERDICT_HEARTBEAT_S,
    VERDICT_STALE_S,
)

# etcd keys of the controllers. Outside the topology prefix ("/txr/") on purpose: routers and the
# change feed watch that prefix, and verdicts change every round.
CONTROL_PREFIX = "/txrctl/autofailover/"
VERDICT_PREFIX = CONTROL_PREFIX + "verdicts/"
MODE_KEY = CONTROL_PREFIX + "mode"
# decision/<shard>/<region>: each controller's latest decision (written when it changes).
DECISION_PREFIX = CONTROL_PREFIX + "decision/"
LAST_FAILOVER_PREFIX = CONTROL_PREFIX + "last-failover/"
# The per-shard lock: controllers and `txr failover/switchover/region ...` take the same one.
LOCK_PREFIX = "/txrctl/locks/shard/"


def lock_key(shard: str) -> str:
    return LOCK_PREFIX + shard


@dataclass(frozen=True, slots=True)
class Config:
    detection_s: float = FAILOVER_DETECTION_S
    anti_flap_s: float = FAILOVER_ANTI_FLAP_S
    verdict_stale_s: float = VERDICT_STALE_S
    verdict_heartbeat_s: float = VERDICT_HEARTBEAT_S
    probe_interval_s: float = PROBE_INTERVAL_S
    probe_idle_interval_s: float = PROBE_IDLE_INTERVAL_S


class Action(StrEnum):
    NONE = "none"
    FAILOVER = "failover"
    # The shard record already names the new primary (a controller died after the epoch CAS),
    # but that node is still in recovery: promote it and write its epoch.
    FINISH = "finish"
    DEGRADE = "degrade"
    RESTORE = "restore"


class Reason(StrEnum):
    HEALTHY = "healthy"
    SUSPECTED = "suspected"
    DISABLED = "disabled"
    ANTI_FLAP = "anti_flap"
    REFUSED = "refused"
    PRIMARY_LOST = "primary_lost"
    PROMOTION_UNFINISHED = "promotion_unfinished"
    STANDBY_LOST = "standby_lost"
    STANDBY_BACK = "standby_back"
    # After the lock: what the decision was based on changed (someone else acted).
    CHANGED = "changed"
    DONE = "done"
    FAILED = "failed"


# -- what a controller measures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """One query of one server: did it answer, and as what."""

    ok: bool
    in_recovery: bool = False
    detail: str = ""


class DownTracker:
    """How long each server has failed every query in a row (monotonic seconds).

    Keyed by the node *and* the shard epoch, so a node that becomes primary at a new epoch
    starts from zero. Down time counts from the start of the first failed query, and a primary
    found in recovery counts as down (it takes no writes).
    """

    def __init__(self) -> None:
        self._since: dict[tuple[str, str, int], float] = {}

    def observe(
        self,
        key: tuple[str, str, int],
        probe: Probe,
        started_at: float,
        now: float,
        *,
        want_primary: bool,
    ) -> float | None:
        """Record a probe begun at ``started_at``; the down time now, None when it serves."""
        serving = probe.ok and (probe.in_recovery != want_primary)
        if serving:
            self._since.pop(key, None)
            return None
        since = self._since.setdefault(key, started_at)
        return max(0.0, now - since)

    def __bool__(self) -> bool:
        """Whether some server is failing its queries right now."""
        return bool(self._since)

    def forget_except(self, keys: set[tuple[str, str, int]]) -> None:
        for k in list(self._since):
            if k not in keys:
                del self._since[k]


@dataclass(frozen=True, slots=True)
class ShardVerdict:
    primary: str
    epoch: int
    primary_down_s: float | None  # None: the primary answered the last query as a primary
    primary_in_recovery: bool
    standby: str | None
    standby_down_s: float | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "epoch": self.epoch,
            "primary_down_s": self.primary_down_s,
            "primary_in_recovery": self.primary_in_recovery,
            "standby": self.standby,
            "standby_down_s": self.standby_down_s,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardVerdict:
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(
            str(d["primary"]),
            int(d["epoch"]),
            opt(d.get("primary_down_s")),
            bool(d.get("primary_in_recovery", False)),
            None if d.get("standby") is None else str(d["standby"]),
            opt(d.get("standby_down_s")),
            str(d.get("detail", "")),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Everything one region's controller saw in one round; ``seq`` grows every round."""

    region: str
    seq: int
    shards: Mapping[str, ShardVerdict]

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "seq": self.seq,
            "shards": {k: v.to_json() for k, v in self.shards.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Verdict:
        return cls(
            str(d["region"]),
            int(d["seq"]),
            {k: ShardVerdict.from_json(v) for k, v in (d.get("shards") or {}).items()},
        )


class Freshness:
    """Which regions' verdicts still move: a verdict whose ``seq`` has not changed for
    ``stale_s`` (local monotonic time, so no clocks are compared) is ignored."""

    def __init__(self, stale_s: float) -> None:
        self._stale_s = stale_s
        self._seen: dict[str, tuple[int, float]] = {}

    def fresh(self, verdicts: Sequence[Verdict], now: float) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        present = {v.region for v in verdicts}
        for r in list(self._seen):
            if r not in present:
                del self._seen[r]
        for v in verdicts:
            seq, at = self._seen.get(v.region, (-1, now))
            if v.seq != seq:
                self._seen[v.region] = (v.seq, now)
                at = now
            if now - at <= self._stale_s:
                out[v.region] = v
        return out


# -- what the decision reads ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardView:
    """The shard as its etcd record says."""

    name: str
    primary: str
    primary_region: str
    epoch: int
    region_survival: bool
    # The first standby: the synchronous one when ``region_survival`` holds.
    standby: str | None
    standby_region: str | None


@dataclass(frozen=True, slots=True)
class Mode:
    """``txr autofailover on|off [--shard S]``: on unless switched off (globally or per shard);
    a per-shard setting wins over the global one."""

    enabled: bool = True
    shards: Mapping[str, bool] = field(default_factory=dict)

    def on(self, shard: str) -> bool:
        return self.shards.get(shard, self.enabled)

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "shards": dict(self.shards)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Mode:
        if not d:
            return cls()
        return cls(
            bool(d.get("enabled", True)), {k: bool(v) for k, v in d.get("shards", {}).items()}
        )


@dataclass(frozen=True, slots=True)
class Decision:
    shard: str
    action: Action
    reason: Reason
    detail: str
    epoch: int
    target_region: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "action": self.action.value,
            "reason": self.reason.value,
            "detail": self.detail,
            "epoch": self.epoch,
            "target_region": self.target_region,
        }


def majority(regions_total: int) -> int:
    return regions_total // 2 + 1


def decide(
    view: ShardView,
    verdicts: Mapping[str, Verdict],
    *,
    regions_total: int,
    mode_on: bool,
    last_failover_at: float | None,
    now_wall: float,
    cfg: Config,
) -> Decision:
    """What to do about ``view`` given the fresh verdicts of every region (pure).

    ``last_failover_at`` is the wall-clock time of the shard's last automatic failover (etcd);
    the window is a minute, so clocks a few milliseconds apart do not matter.
    """
    need = majority(regions_total)
    about = [
        v.shards[view.name]
        for v in verdicts.values()
        if view.name in v.shards
        and v.shards[view.name].primary == view.primary
        and v.shards[view.name].epoch == view.epoch
    ]
    lost = [
        s for s in about if s.primary_down_s is not None and s.primary_down_s >= cfg.detection_s
    ]
    suspects = [s for s in about if s.primary_down_s is not None]

    def d(action: Action, reason: Reason, detail: str, target: str | None = None) -> Decision:
        return Decision(view.name, action, reason, detail, view.epoch, target)

    seen = f"{len(lost)}/{regions_total} regions saw {view.primary} down for {cfg.detection_s:g}s"
    if len(lost) >= need:
        if sum(s.primary_in_recovery for s in lost) >= need:
            # The record names a node still in recovery: an earlier action stopped after its
            # epoch CAS. Finishing it is what that action had already proven safe.
            return d(Action.FINISH, Reason.PROMOTION_UNFINISHED, f"{seen} (it is in recovery)")
        if not mode_on:
            return d(Action.NONE, Reason.DISABLED, f"{seen}; automatic failover is off")
        if last_failover_at is not None and now_wall - last_failover_at < cfg.anti_flap_s:
            ago = now_wall - last_failover_at
            return d(
                Action.NONE,
                Reason.ANTI_FLAP,
                f"{seen}; last automatic failover {ago:.0f}s ago (window {cfg.anti_flap_s:g}s)",
            )
        if not view.region_survival or view.standby is None or view.standby_region is None:
            return d(
                Action.NONE,
                Reason.REFUSED,
                f"{seen}; REFUSED: no synchronous standby holds every acknowledged commit "
                "(region survival is off): an operator must decide (txr failover "
                "--accept-data-loss)",
            )
        standby_lost = [
            s for s in about if s.standby == view.standby and s.standby_down_s is not None
        ]
        if len(standby_lost) >= need:
            return d(
                Action.NONE,
                Reason.REFUSED,
                f"{seen}; REFUSED: its synchronous standby {view.standby} does not answer a "
                "majority either (both may sit on the far side of a partition)",
            )
        return d(Action.FAILOVER, Reason.PRIMARY_LOST, seen, view.standby_region)
    if view.standby is not None:
        sb = [s for s in about if s.standby == view.standby]
        sb_lost = [
            s for s in sb if s.standby_down_s is not None and s.standby_down_s >= cfg.detection_s
        ]
        sb_ok = [s for s in sb if s.standby_down_s is None]
        primary_ok = [s for s in about if s.primary_down_s is None]
        if view.region_survival and len(sb_lost) >= need and len(primary_ok) >= need:
            if not mode_on:
                return d(
                    Action.NONE,
                    Reason.DISABLED,
                    "synchronous standby lost; automatic failover is off",
                )
            return d(
                Action.DEGRADE,
                Reason.STANDBY_LOST,
                f"{len(sb_lost)}/{regions_total} regions saw the synchronous standby "
                f"{view.standby} down for {cfg.detection_s:g}s: the primary cannot commit",
            )
        if (
            not view.region_survival
            and len(sb_ok) >= need
            and len(primary_ok) >= need
            and view.standby_region != view.primary_region
        ):
            return d(
                Action.RESTORE,
                Reason.STANDBY_BACK,
                f"{len(sb_ok)}/{regions_total} regions reach {view.standby} again",
            )
    if suspects:
        return d(
            Action.NONE,
            Reason.SUSPECTED,
            f"{len(suspects)}/{regions_total} regions cannot reach {view.primary} "
            f"(longest {max(s.primary_down_s or 0.0 for s in suspects):.2f}s; "
            f"a failover needs {need} for {cfg.detection_s:g}s)",
        )
    return d(Action.NONE, Reason.HEALTHY, f"{view.primary} serves (epoch {view.epoch})")


def still_valid(decided: ShardView, now: ShardView) -> bool:
    """After taking the lock: act only if the shard is still what the decision was about."""
    return (decided.primary, decided.epoch) == (now.primary, now.epoch)


# -- the I/O a controller needs ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acted:
    """What an action under the lock did."""

    reason: Reason
    detail: str
    failed_over: bool = False


class ControllerIO(Protocol):
    """The world of one region's controller; the real one is ``infra.controller``."""

    region: str

    async def shards(self) -> dict[str, ShardView]:
        """Every shard's record (etcd)."""
        ...

    async def probe(self, node: str, *, want_primary: bool) -> Probe:
        """One bounded query of ``node`` from this region."""
        ...

    async def publish(self, verdict: Verdict) -> None:
        """Put this region's verdict under its lease (renewing the lease)."""
        ...

    async def verdicts(self) -> list[Verdict]:
        """Every region's current verdict (those whose lease lives)."""
        ...

    async def mode(self) -> Mode: ...

    async def last_failover_at(self, shard: str) -> float | None: ...

    async def record_decision(self, decision: Decision) -> None:
        """For `txr status`: the latest decision that differs from this controller's last."""
        ...

    async def act(self, decision: Decision, decided: ShardView) -> Acted:
        """Under the shard's lock: re-read the shard, stop unless :func:`still_valid`, run the
        action, and record a failover's time for the anti-flap window."""
        ...


@dataclass
class Controller:
    """One region's controller: :meth:`round` is one probe-publish-decide-act cycle."""

    io: ControllerIO
    regions_total: int
    cfg: Config = field(default_factory=Config)
    seq: int = 0
    tracker: DownTracker = field(default_factory=DownTracker)
    _fresh: Freshness | None = None
    _last: dict[str, tuple[Action, Reason]] = field(default_factory=dict)
    # What this controller last published, and when (monotonic): an unchanged verdict is
    # republished only as a heartbeat, so an idle cluster writes etcd about once a second per
    # region instead of every round (each put is a raft commit and an fsync on every member).
    _published: dict[str, ShardVerdict] | None = None
    _published_at: float = 0.0
    # Whether the last round saw anything but health (see ``next_round_s``).
    alert: bool = False

    def __post_init__(self) -> None:
        self._fresh = Freshness(self.cfg.verdict_stale_s)

    async def round(self, now_wall: float, clock: _Clock) -> list[Decision]:
        """Probe every server at once, publish, decide and act; ``clock`` is monotonic."""
        shards = await self.io.shards()
        names = sorted(shards)
        # Every server at once: a hung one costs one probe timeout per round, not one each.
        started = clock()
        primaries = await asyncio.gather(
            *(self.io.probe(shards[n].primary, want_primary=True) for n in names)
        )
        standbys = await asyncio.gather(
            *(
                self.io.probe(sb, want_primary=False)
                for n in names
                if (sb := shards[n].standby) is not None
            )
        )
        ended = clock()
        sb_iter = iter(standbys)
        mine: dict[str, ShardVerdict] = {}
        keys: set[tuple[str, str, int]] = set()
        for name, p in zip(names, primaries, strict=True):
            view = shards[name]
            key = ("primary", view.primary, view.epoch)
            keys.add(key)
            down = self.tracker.observe(key, p, started, ended, want_primary=True)
            sb_down: float | None = None
            if view.standby is not None:
                sp = next(sb_iter)
                skey = ("standby", view.standby, view.epoch)
                keys.add(skey)
                sb_down = self.tracker.observe(skey, sp, started, ended, want_primary=False)
            mine[name] = ShardVerdict(
                view.primary,
                view.epoch,
                down,
                p.ok and p.in_recovery,
                view.standby,
                sb_down,
                p.detail,
            )
        self.tracker.forget_except(keys)
        # A verdict that changed (any "down for" grows every round, so a suspicion is published
        # at once) goes out now; an unchanged one every heartbeat, well within the readers'
        # staleness bound.
        # (Half a fast round of tolerance: an idle round comes a heartbeat after the previous
        # one began, so its own timing jitter must not postpone the heartbeat by a whole round.)
        since = ended - self._published_at
        if mine != self._published or since + self.cfg.probe_interval_s / 2 >= (
            self.cfg.verdict_heartbeat_s
        ):
            self.seq += 1
            await self.io.publish(Verdict(self.io.region, self.seq, mine))
            self._published, self._published_at = mine, ended
        assert self._fresh is not None
        fresh = self._fresh.fresh(await self.io.verdicts(), clock())
        mode = await self.io.mode()
        out: list[Decision] = []
        for name, view in sorted(shards.items()):
            dec = decide(
                view,
                fresh,
                regions_total=self.regions_total,
                mode_on=mode.on(name),
                last_failover_at=await self.io.last_failover_at(name),
                now_wall=now_wall,
                cfg=self.cfg,
            )
            if dec.action is not Action.NONE:
                acted = await self.io.act(dec, view)
                dec = Decision(
                    name, dec.action, acted.reason, acted.detail, dec.epoch, dec.target_region
                )
            if self._last.get(name) != (dec.action, dec.reason):
                self._last[name] = (dec.action, dec.reason)
                await self.io.record_decision(dec)
            out.append(dec)
        self.alert = (
            bool(self.tracker)
            or any(
                s.primary_down_s is not None or s.standby_down_s is not None
                for v in fresh.values()
                for s in v.shards.values()
            )
            or any(d.reason is not Reason.HEALTHY for d in out)
        )
        return out

    def next_round_s(self) -> float:
        """How long after this round's start the next one is due: the fast probe interval
        while anything is suspected anywhere, else the idle backstop. The caller also starts
        a round at once when a watched connection closes (``infra.controller``), so the idle
        interval delays only the detection of a hung server, never of a dead or cut one."""
        return self.cfg.probe_interval_s if self.alert else self.cfg.probe_idle_interval_s


class _Clock(Protocol):
    def __call__(self) -> float: ...
