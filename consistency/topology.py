"""The cluster's topology: regions, shards (primary, standbys, epoch) and the slot map.

It lives in etcd under ``/txr/`` and is read through etcd's v3 JSON gateway (``etcd.py``).
Routers hold a :class:`TopologyWatcher`: it loads the whole prefix, watches it, and keeps the
last map it saw when etcd is unreachable, because a router that stops routing when the control
plane blips would turn an etcd hiccup into an outage. Stores enforce epochs, so a stale map can
cost a retry but never a wrong write.

Reads are another matter: a deposed primary cut off with its router still answers reads, and
nothing in the store refuses them. So a router's view of each shard's epoch is a lease
(:class:`EpochConfirmations`): it is good for ``TOPOLOGY_CONFIRM_S`` from the send time of a
linearizable etcd read that showed it, and the failover procedure waits that long (plus drift)
between its epoch CAS and the new primary's first write (``consistency.failover_plan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from consistency.errors import EtcdError, TopologyError
from consistency.etcd import EtcdClient
from consistency.limits import (
    SLOT_COUNT,
    TOPOLOGY_CONFIRM_IDLE_S,
    TOPOLOGY_CONFIRM_INTERVAL_S,
    TOPOLOGY_CONFIRM_S,
    TOPOLOGY_CONFIRM_TIMEOUT_S,
    TOPOLOGY_WAKE_WAIT_S,
)

log = logging.getLogger(__name__)

PREFIX: Final = "/txr/"
SLOTMAP_KEY: Final = PREFIX + "slotmap"
SHARD_PREFIX: Final = PREFIX + "shards/"
REGION_PREFIX: Final = PREFIX + "regions/"

# Watch reconnects back off exponentially up to this bound, with jitter so that every router of
# a region does not hammer a recovering etcd member in step.
WATCH_BACKOFF_S_MIN: Final = 0.2
WATCH_BACKOFF_S_MAX: Final = 5.0


@dataclass(frozen=True, slots=True)
class Node:
    """One PostgreSQL server: the address every region dials (before any WAN mapping)."""

    name: str
    region: str
    host: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "region": self.region, "host": self.host, "port": self.port}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Node:
        return cls(str(d["name"]), str(d["region"]), str(d["host"]), int(d["port"]))


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    home_region: str
    primary: Node
    standbys: tuple[Node, ...]
    epoch: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "home_region": self.home_region,
            "primary": self.primary.to_json(),
            "standbys": [s.to_json() for s in self.standbys],
            "epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Shard:
        return cls(
            name=str(d["name"]),
            home_region=str(d["home_region"]),
            primary=Node.from_json(d["primary"]),
            standbys=tuple(Node.from_json(s) for s in d.get("standbys", ())),
            epoch=int(d["epoch"]),
        )


@dataclass(frozen=True, slots=True)
class SlotRange:
    first: int
    last: int
    shard: str
    epoch: int


@dataclass(frozen=True)
class SlotMap:
    """Slot -> (shard, slot epoch), stored as ranges and looked up through a flat table."""

    ranges: tuple[SlotRange, ...]
    _shard: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _epoch: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # shard -> its slots, ascending: every keyless open picks one (a scan of all the slots
    # per open cost ~80 us of the router's loop).
    _slots_of: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shard: list[str | None] = [None] * SLOT_COUNT
        epoch = [0] * SLOT_COUNT
        for r in self.ranges:
            if not (0 <= r.first <= r.last < SLOT_COUNT) or r.epoch < 1:
                raise TopologyError(f"bad slot range {r}")
            for s in range(r.first, r.last + 1):
                if shard[s] is not None:
                    raise TopologyError(f"slot {s} is mapped twice")
                shard[s] = r.shard
                epoch[s] = r.epoch
        missing = [i for i, s in enumerate(shard) if s is None]
        if missing:
            raise TopologyError(f"{len(missing)} slots are unmapped, first {missing[0]}")
        object.__setattr__(self, "_shard", tuple(s for s in shard if s is not None))
        object.__setattr__(self, "_epoch", tuple(epoch))
        by_shard: dict[str, list[int]] = {}
        for i, name in enumerate(self._shard):
            by_shard.setdefault(name, []).append(i)
        object.__setattr__(self, "_slots_of", {n: tuple(v) for n, v in by_shard.items()})

    def lookup(self, slot: int) -> tuple[str, int]:
        return self._shard[slot], self._epoch[slot]

    def slots_of(self, shard: str) -> tuple[int, ...]:
        return self._slots_of.get(shard, ())

    @classmethod
    def even(cls, shards: Iterable[str], epoch: int = 1) -> SlotMap:
        """Split the slots into contiguous, nearly equal ranges, one per shard, in order."""
        names = list(shards)
        n = len(names)
        assert n > 0
        ranges = []
        for i, name in enumerate(names):
            first = SLOT_COUNT * i // n
            last = SLOT_COUNT * (i + 1) // n - 1
            ranges.append(SlotRange(first, last, name, epoch))
        return cls(tuple(ranges))

    @classmethod
    def from_table(cls, shard: list[str], epoch: list[int]) -> SlotMap:
        """Compress a per-slot table back into ranges (used after a slot moves)."""
        ranges: list[SlotRange] = []
        start = 0
        for i in range(1, SLOT_COUNT + 1):
            if i == SLOT_COUNT or shard[i] != shard[start] or epoch[i] != epoch[start]:
                ranges.append(SlotRange(start, i - 1, shard[start], epoch[start]))
                start = i
        return cls(tuple(ranges))

    def table(self) -> tuple[list[str], list[int]]:
        return list(self._shard), list(self._epoch)

    def to_json(self) -> dict[str, Any]:
        return {
            "ranges": [
                {"first": r.first, "last": r.last, "shard": r.shard, "epoch": r.epoch}
                for r in self.ranges
            ]
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SlotMap:
        return cls(
            tuple(
                SlotRange(int(r["first"]), int(r["last"]), str(r["shard"]), int(r["epoch"]))
                for r in d["ranges"]
            )
        )


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    router_url: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "router_url": self.router_url}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Region:
        return cls(str(d["name"]), str(d["router_url"]))


@dataclass(frozen=True)
class Topology:
    revision: int
    regions: Mapping[str, Region]
    shards: Mapping[str, Shard]
    slots: SlotMap

    def __post_init__(self) -> None:
        for r in self.slots.ranges:
            if r.shard not in self.shards:
                raise TopologyError(f"slot range {r.first}-{r.last} names unknown shard {r.shard}")

    def route(self, slot: int) -> tuple[Shard, int]:
        """The shard owning ``slot`` and the slot's epoch."""
        name, epoch = self.slots.lookup(slot)
        return self.shards[name], epoch

    def shards_homed_in(self, region: str) -> list[Shard]:
        return [s for s in self.shards.values() if s.home_region == region]

    def to_kv(self) -> dict[str, bytes]:
        kv = {SLOTMAP_KEY: orjson.dumps(self.slots.to_json())}
        for s in self.shards.values():
            kv[SHARD_PREFIX + s.name] = orjson.dumps(s.to_json())
        for r in self.regions.values():
            kv[REGION_PREFIX + r.name] = orjson.dumps(r.to_json())
        return kv

    @classmethod
    def from_kv(cls, revision: int, kv: Mapping[str, bytes]) -> Topology:
        try:
            slotmap_raw = kv[SLOTMAP_KEY]
        except KeyError:
            raise TopologyError("no slot map in etcd (is the cluster bootstrapped?)") from None
        try:
            shards = {
                k.removeprefix(SHARD_PREFIX): Shard.from_json(orjson.loads(v))
                for k, v in kv.items()
                if k.startswith(SHARD_PREFIX)
            }
            regions = {
                k.removeprefix(REGION_PREFIX): Region.from_json(orjson.loads(v))
                for k, v in kv.items()
                if k.startswith(REGION_PREFIX)
            }
            slots = SlotMap.from_json(orjson.loads(slotmap_raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise TopologyError(f"malformed topology: {exc!r}") from exc
        return cls(revision=revision, regions=regions, shards=shards, slots=slots)


async def load_topology(client: EtcdClient) -> Topology:
    revision, kv = await client.get_prefix(PREFIX)
    return Topology.from_kv(revision, kv)


async def bootstrap_topology(client: EtcdClient, topology: Topology) -> bool:
    """Write ``topology`` unless a slot map already exists. True when this call wrote it."""
    return await client.put_all_if_absent(SLOTMAP_KEY, topology.to_kv())


class EpochConfirmations:
    """Which shard epochs a linearizable etcd read has recently shown to be current (a lease).

    The rule: ``(shard, epoch)`` is confirmed at time ``now`` when a quorum read *sent* at
    ``t >= now - bound_s`` answered that epoch for the shard. Counting from the send, not the
    answer, is what makes it a lease: the read took effect in etcd somewhere between send and
    answer, so whatever etcd held at ``t`` or later still held ``epoch`` at ``t`` at the
    earliest, and a failover whose CAS completed before ``t`` would have shown in the answer.
    An answer sent earlier than the one already recorded never overrides it (reads and refreshes
    may complete out of order).
    """

    def __init__(
        self, bound_s: float = TOPOLOGY_CONFIRM_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bound_s = bound_s
        self.clock = clock
        self._seen: dict[str, tuple[int, float]] = {}

    def record(self, sent_at: float, epochs: Mapping[str, int]) -> None:
        """A quorum read sent at ``sent_at`` (by :attr:`clock`) showed these shard epochs."""
        for shard, epoch in epochs.items():
            prior = self._seen.get(shard)
            if prior is None or sent_at > prior[1]:
                self._seen[shard] = (epoch, sent_at)

    def confirmed(self, shard: str, epoch: int) -> bool:
        seen = self._seen.get(shard)
        if seen is None or seen[0] != epoch:
            return False
        return self.clock() - seen[1] < self.bound_s

    def epoch_seen(self, shard: str) -> int | None:
        """The epoch of the newest confirmation for ``shard`` (however old), if any."""
        seen = self._seen.get(shard)
        return None if seen is None else seen[0]


class TopologyWatcher:
    """Holds the newest topology a router has seen and keeps it current through an etcd watch.

    With ``confirm=True`` (routers) it also keeps the per-shard epoch lease fresh: one
    linearizable range over the shard records every ``TOPOLOGY_CONFIRM_INTERVAL_S``, while reads
    asked for it within ``TOPOLOGY_CONFIRM_IDLE_S``; an idle router sends none (each round costs
    about 1 ms of router CPU and a few ms of etcd's), and its first read waits for one round.
    """

    def __init__(self, client: EtcdClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self.confirmations = EpochConfirmations(TOPOLOGY_CONFIRM_S, clock)
        self._confirm_task: asyncio.Task[None] | None = None
        self._confirm_refresh: asyncio.Task[None] | None = None
        self._demand_at = -math.inf
        self._wake = asyncio.Event()  # set while the confirmation loop runs (reads want it)
        self._round_done = asyncio.Event()
        # The round the last wake from idle started: every read that finds the lease lapsed
        # waits for it, not only the read that woke the loop.
        self._waking_round: asyncio.Event | None = None
        self._topology: Topology | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self.etcd_reachable = False
        self.loaded_at_monotonic = 0.0

    @property
    def current(self) -> Topology:
        if self._topology is None:
            raise TopologyError("topology not loaded yet")
        return self._topology

    @property
    def loaded(self) -> bool:
        return self._topology is not None

    def confirmed(self, shard: Shard) -> bool:
        """True while this router may read ``shard``'s primary or standbys (see the module)."""
        return self.confirmations.confirmed(shard.name, shard.epoch)

    async def ensure_confirmed(self, shard: Shard) -> bool:
        """:meth:`confirmed`, keeping the confirmation loop going while reads come. When the
        loop was idle, wait (at most ``TOPOLOGY_WAKE_WAIT_S``) for the round this wake
        starts; every read that comes while that round runs waits for it too (concurrent reads
        after an idle spell, the items of one batch request, must not get a 503 because
        another read woke the loop first). Once that round is over and the lease is still
        lapsed, answer at once (etcd is out of reach, and waiting would only delay the 503)."""
        self._demand_at = time.monotonic()
        if self._confirm_task is not None and not self._wake.is_set():
            self._waking_round = self._round_done
        self._wake.set()
        if self.confirmations.confirmed(shard.name, shard.epoch):
            return True
        waking = self._waking_round
        if waking is not None and not waking.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waking.wait(), TOPOLOGY_WAKE_WAIT_S)
        return self.confirmations.confirmed(shard.name, shard.epoch)

    async def start(self, *, initial_timeout_s: float, confirm: bool = False) -> None:
        """Load once (bounded), then watch (and with ``confirm``, confirm) in the background."""
        deadline = time.monotonic() + initial_timeout_s
        delay = WATCH_BACKOFF_S_MIN
        while True:
            try:
                await self.refresh()
                break
            except (EtcdError, TopologyError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("topology not loadable yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_BACKOFF_S_MAX)
        self._task = asyncio.create_task(self._watch_forever(), name="topology-watch")
        if confirm:
            self._confirm_task = asyncio.create_task(
                self._confirm_forever(), name="topology-confirm"
            )

    async def stop(self) -> None:
        for task in (self._task, self._confirm_task, self._confirm_refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, EtcdError, TopologyError):
                    await task
        self._task = self._confirm_task = self._confirm_refresh = None

    async def confirm_once(self) -> None:
        """One linearizable read of the shard records (the gateway's range without
        ``serializable``: etcd answers it only with its majority's agreement, so a member cut
        off in a minority times out instead of answering from its own stale copy)."""
        sent_at = self.confirmations.clock()
        _rev, kv = await asyncio.wait_for(
            self._client.get_prefix(SHARD_PREFIX), TOPOLOGY_CONFIRM_TIMEOUT_S
        )
        try:
            epochs = {
                k.removeprefix(SHARD_PREFIX): int(orjson.loads(v)["epoch"]) for k, v in kv.items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise TopologyError(f"malformed shard record: {exc!r}") from exc
        self.confirmations.record(sent_at, epochs)
        held = self._topology
        moved_on = held is not None and any(
            name in held.shards and epoch != held.shards[name].epoch
            for name, epoch in epochs.items()
        )
        # etcd moved on and the watch has not told us yet (it may be stuck on a member that
        # just rejoined): reload, which confirms the new epochs in passing.
        if moved_on and (self._confirm_refresh is None or self._confirm_refresh.done()):
            self._confirm_refresh = asyncio.create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(EtcdError, TopologyError):
            await self.refresh()

    async def _confirm_forever(self) -> None:
        failing = False
        while True:
            if time.monotonic() - self._demand_at > TOPOLOGY_CONFIRM_IDLE_S:
                self._wake.clear()
                await self._wake.wait()
            started = time.monotonic()
            try:
                await self.confirm_once()
                if failing:
                    log.warning("topology confirmed again: reads from primaries resume")
                failing = False
            except (EtcdError, TopologyError, TimeoutError) as exc:
                if not failing:
                    log.warning(
                        "topology not confirmable (%r): primary reads stop within %.1f s",
                        exc,
                        TOPOLOGY_CONFIRM_S,
                    )
                failing = True
            done, self._round_done = self._round_done, asyncio.Event()
            done.set()
            spent = time.monotonic() - started
            await asyncio.sleep(max(TOPOLOGY_CONFIRM_INTERVAL_S - spent, 0.0))

    async def refresh(self, *, newer_than: int | None = None) -> Topology:
        """Reload the whole topology from etcd (after a store said our epochs are stale).

        Concurrent callers share one reload; ``newer_than`` lets a caller skip the reload when
        another request already brought a newer revision than the one it saw refused.
        """
        async with self._refresh_lock:
            if (
                newer_than is not None
                and self._topology is not None
                and self._topology.revision > newer_than
            ):
                return self._topology
            sent_at = self.confirmations.clock()
            try:
                topo = await load_topology(self._client)
            except EtcdError:
                self.etcd_reachable = False
                raise
            # The load is a linearizable read too: it confirms the epochs it brought.
            self.confirmations.record(sent_at, {n: s.epoch for n, s in topo.shards.items()})
            self._install(topo)
            return topo

    def _install(self, topo: Topology) -> None:
        self.etcd_reachable = True
        if self._topology is None or topo.revision >= self._topology.revision:
            self._topology = topo
            self.loaded_at_monotonic = time.monotonic()
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_changed(self, timeout_s: float) -> bool:
        ev = self._changed
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _watch_forever(self) -> None:
        delay = WATCH_BACKOFF_S_MIN
        while True:
            start_rev = (self._topology.revision if self._topology else 0) + 1
            try:
                async for revision in self._client.watch_prefix(PREFIX, start_rev):
                    delay = WATCH_BACKOFF_S_MIN
                    if self._topology is None or revision > self._topology.revision:
                        await self.refresh()
            except (EtcdError, TopologyError) as exc:
                self.etcd_reachable = False
                log.warning("topology watch interrupted, serving last map: %s", exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, WATCH_BACKOFF_S_MAX)
            with contextlib.suppress(EtcdError, TopologyError):
                await self.refresh()
