"""The region cache path: versioned account entries in this region's Redis.

The protocol (keys, the forward-only version rule, tombstones, the generation fence, TTLs) is
``consistency.coherence``; this module is its Redis client. Every write goes through one of the
two server-side scripts there, so no code path can move a version backwards.

Failure policy: ``put_committed`` and ``read_through`` are on the request path and treat Redis
as optional (a failure is a miss, logged and counted); ``get``, ``fill``, ``invalidate`` and the
relay-facing methods raise ``CacheUnavailable`` so their callers (tests, the relay) can tell a
refused write from one that never happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from consistency import coherence, ids
from consistency.coherence import Mode
from router.limits import CACHE_WRITE_TIMEOUT_S
from router.metrics import Metrics
from router.redisconn import CacheUnavailable, RedisGuard, pooled_client, redis_unavailable
from router.tracing import child_span

log = logging.getLogger(__name__)

# Concurrent misses of one key in this process share one loader call. Past this many keys in
# flight (a flood of distinct misses) new misses load on their own instead of growing the
# table: the database pools bound those anyway, and the table must never grow without bound.
SINGLE_FLIGHT_KEYS_MAX: Final = 4096
# Keys per SCAN step when dropping a shard: large enough to sweep a few million keys in
# seconds, small enough that one step never blocks Redis noticeably.
DROP_SCAN_COUNT: Final = 1000
# Relay and drop calls may carry a thousand keys; they get more room than one request write.
BULK_TIMEOUT_S: Final = 5.0
# Connections per router to its Redis. Every request-path operation is one round trip of well
# under a millisecond, so 64 serve tens of thousands of operations per second; a burst beyond
# waits up to the write timeout for a free one. Bulk: one per shard worker plus a drop.
REDIS_CONNECTIONS_MAX: Final = 64
BULK_CONNECTIONS_MAX: Final = 16
# Random bits of a cache generation token (coherence.GENERATION_KEY): collisions must be
# negligible across restarts, since a repeated token would let a fenced-out fill in.
GENERATION_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached committed account row: its version and the row (coherence.ACCOUNT_FIELDS)."""

    version: int
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RelayState:
    """A relay heartbeat as read back: ``through`` in Redis clock seconds (None = unknown)."""

    through: float | None
    epoch: int
    primary: str
    lag_bytes: int | None


Loader = Callable[[], Awaitable[CacheEntry | None]]


def entry_key(shard_epoch: int, account_id: int) -> str:
    return coherence.entry_key(shard_epoch, account_id)


class RegionCache:
    def __init__(self, url: str, metrics: Metrics) -> None:
        # A blocking pool: a burst of requests waits (briefly) for a connection instead of
        # failing, and the number of connections to Redis stays bounded.
        self._redis = pooled_client(
            url, connections=REDIS_CONNECTIONS_MAX, timeout_s=CACHE_WRITE_TIMEOUT_S
        )
        # Bulk operations (relay batches, shard drops) use their own connections with a longer
        # timeout, so that a big batch never times out a request-path write or vice versa.
        self._bulk = pooled_client(url, connections=BULK_CONNECTIONS_MAX, timeout_s=BULK_TIMEOUT_S)
        self._apply = self._redis.register_script(coherence.APPLY_SCRIPT)
        self._apply_many = self._redis.register_script(coherence.APPLY_MANY_SCRIPT)
        self._metrics = metrics
        # One guard per operation, each counting its own errors (RedisGuard).
        self._get_guard = self._guard("get")
        self._put_guard = self._guard("put")
        self._fill_guard = self._guard("fill")
        self._invalidate_guard = self._guard("invalidate")
        self._flights: dict[tuple[int, int], asyncio.Task[CacheEntry | None]] = {}

    async def close(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
        await self._redis.aclose()
        await self._bulk.aclose()

    async def ping(self) -> bool:
        try:
            with redis_unavailable("redis"):
                return bool(await self._redis.ping())
        except CacheUnavailable:
            return False

    def _guard(self, op: str) -> RedisGuard:
        return RedisGuard("redis", functools.partial(self._count, op, "error"))

    def _count(self, op: str, result: str) -> None:
        self._metrics.cache_ops.labels(self._metrics.region, op, result).inc()

    # -- request path -----------------------------------------------------------------------

    async def put_committed(
        self, shard_epoch: int, versions: Mapping[int, tuple[int, Mapping[str, Any]]]
    ) -> None:
        """Record committed ``{account: (version, payload)}``; best effort, never raises.

        A full row (coherence.ACCOUNT_FIELDS) is filled; anything less (the transfer path knows
        only the balance) becomes a tombstone at that version: the cache then knows the version
        is committed and refuses every older fill, and the relay (or the next read) fills the
        row at that version. The commit is already durable when this runs, so a Redis failure
        only costs a later miss; it must not turn a committed transfer into an error.
        """
        if not versions:
            return
        # One script call for every account (a whole committed batch): one round trip, not one
        # per account. Each key still goes through the forward-only rule (coherence).
        keys, items = coherence.entries_arg(
            shard_epoch,
            (
                (acc, version, payload if coherence.is_full_payload(payload) else None)
                for acc, (version, payload) in versions.items()
            ),
        )
        args = (coherence.ENTRY_TTL_S, coherence.TOMBSTONE_TTL_S, items)
        with child_span("cache.put_committed"):
            try:
                with self._put_guard:
                    await self._apply_many(keys=keys, args=args)
            except CacheUnavailable as exc:
                log.warning("cache write after commit failed: %s", type(exc.__cause__).__name__)
                return
        self._count("put", "ok")

    async def read_through(
        self, shard_epoch: int, account_id: int, loader: Loader
    ) -> tuple[CacheEntry | None, bool]:
        """The cached row, or ``loader()``'s (then filled, fenced and age-checked).

        Returns ``(entry, hit)``. Concurrent misses of one key in this process make one loader
        call; the others wait for its result. The loader's exceptions reach every waiter; Redis
        failures never do (they count as a miss). ``(None, False)``: the loader found nothing.
        """
        key = (shard_epoch, account_id)
        generation: str | None
        try:
            entry, generation = await self._get_with_generation(shard_epoch, account_id)
        except CacheUnavailable:
            entry, generation = None, None
        if entry is not None:
            self._count("get", "hit")
            return entry, True
        self._count("get", "miss")
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._load_and_fill(key, loader, generation))
            if len(self._flights) < SINGLE_FLIGHT_KEYS_MAX:
                self._flights[key] = flight
                flight.add_done_callback(lambda _t: self._flights.pop(key, None))
            # Retrieve a failure even when every waiter was cancelled (no "never retrieved").
            flight.add_done_callback(_swallow)
        # shield: a cancelled caller must not cancel the load other callers wait for.
        return await asyncio.shield(flight), False

    async def _load_and_fill(
        self, key: tuple[int, int], loader: Loader, generation: str | None
    ) -> CacheEntry | None:
        started = time.monotonic()
        entry = await loader()
        if entry is None or generation is None:
            # Not found, or Redis was down when we looked: no generation to fence with.
            return entry
        if time.monotonic() - started > coherence.FILL_AGE_MAX_S:
            self._count("fill", "too_old")
            return entry
        try:
            await self.fill(key[0], key[1], entry.version, entry.payload, generation=generation)
        except CacheUnavailable as exc:
            log.debug("cache fill failed: %s", exc)
        return entry

    # -- explicit operations ----------------------------------------------------------------

    async def get(self, shard_epoch: int, account_id: int) -> CacheEntry | None:
        """The cached value; None on a miss or a tombstone."""
        entry, _ = await self._get_with_generation(shard_epoch, account_id)
        return entry

    async def generation(self) -> str:
        """The current generation token (coherence.GENERATION_ABSENT when there is none)."""
        with redis_unavailable("redis"):
            raw = await self._redis.get(coherence.GENERATION_KEY)
        return _text(raw) if raw is not None else coherence.GENERATION_ABSENT

    async def fill(
        self,
        shard_epoch: int,
        account_id: int,
        version: int,
        payload: Mapping[str, Any],
        *,
        generation: str | None = None,
    ) -> bool:
        """Write a committed row unless the cache already holds this version or a newer one.

        ``generation``: the token (``generation()``) read *before* the row was read from the
        database; the fill is refused if it changed since. None skips that fence: only for
        rows that are current by construction (straight from a commit).
        """
        if not coherence.is_full_payload(payload):
            raise ValueError("a fill needs the whole account row (coherence.ACCOUNT_FIELDS)")
        with self._fill_guard:
            res = await self._call_apply(
                shard_epoch, account_id, "fill", version, payload, generation, client=None
            )
        result = {1: "ok", 0: "stale", -1: "fenced"}.get(int(res), "unknown")
        self._count("fill", result)
        return int(res) == 1

    async def invalidate(self, shard_epoch: int, account_id: int, version: int) -> None:
        """Record that ``version`` committed: older entries and fills lose from now on."""
        with self._invalidate_guard:
            await self._call_apply(
                shard_epoch, account_id, "inval", version, None, None, client=None
            )
        self._count("invalidate", "ok")

    async def drop_shard(self, slots: Collection[int]) -> int:
        """Fence in-flight fills (new generation), then delete every entry of these slots.

        The generation changes first: a fill that read the database before this call is then
        refused even if it lands after the sweep. Returns the number of keys deleted.
        """
        try:
            with redis_unavailable("redis"):
                await self._bulk.set(coherence.GENERATION_KEY, secrets.token_hex(GENERATION_BYTES))
            dropped = await drop_entries(self._bulk, slots, "redis")
        except CacheUnavailable:
            self._count("drop", "error")
            raise
        self._count("drop", "ok")
        return dropped

    # -- the freshness guard's read (the change feed writes these: router.feedsink) ---------

    async def relay_states(self, shards: Sequence[str]) -> tuple[float, dict[str, RelayState]]:
        """Redis's clock now and the heartbeats of ``shards`` (absent ones are left out).

        One round trip on the request-path pool: the read path calls it when its view is old.
        """
        with redis_unavailable("redis"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for shard in shards:
                    pipe.hmget(coherence.heartbeat_key(shard), coherence.HEARTBEAT_FIELDS)
                replies = await pipe.execute()
        secs, micros = replies[0]
        states: dict[str, RelayState] = {}
        for shard, (through, epoch, primary, lag_bytes) in zip(shards, replies[1:], strict=True):
            if epoch is None or primary is None:
                continue
            states[shard] = RelayState(
                through=float(_text(through)) if through else None,
                epoch=int(_text(epoch)),
                primary=_text(primary),
                lag_bytes=int(_text(lag_bytes)) if lag_bytes else None,
            )
        return int(secs) + int(micros) / 1_000_000, states

    # -- helpers ----------------------------------------------------------------------------

    async def _get_with_generation(
        self, shard_epoch: int, account_id: int
    ) -> tuple[CacheEntry | None, str]:
        with self._get_guard:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(entry_key(shard_epoch, account_id), ["v", "t", "d"])
                pipe.get(coherence.GENERATION_KEY)
                (v, t, d), gen = await pipe.execute()
        generation = gen.decode() if gen is not None else coherence.GENERATION_ABSENT
        if v is None or d is None or t is not None:
            return None, generation
        return CacheEntry(int(v), orjson.loads(d)), generation

    async def _call_apply(
        self,
        shard_epoch: int,
        account_id: int,
        mode: Mode,
        version: int,
        payload: Mapping[str, Any] | None,
        generation: str | None,
        *,
        client: Any,
    ) -> Any:
        coherence.check_version(version)
        return await self._apply(
            keys=[entry_key(shard_epoch, account_id), coherence.GENERATION_KEY],
            args=[
                mode,
                version,
                orjson.dumps(dict(payload)) if payload is not None else b"",
                coherence.ENTRY_TTL_S,
                coherence.TOMBSTONE_TTL_S,
                "1" if generation is not None else "0",
                generation or "",
            ],
            client=client,
        )


async def drop_entries(client: aioredis.Redis, slots: Collection[int], what: str) -> int:
    """Delete every entry of ``slots`` (any epoch) from ``client``'s Redis; keys deleted."""
    wanted = frozenset(slots)
    dropped = 0
    batch: list[str] = []
    with redis_unavailable(what):
        async for raw in client.scan_iter(
            match=coherence.ENTRY_SCAN_PATTERN, count=DROP_SCAN_COUNT
        ):
            key = _text(raw)
            parsed = coherence.parse_entry_key(key)
            if parsed is not None and ids.account_slot(parsed[1]) in wanted:
                batch.append(key)
            if len(batch) >= DROP_SCAN_COUNT:
                dropped += int(await client.unlink(*batch))
                batch.clear()
        if batch:
            dropped += int(await client.unlink(*batch))
    return dropped


def _text(raw: bytes | str) -> str:
    # Our clients do not decode responses; the stubs allow either.
    return raw.decode() if isinstance(raw, bytes) else raw


def _swallow(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()
