"""Nemeses: the faults a chaos scenario injects into a local cluster, and how each is healed.

Each fault acts on one target (a shard or a region) chosen from the run's seed, through real
handles only: signals to the real processes (infra/local/control.py), link cuts on the WAN
emulator (infra/wan.py), and the operator's rejoin procedure (what ``txr rejoin`` runs). Nothing
here fails a primary over: the regions' failover controllers (infra/controller.py) do, as they
would in production; a heal rejoins a former primary once they have. ``heal`` is idempotent, so
the runner can call it again when a run is cut short.

A scenario is a schedule of faults inside the run: one fault from 25% to 60% of the duration,
or, for ``mixed``, several faults drawn from the seed one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from chaos.history import History, TransferOp
from consistency import failover_plan
from consistency.limits import FAILOVER_DETECTION_S
from infra import controller, failover
from infra.local import cluster, control
from infra.wan import WanControl

# A heal waits at most this long for the controllers to have failed a lost primary over before
# it starts the old node again as it was (the run then reports zero automatic failovers).
AUTO_FAILOVER_WAIT_S: Final = 30.0
AUTO_FAILOVER_POLL_S: Final = 0.2
# flaky-primary: pauses just under the detection time, with the server running in between;
# at most this many (the fault window bounds them too).
FLAKY_PAUSE_S: Final = 0.75 * FAILOVER_DETECTION_S
FLAKY_RUN_S: Final = 1.0
FLAKY_PAUSES_MAX: Final = 20
# A single fault lasts from this share of the run to the next.
FAULT_START: Final = 0.25
FAULT_END: Final = 0.6
# ``mixed``: this many faults, in windows that share the run between them.
MIXED_FAULTS: Final = 3


@dataclass
class Ctx:
    cluster_dir: Path
    regions: list[str]
    shards: list[str]
    wan: WanControl
    progress: Callable[[str], None]


class Fault(Protocol):
    name: str
    target: str

    async def inject(self, ctx: Ctx) -> None: ...

    async def heal(self, ctx: Ctx) -> None: ...

    def affects(self, op: TransferOp, history: History) -> bool:
        """Whether this transfer needs what the fault took away (for the recovery figure)."""
        ...

    def repaired_at(self) -> float | None:
        """Monotonic time at which service should be back (heal, or the failover's end)."""
        ...


def _shard_of(history: History, account: str) -> str | None:
    acc = history.accounts.get(account)
    return acc.shard if acc else None


def _touches_shard(op: TransferOp, history: History, shard: str) -> bool:
    return shard in (_shard_of(history, op.source), _shard_of(history, op.destination))


def _shards_now(ctx: Ctx) -> dict[str, dict[str, Any]]:
    """Each shard's primary, its region and its standbys' regions, from etcd alone: a fault
    must strike right after it is scheduled (``txr status`` would first spend seconds asking
    every server and router), so that its window and figures mean what they say."""
    ops = failover.LocalShardOps(ctx.cluster_dir)
    out: dict[str, dict[str, Any]] = {}
    for name in ctx.shards:
        sh = ops.load(name)[0].shard
        out[name] = {
            "primary": sh.primary.name,
            "primary_region": sh.primary.region,
            "standbys": [{"region": n.region} for n in sh.standbys],
        }
    return out


async def _region_hits(ctx: Ctx, region: str) -> tuple[list[str], list[str]]:
    """(the shards with a node in ``region``, the shards whose primary is there), from etcd
    right now (``_shards_now``): what a fault of the whole region strikes."""
    hit: list[str] = []
    primaries: list[str] = []
    for name, sh in (await asyncio.to_thread(_shards_now, ctx)).items():
        regions = {sh.get("primary_region")} | {b["region"] for b in sh.get("standbys", [])}
        if region in regions:
            hit.append(name)
        if sh.get("primary_region") == region:
            primaries.append(name)
    return hit, primaries


def _primary_region(ctx: Ctx, shard: str) -> str:
    rec, _rev = failover.LocalShardOps(ctx.cluster_dir).load(shard)
    return rec.shard.primary.region


def _rejoin_when_moved(
    ctx: Ctx, shard: str, old_region: str, wait_s: float = AUTO_FAILOVER_WAIT_S
) -> None:
    """Once the controllers moved ``shard``'s primary out of ``old_region``, rewind the old
    node into a standby (under the shard lock, as `txr rejoin`); if they never do within
    ``wait_s``, start the old node again as it was if it is down (it still holds the epoch)."""
    deadline = time.monotonic() + wait_s
    while _primary_region(ctx, shard) == old_region:
        if time.monotonic() > deadline:
            ops = failover.LocalShardOps(ctx.cluster_dir)
            node = ops.node_in(shard, old_region).name
            if not control.pg_alive(ctx.cluster_dir, node):
                control.restart_pg(ctx.cluster_dir, node)
            ctx.progress(f"{shard} was not failed over within {wait_s:g}s")
            return
        time.sleep(AUTO_FAILOVER_POLL_S)
    with controller.shard_lock(ctx.cluster_dir, shard, "chaos heal"):
        ops = failover.LocalShardOps(ctx.cluster_dir)
        failover_plan.rejoin(ops, shard, old_region, progress=ctx.progress)
    ctx.progress(f"rejoined {shard}@{old_region} as a standby")


@dataclass
class _Base:
    target: str
    _repaired: float | None = field(default=None, init=False)
    # Monotonic time the fault struck (the kill, the cut), for the fault -> first ack figure.
    fault_at: float | None = field(default=None, init=False)

    def repaired_at(self) -> float | None:
        return self._repaired

    def _mark_repaired(self) -> None:
        self._repaired = time.monotonic()


@dataclass
class KillPrimary(_Base):
    """kill -9 a shard's primary; the failover controllers promote its synchronous standby; at
    heal the old primary is rewound and rejoins as a standby."""

    name: str = "kill-primary"
    failovers_expected: tuple[int, int | None] = (1, None)
    shards_hit: list[str] = field(default_factory=list, init=False)
    _old_region: str | None = field(default=None, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = {"shards": await asyncio.to_thread(_shards_now, ctx)}
        shard = st["shards"][self.target]
        self._old_region = str(shard["primary_region"])
        self.shards_hit = [self.target]
        pids = await asyncio.to_thread(
            control.pg_signal, ctx.cluster_dir, str(shard["primary"]), signal.SIGKILL
        )
        self.fault_at = time.monotonic()
        ctx.progress(f"kill -9 {shard['primary']} ({len(pids)} processes); no operator")

    async def heal(self, ctx: Ctx) -> None:
        if self._old_region is None:
            return
        region, self._old_region = self._old_region, None
        await asyncio.to_thread(_rejoin_when_moved, ctx, self.target, region)
        self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class KillRegion(_Base):
    """kill -9 every process of a region at once (etcd, Redis, routers, relays, controller,
    PostgreSQL); the other regions' controllers fail its primaries over and let the shard whose
    standby died commit without it. At heal everything is started again and the old primaries
    rejoin as standbys."""

    name: str = "kill-region"
    failovers_expected: tuple[int, int | None] = (1, None)
    shards_hit: list[str] = field(default_factory=list, init=False)
    _killed: list[str] = field(default_factory=list, init=False)
    _nodes: list[str] = field(default_factory=list, init=False)
    _primaries: list[str] = field(default_factory=list, init=False)

    async def inject(self, ctx: Ctx) -> None:
        hit, primaries = await _region_hits(ctx, self.target)
        self.shards_hit += hit
        self._primaries += primaries
        self._killed, self._nodes = await asyncio.to_thread(
            control.kill_region, ctx.cluster_dir, self.target
        )
        self.fault_at = time.monotonic()
        ctx.progress(
            f"kill -9 region {self.target}: {', '.join(self._killed + self._nodes)}; no operator"
        )

    async def heal(self, ctx: Ctx) -> None:
        if not self._killed and not self._nodes:
            return
        # etcd first (quorum for everything else), then the caches and the servers.
        order = {"etcd": 0, "redis": 1, "relays": 3, "router": 4, "controller": 5}
        killed = sorted(self._killed, key=lambda n: order.get(n.split("-", 1)[0], 9))
        early = [n for n in killed if order.get(n.split("-", 1)[0], 9) < 2]
        late = [n for n in killed if n not in early]
        for name in early:
            await asyncio.to_thread(control.restart, ctx.cluster_dir, name)
        ops = failover.LocalShardOps(ctx.cluster_dir)
        primaries = {ops.node_in(sh, self.target).name: sh for sh in self._primaries}
        for node in self._nodes:
            if node not in primaries:
                await asyncio.to_thread(control.restart_pg, ctx.cluster_dir, node)
        for sh in self._primaries:
            await asyncio.to_thread(_rejoin_when_moved, ctx, sh, self.target)
        for name in late:
            await asyncio.to_thread(control.restart, ctx.cluster_dir, name)
        ctx.progress(f"region {self.target} restarted: {', '.join(killed + self._nodes)}")
        self._killed, self._nodes, self._primaries = [], [], []
        self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        return any(_touches_shard(op, history, sh) for sh in self.shards_hit)


@dataclass
class FlakyPrimary(_Base):
    """SIGSTOP a shard's primary for just under the detection time, let it run a second, and
    again, for the whole fault window: no pause is a failure, so no failover may happen."""

    name: str = "flaky-primary"
    failovers_expected: tuple[int, int | None] = (0, 0)
    shards_hit: list[str] = field(default_factory=list, init=False)
    # Measured lengths of the pauses (a loaded machine may stretch them: the report shows it).
    pauses_s: list[float] = field(default_factory=list, init=False)
    _node: str | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = {"shards": await asyncio.to_thread(_shards_now, ctx)}
        self._node = str(st["shards"][self.target]["primary"])
        self.shards_hit = [self.target]
        self._stop.clear()
        # A thread of its own, not the event loop: the workload keeps the loop busy (on a loaded
        # machine for seconds), and a late SIGCONT would stretch a pause past the detection time.
        self._thread = threading.Thread(
            target=self._flap, args=(ctx.cluster_dir, self._node), name="flaky-primary"
        )
        self._thread.start()
        self.fault_at = time.monotonic()
        ctx.progress(f"flapping {self._node}: SIGSTOP {FLAKY_PAUSE_S:g}s / run {FLAKY_RUN_S:g}s")

    def _flap(self, cluster_dir: Path, node: str) -> None:
        for _ in range(FLAKY_PAUSES_MAX):
            pids = control.pg_tree(cluster_dir, node)
            control.send(pids, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                self._stop.wait(FLAKY_PAUSE_S)
            finally:
                control.send(pids, signal.SIGCONT)
                self.pauses_s.append(round(time.monotonic() - t0, 3))
            if self._stop.wait(FLAKY_RUN_S):
                return

    async def heal(self, ctx: Ctx) -> None:
        if self._thread is None or self._node is None:
            return
        th, self._thread = self._thread, None
        self._stop.set()
        await asyncio.to_thread(th.join)
        # Whatever the stop interrupted, the server runs again.
        control.pg_signal(ctx.cluster_dir, self._node, signal.SIGCONT)
        self._mark_repaired()
        ctx.progress(
            f"{self._node}: {len(self.pauses_s)} pauses, longest "
            f"{max(self.pauses_s, default=0.0):.3f}s (detection {FAILOVER_DETECTION_S:g}s)"
        )

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class PausePrimary(_Base):
    """SIGSTOP a shard's primary (every process of the server), SIGCONT at heal."""

    name: str = "pause-primary"
    shards_hit: list[str] = field(default_factory=list, init=False)
    _node: str | None = field(default=None, init=False)
    _region: str | None = field(default=None, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = {"shards": await asyncio.to_thread(_shards_now, ctx)}
        self._node = str(st["shards"][self.target]["primary"])
        self._region = str(st["shards"][self.target]["primary_region"])
        self.shards_hit = [self.target]
        pids = await asyncio.to_thread(
            control.pg_signal, ctx.cluster_dir, self._node, signal.SIGSTOP
        )
        self.fault_at = time.monotonic()
        ctx.progress(f"SIGSTOP {self._node} ({len(pids)} processes)")

    async def heal(self, ctx: Ctx) -> None:
        if self._node is None:
            return
        node, self._node = self._node, None
        await asyncio.to_thread(control.pg_signal, ctx.cluster_dir, node, signal.SIGCONT)
        ctx.progress(f"SIGCONT {node}")
        # A pause longer than the detection time is a lost primary: the controllers moved it,
        # and the woken node (fenced out by the epoch, unable to commit) is rewound.
        if self._region is not None and _primary_region(ctx, self.target) != self._region:
            await asyncio.to_thread(_rejoin_when_moved, ctx, self.target, self._region)
        self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class Partition(_Base):
    """Cut every WAN link of a region (clients on loopback still reach its router)."""

    name: str = "partition"
    shards_hit: list[str] = field(default_factory=list, init=False)
    _cut: list[str] = field(default_factory=list, init=False)
    _primaries: list[str] = field(default_factory=list, init=False)

    async def inject(self, ctx: Ctx) -> None:
        hit, primaries = await _region_hits(ctx, self.target)
        self.shards_hit += hit
        self._primaries += primaries
        for other in ctx.regions:
            if other != self.target:
                await ctx.wan.cut(self.target, other)
                self._cut.append(other)
        self.fault_at = time.monotonic()
        ctx.progress(f"partitioned {self.target} from {', '.join(self._cut)}")

    async def heal(self, ctx: Ctx) -> None:
        if not self._cut:
            return
        while self._cut:
            await ctx.wan.heal(self.target, self._cut.pop())
        ctx.progress(f"healed the links of {self.target}")
        # The majority failed the cut-off primary over (it could acknowledge nothing while
        # cut off: its synchronous standby was on the other side); rewind it into a standby.
        while self._primaries:
            await asyncio.to_thread(
                _rejoin_when_moved, ctx, self._primaries.pop(), self.target, 0.0
            )
        self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, cluster.shard_name(self.target))


@dataclass
class KillProcess(_Base):
    """kill -9 a region's processes of one kind (router, redis, etcd, relays); restart at heal."""

    kind: str = "router"
    name: str = "kill-router"
    _killed: list[str] = field(default_factory=list, init=False)

    async def inject(self, ctx: Ctx) -> None:
        self._killed = await asyncio.to_thread(
            control.kill, ctx.cluster_dir, self.kind, self.target
        )
        ctx.progress(f"kill -9 {', '.join(self._killed)}")

    async def heal(self, ctx: Ctx) -> None:
        while self._killed:
            name = self._killed.pop()
            pid = await asyncio.to_thread(control.restart, ctx.cluster_dir, name)
            ctx.progress(f"restarted {name} (pid {pid})")
        if self._repaired is None:
            self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        if self.kind == "router":
            return bool(op.via) and op.via[0] == self.target
        # Redis, etcd and the relays are not on the write path of a healthy shard: any write
        # through the region tells whether the region serves again.
        return bool(op.via) and self.target in op.via


@dataclass
class KillDecoder(_Base):
    """kill -9 the relay process that runs a shard's change-feed decoder (the one of its
    current primary's region), while the workload's batches are in flight; restart at heal.
    The new decoder re-delivers from the slot's position: nothing may be skipped."""

    name: str = "kill-decoder"
    _killed: list[str] = field(default_factory=list, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = await asyncio.to_thread(failover.cluster_status, ctx.cluster_dir)
        region = str(st["shards"][self.target]["primary_region"])
        self._killed = await asyncio.to_thread(control.kill, ctx.cluster_dir, "relays", region)
        ctx.progress(f"kill -9 the decoder of {self.target}: {', '.join(self._killed)}")

    async def heal(self, ctx: Ctx) -> None:
        while self._killed:
            name = self._killed.pop()
            pid = await asyncio.to_thread(control.restart, ctx.cluster_dir, name)
            ctx.progress(f"restarted {name} (pid {pid})")
            self._mark_repaired()

    def affects(self, op: TransferOp, history: History) -> bool:
        # The decoder is not on the write path: reads of the shard's accounts fall back to the
        # primary while the heartbeat ages, so only the shard's transfers say it serves.
        return _touches_shard(op, history, self.target)


@dataclass
class PartitionFeed(_Base):
    """Cut the WAN link between a shard's decoder (its primary's region) and a region that
    holds no standby of the shard: that region's Redis stops receiving the shard's batches (and
    its routers lose the primary) while the synchronous standby keeps acknowledging commits.
    At heal the region catches up from its position, or is invalidated and says so."""

    name: str = "partition-feed"
    _cut: tuple[str, str] | None = field(default=None, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = await asyncio.to_thread(failover.cluster_status, ctx.cluster_dir)
        shard = st["shards"][self.target]
        decoder = str(shard["primary_region"])
        standbys = {str(sb["region"]) for sb in shard["standbys"]}
        others = [r for r in ctx.regions if r != decoder and r not in standbys]
        if not others:
            others = [r for r in ctx.regions if r != decoder]
        far = others[0]
        await ctx.wan.cut(decoder, far)
        self._cut = (decoder, far)
        ctx.progress(f"cut the feed of {self.target}: {decoder} <-> {far}")

    async def heal(self, ctx: Ctx) -> None:
        if self._cut is None:
            return
        a, b = self._cut
        self._cut = None
        await ctx.wan.heal(a, b)
        self._mark_repaired()
        ctx.progress(f"healed {a} <-> {b}")

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class KillPublisher(KillDecoder):
    """kill -9 the process that publishes a shard's events: the relay process of its primary's
    region, where the decoder's event sink runs (router.events.publisher), while events are in
    flight; restart at heal. The new publisher resumes from the slot's position: no event may
    be skipped, and what it publishes again the stream de-duplicates. (The same process as
    kill-decoder's: this one is judged by the events checks, in a run of its own.)"""

    name: str = "kill-publisher"


def _kill(kind: str) -> Callable[[str], Fault]:
    return lambda region: KillProcess(region, kind=kind, name=f"kill-{kind}")


# name -> (what the target is, how to build the fault on it)
FAULTS: Final[dict[str, tuple[str, Callable[[str], Fault]]]] = {
    "kill-primary": ("shard", lambda shard: KillPrimary(shard)),
    "pause-primary": ("shard", lambda shard: PausePrimary(shard)),
    "partition": ("region", lambda region: Partition(region)),
    "kill-router": ("region", _kill("router")),
    "kill-redis": ("region", _kill("redis")),
    "kill-etcd": ("region", _kill("etcd")),
    "kill-relays": ("region", _kill("relays")),
    "kill-region": ("region", lambda region: KillRegion(region)),
    "flaky-primary": ("shard", lambda shard: FlakyPrimary(shard)),
    "kill-decoder": ("shard", lambda shard: KillDecoder(shard)),
    "partition-feed": ("shard", lambda shard: PartitionFeed(shard)),
    # One region's NATS server (kill -9, restarted at heal): the stream keeps a quorum of two;
    # that region's publisher and routers lose their server until it is back.
    "kill-nats": ("region", _kill("nats")),
    "kill-publisher": ("shard", lambda shard: KillPublisher(shard)),
}
SCENARIOS: Final = (*FAULTS, "mixed")


@dataclass
class Step:
    fault: Fault
    start_s: float
    end_s: float


def schedule(scenario: str, duration_s: float, ctx: Ctx, rng: random.Random) -> list[Step]:
    """The faults of ``scenario`` with their start and heal offsets from the workload's start."""

    def build(kind: str) -> Fault:
        target_kind, make = FAULTS[kind]
        return make(rng.choice(ctx.shards if target_kind == "shard" else ctx.regions))

    if scenario in FAULTS:
        return [Step(build(scenario), FAULT_START * duration_s, FAULT_END * duration_s)]
    if scenario != "mixed":
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    # A primary is killed at most once: its shard runs without a standby until the rejoin.
    kinds = rng.sample(list(FAULTS), MIXED_FAULTS)
    window = 0.8 * duration_s / MIXED_FAULTS
    steps = []
    for i, kind in enumerate(kinds):
        start = 0.1 * duration_s + i * window
        steps.append(Step(build(kind), start, start + 0.6 * window))
    return steps


async def run_schedule(
    steps: list[Step], ctx: Ctx, t0: float, stop: asyncio.Event
) -> list[dict[str, Any]]:
    """Inject and heal each step on time; returns what happened when (seconds from ``t0``)."""
    events: list[dict[str, Any]] = []
    for step in steps:
        await _sleep_until(t0 + step.start_s, stop)
        f = step.fault
        at = time.monotonic() - t0
        try:
            await f.inject(ctx)
        finally:
            events.append({"fault": f.name, "target": f.target, "injected_s": round(at, 3)})
            await _sleep_until(t0 + step.end_s, stop)
            healed = time.monotonic() - t0
            await f.heal(ctx)
            events[-1]["healed_s"] = round(healed, 3)
            events[-1]["heal_took_s"] = round(time.monotonic() - t0 - healed, 3)
    return events


async def _sleep_until(when: float, stop: asyncio.Event) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
