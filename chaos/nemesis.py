"""Nemeses: the faults a chaos scenario injects into a local cluster, and how each is healed.

Each fault acts on one target (a shard or a region) chosen from the run's seed, through real
handles only: signals to the real processes (infra/local/control.py), link cuts on the WAN
emulator (infra/wan.py), and the operator's own failover and rejoin procedures (what
``txr failover`` and ``txr rejoin`` run). ``heal`` is idempotent, so the runner can call it again
when a run is cut short.

A scenario is a schedule of faults inside the run: one fault from 25% to 60% of the duration,
or, for ``mixed``, several faults drawn from the seed one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from chaos.history import History, TransferOp
from consistency import failover as procedures
from infra import failover as real_ops
from infra.local import cluster, control
from infra.wan import WanControl

# The operator's reaction time between a primary's death and the failover command.
OPERATOR_REACTION_S: Final = 1.0
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


@dataclass
class _Base:
    target: str
    _repaired: float | None = field(default=None, init=False)

    def repaired_at(self) -> float | None:
        return self._repaired

    def _mark_repaired(self) -> None:
        self._repaired = time.monotonic()


@dataclass
class KillPrimary(_Base):
    """kill -9 a shard's primary; the operator fails over to the synchronous standby; at heal
    the old primary is rewound and rejoins as a standby."""

    name: str = "kill-primary"
    _old_region: str | None = field(default=None, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = await asyncio.to_thread(real_ops.cluster_status, ctx.cluster_dir)
        shard = st["shards"][self.target]
        self._old_region = str(shard["primary_region"])
        to = str(shard["standbys"][0]["region"])
        pids = await asyncio.to_thread(
            control.pg_signal, ctx.cluster_dir, str(shard["primary"]), signal.SIGKILL
        )
        ctx.progress(f"kill -9 {shard['primary']} ({len(pids)} processes)")
        await asyncio.sleep(OPERATOR_REACTION_S)
        ops = real_ops.LocalShardOps(ctx.cluster_dir)
        outcome = await asyncio.to_thread(
            procedures.failover, ops, self.target, to, progress=ctx.progress
        )
        self._mark_repaired()
        ctx.progress(f"failover of {self.target} to {to}: epoch {outcome.epoch}")

    async def heal(self, ctx: Ctx) -> None:
        if self._old_region is None:
            return
        region, self._old_region = self._old_region, None
        ops = real_ops.LocalShardOps(ctx.cluster_dir)
        await asyncio.to_thread(procedures.rejoin, ops, self.target, region, progress=ctx.progress)
        ctx.progress(f"rejoined {self.target}@{region} as a standby")

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class PausePrimary(_Base):
    """SIGSTOP a shard's primary (every process of the server), SIGCONT at heal."""

    name: str = "pause-primary"
    _node: str | None = field(default=None, init=False)

    async def inject(self, ctx: Ctx) -> None:
        st = await asyncio.to_thread(real_ops.cluster_status, ctx.cluster_dir)
        self._node = str(st["shards"][self.target]["primary"])
        pids = await asyncio.to_thread(
            control.pg_signal, ctx.cluster_dir, self._node, signal.SIGSTOP
        )
        ctx.progress(f"SIGSTOP {self._node} ({len(pids)} processes)")

    async def heal(self, ctx: Ctx) -> None:
        if self._node is None:
            return
        node, self._node = self._node, None
        await asyncio.to_thread(control.pg_signal, ctx.cluster_dir, node, signal.SIGCONT)
        self._mark_repaired()
        ctx.progress(f"SIGCONT {node}")

    def affects(self, op: TransferOp, history: History) -> bool:
        return _touches_shard(op, history, self.target)


@dataclass
class Partition(_Base):
    """Cut every WAN link of a region (clients on loopback still reach its router)."""

    name: str = "partition"
    _cut: list[str] = field(default_factory=list, init=False)

    async def inject(self, ctx: Ctx) -> None:
        for other in ctx.regions:
            if other != self.target:
                await ctx.wan.cut(self.target, other)
                self._cut.append(other)
        ctx.progress(f"partitioned {self.target} from {', '.join(self._cut)}")

    async def heal(self, ctx: Ctx) -> None:
        if not self._cut:
            return
        while self._cut:
            await ctx.wan.heal(self.target, self._cut.pop())
        self._mark_repaired()
        ctx.progress(f"healed the links of {self.target}")

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
        st = await asyncio.to_thread(real_ops.cluster_status, ctx.cluster_dir)
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
        st = await asyncio.to_thread(real_ops.cluster_status, ctx.cluster_dir)
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
    "kill-decoder": ("shard", lambda shard: KillDecoder(shard)),
    "partition-feed": ("shard", lambda shard: PartitionFeed(shard)),
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
