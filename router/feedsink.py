"""The change feed's side of a region's Redis: batches, positions, heartbeats, resets.

Beside the request path's client (``router.cache``) and using the same protocol
(``consistency.coherence``): every entry write goes through the forward-only rule. One
``RegionSink`` per target region, in the relay process that runs a shard's decoder
(``router.relays.feed``); a remote region's Redis is reached through the WAN like all
cross-region traffic (the dial mapping of the relay's config).

A batch is one script call (``FEED_APPLY_SCRIPT``: continuity check, entries, position marker,
heartbeat, atomically). A shard's batch calls are *pipelined* (``OrderedScript``): each goes
out on that shard's own connection without waiting for the ones before it to answer, and Redis
runs and answers a connection's commands in the order it read them. A far region is a WAN
round trip away (190 ms to ap-south under --wan realistic); one call at a time made every
commit wait behind the call in flight (a heartbeat every 0.4 s kept such a link busy half the
time), on top of its own one-way trip. A reset is a generation change plus a sweep; carrying
entries to a new shard epoch is a scan plus one script per page (pooled connections: none of
them runs while a batch call of the same shard is in flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

from consistency import coherence, ids
from regionstore.changes import AccountChange
from router.cache import GENERATION_BYTES, drop_entries
from router.redisconn import (
    REDIS_ERRORS,
    CacheUnavailable,
    pooled_client,
    redis_unavailable,
    unavailable,
)

# One call of the feed (a batch of up to changefeed.BATCH_TXNS_MAX transactions, a page of a
# sweep) must answer within this, or the region counts as unreachable for this batch. Above a
# WAN round trip to the farthest region (~300 ms under --wan realistic) with room for a slow
# Redis; small enough that a partitioned region is noticed in seconds, not minutes.
FEED_REDIS_TIMEOUT_S: Final = 3.0
# Pooled connections per region per relay process, for everything but the batch calls (markers,
# resets, sweeps: a few at once at the most, during a recovery).
FEED_REDIS_CONNECTIONS_MAX: Final = 8
# Batch calls of one shard sent to one region before the first of them answered. The feed
# spaces them (router.relays.feed.FEED_CALL_SPACING_S, 5 ms) and coalesces what queues between,
# so 64 cover a 320 ms round trip without a commit waiting for a free place (the farthest
# region is 190 ms away under --wan realistic); each holds its batch (at most
# changefeed.BATCH_TXNS_MAX transactions) in memory until answered.
FEED_CALLS_IN_FLIGHT_MAX: Final = 64
# Keys per SCAN step and per delete/copy call when sweeping a shard's entries: large enough to
# sweep a million keys in seconds, small enough that one step never blocks Redis noticeably.
SWEEP_PAGE_KEYS: Final = 1000


_REFUSALS: Final = {-1: "marker_missing", -2: "repl_slot_changed", -3: "marker_behind"}


@dataclass(slots=True)
class _Link:
    """One connection of an ``OrderedScript`` and the answers it still owes, oldest first."""

    conn: AbstractConnection
    owed: deque[asyncio.Future[Any]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    broken: bool = False


class OrderedScript:
    """One Lua script's calls on a connection of their own: each call is written at once and
    answered later, in the order sent (Redis reads, runs and answers a connection's commands in
    order), at most ``FEED_CALLS_IN_FLIGHT_MAX`` unanswered at a time.

    ``send`` returns once the call is written; its future holds the script's answer, or
    ``CacheUnavailable``. A connection that fails (written or read: closed, timed out) fails
    every call still owed on it: nothing after a lost answer can be trusted to have run or
    not, and the caller reads the region's marker before it sends again. Each answer must come
    within the client's socket timeout of the answer before it (or of its own sending)."""

    def __init__(self, url: str, script: str, *, what: str, timeout_s: float) -> None:
        self._what = what
        self._factory = aioredis.ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest()
        self._slots = asyncio.Semaphore(FEED_CALLS_IN_FLIGHT_MAX)
        # Sends one at a time: the order of writes is the order of the calls.
        self._writing = asyncio.Lock()
        self._link: _Link | None = None

    async def send(
        self,
        keys: Sequence[str],
        args: Sequence[str | int | bytes],
        *,
        shared_keys: PackedKeys | None = None,
    ) -> asyncio.Future[Any]:
        """Call the script with ``keys`` (then ``shared_keys``, packed once for many calls)
        and ``args``."""
        command = evalsha_command(self._sha, keys, args, shared_keys)
        await self._slots.acquire()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(self._settled)
        try:
            async with self._writing:
                link = await self._connected()
                link.owed.append(answer)
                try:
                    await link.conn.send_packed_command(command, check_health=False)
                except BaseException as exc:
                    # Written in part, or not at all: the answers owed on this connection can
                    # no longer be matched to their calls. Fails this one too.
                    self._break(link, exc)
                    raise
                if link.reader is None or link.reader.done():
                    link.reader = asyncio.create_task(self._read(link))
        except BaseException as exc:
            # Not sent whole (cancelled, no connection, a failed write): the call did not run
            # or its answer is lost; either way it ends here, as CacheUnavailable.
            if not answer.done():
                answer.set_exception(unavailable(self._what, exc))
            if not isinstance(exc, REDIS_ERRORS):
                raise
        return answer

    async def aclose(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._break(link, ConnectionError("closed"))
            if link.reader is not None:
                link.reader.cancel()
            await link.conn.disconnect()
        await self._factory.aclose()

    def _settled(self, answer: asyncio.Future[Any]) -> None:
        self._slots.release()
        _retrieved(answer)

    async def _connected(self) -> _Link:
        link = self._link
        if link is not None and not link.broken:
            if link.conn.is_connected:
                return link
            # Dropped under us (the client disconnects on a failed read): never reconnect it in
            # place, the answers it owes would be read from the new connection.
            self._break(link, ConnectionError("connection lost"))
        # The pool is only the factory (it parses the URL once, TLS and sockets included); the
        # connection is never returned to it. make_connection is untyped upstream.
        conn: AbstractConnection = self._factory.make_connection()  # type: ignore[no-untyped-call]
        try:
            # Connects first. A new connection may face a restarted Redis: load the script
            # before the first call (an EVALSHA of a script Redis does not hold is refused,
            # never run).
            await conn.send_command("SCRIPT", "LOAD", self._script, check_health=False)
            await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._link = link = _Link(conn)
        return link

    async def _read(self, link: _Link) -> None:
        try:
            while link.owed and not link.broken:
                try:
                    value: Any = await link.conn.read_response(disable_decoding=True)
                except ResponseError as exc:
                    if isinstance(exc, NoScriptError):
                        # The script was flushed: every call behind this one is refused too.
                        # A new connection loads it again.
                        await link.conn.disconnect(nowait=True)
                        self._break(link, exc)
                        return
                    # A refused command (a script error) is one whole answer: the connection
                    # stays in step, the answers after it still belong to their calls.
                    value = exc
                if link.broken or not link.owed:
                    return
                answer = link.owed.popleft()
                if answer.done():
                    continue
                if isinstance(value, ResponseError):
                    answer.set_exception(unavailable(self._what, value))
                else:
                    answer.set_result(value)
        except BaseException as exc:
            self._break(link, exc)
            if not isinstance(exc, REDIS_ERRORS):
                raise

    def _break(self, link: _Link, exc: BaseException) -> None:
        # The client already dropped the connection (it does on every failed write or read);
        # what is left is to fail the calls it still owed and to use a new one from now on.
        link.broken = True
        if self._link is link:
            self._link = None
        while link.owed:
            answer = link.owed.popleft()
            if not answer.done():
                answer.set_exception(unavailable(self._what, exc))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _encoded(value: str | int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return b"%d" % value
    return value.encode()


@dataclass(frozen=True, slots=True)
class PackedKeys:
    """Keys already in the Redis protocol (RESP bulk strings, one after the other): a batch's
    entry keys, the same in every region's call. The client packs a command by re-joining its
    growing buffer for each argument, which for a batch's hundred-odd keys cost more than the
    rest of the call; packed once they are one join per batch."""

    count: int
    blob: bytes

    @classmethod
    def of(cls, keys: Sequence[str]) -> PackedKeys:
        return cls(len(keys), b"".join([_bulk(k.encode()) for k in keys]))


def evalsha_command(
    sha: str,
    keys: Sequence[str],
    args: Sequence[str | int | bytes],
    shared_keys: PackedKeys | None = None,
) -> list[bytes]:
    """``EVALSHA sha numkeys keys... shared_keys... args...`` as the client's
    ``send_packed_command`` takes it (the protocol's array of bulk strings; a test holds it
    byte for byte to the client's own ``pack_command``)."""
    shared = shared_keys or PackedKeys(0, b"")
    nkeys = len(keys) + shared.count
    head = [b"*%d\r\n" % (3 + nkeys + len(args)), _bulk(b"EVALSHA"), _bulk(sha.encode())]
    head.append(_bulk(b"%d" % nkeys))
    head += [_bulk(k.encode()) for k in keys]
    tail = [_bulk(_encoded(a)) for a in args]
    return [b"".join(head), shared.blob, b"".join(tail)]


def _retrieved(answer: asyncio.Future[Any]) -> None:
    # A call whose caller stopped waiting (its region fell behind, its session ended) fails
    # without anyone to read it: that is not an error of its own, so mark it read.
    if not answer.cancelled():
        answer.exception()


@dataclass(frozen=True, slots=True)
class FeedEntries:
    """A batch's cache entries, encoded once for every region (``FEED_APPLY_SCRIPT``'s keys
    from the third on and its ARGV[12]): a batch goes to three regions, and building and
    packing its keys and payloads was a fifth of the relay's CPU when done per region."""

    keys: tuple[str, ...]
    items: bytes
    packed: PackedKeys

    @classmethod
    def of(cls, epoch: int, changes: Iterable[AccountChange]) -> FeedEntries:
        # A deleted row left the shard (a slot move): its new home's feed fills it, and a key
        # shared with that home (same epoch number) must not lose its entry.
        keys, items = coherence.entries_arg(
            epoch, ((c.account_id, c.version, c.row) for c in changes if not c.deleted)
        )
        return cls(tuple(keys), items, PackedKeys.of(keys))


@dataclass(frozen=True, slots=True)
class Marker:
    """A region's position for a shard (coherence: ``txr:feed:{shard}``)."""

    repl_slot: str
    lsn: int
    # Commit time (epoch µs, the primary's clock) of the last transaction applied; None when
    # none was applied since the marker was set.
    commit_ts_us: int | None
    epoch: int | None


class RegionSink:
    def __init__(self, region: str, url: str) -> None:
        self.region = region
        self._redis = pooled_client(
            url, connections=FEED_REDIS_CONNECTIONS_MAX, timeout_s=FEED_REDIS_TIMEOUT_S
        )
        self._url = url
        # Per shard: each decoder's batches in order on their own connection.
        self._batches: dict[str, OrderedScript] = {}
        self._copy = self._redis.register_script(coherence.COPY_ENTRIES_SCRIPT)

    async def close(self) -> None:
        for calls in self._batches.values():
            await calls.aclose()
        self._batches.clear()
        await self._redis.aclose()

    async def marker(self, shard: str) -> Marker | None:
        with redis_unavailable(f"redis {self.region}"):
            raw = await self._redis.hmget(
                coherence.position_key(shard), ["slot", "lsn", "ts", "epoch"]
            )
        if raw[0] is None or raw[1] is None:
            return None
        return Marker(
            _text(raw[0]),
            int(_text(raw[1]), 16),
            int(_text(raw[2])) if raw[2] else None,
            int(_text(raw[3])) if raw[3] else None,
        )

    async def set_marker(self, shard: str, marker: Marker) -> None:
        fields: list[str | int] = [
            "slot",
            marker.repl_slot,
            "lsn",
            coherence.lsn_sortable(marker.lsn),
        ]
        if marker.commit_ts_us is not None:
            fields += ["ts", marker.commit_ts_us]
        if marker.epoch is not None:
            fields += ["epoch", marker.epoch]
        key = coherence.position_key(shard)
        with redis_unavailable(f"redis {self.region}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, items=list(fields))
                await pipe.execute()

    async def send_apply(
        self,
        shard: str,
        *,
        repl_slot: str,
        from_lsn: int,
        to_lsn: int,
        commit_ts_us: int | None,
        epoch: int,
        entries: FeedEntries,
        heartbeat_age_s: float | None,
        primary: str,
        lag_bytes: int | None,
    ) -> asyncio.Future[int | str]:
        """Send one batch (``FEED_APPLY_SCRIPT``) with its ``entries`` (keyed by ``epoch``'s
        keys) behind the shard's calls still in flight, and return once it is written. Its
        answer: the entries written, or why the marker does not prove continuity (nothing
        written: the region must be reset or catch up): ``marker_missing``,
        ``repl_slot_changed`` or ``marker_behind``; or ``CacheUnavailable``."""
        keys = [coherence.position_key(shard), coherence.heartbeat_key(shard)]
        args: list[str | int | bytes] = [
            repl_slot,
            coherence.lsn_sortable(from_lsn),
            coherence.lsn_sortable(to_lsn),
            "" if commit_ts_us is None else commit_ts_us,
            epoch,
            coherence.ENTRY_TTL_S,
            coherence.TOMBSTONE_TTL_S,
            "" if heartbeat_age_s is None else f"{max(heartbeat_age_s, 0.0):.6f}",
            primary,
            "" if lag_bytes is None else lag_bytes,
            coherence.HEARTBEAT_TTL_S,
            entries.items,
        ]
        calls = self._batches.get(shard)
        if calls is None:
            calls = self._batches[shard] = OrderedScript(
                self._url,
                coherence.FEED_APPLY_SCRIPT,
                what=f"redis {self.region}",
                timeout_s=FEED_REDIS_TIMEOUT_S,
            )
        raw = await calls.send(keys, args, shared_keys=entries.packed)
        answer: asyncio.Future[int | str] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieved)

        def settle(f: asyncio.Future[Any]) -> None:
            if answer.done():
                return
            if f.cancelled():
                answer.cancel()
            elif (exc := f.exception()) is not None:
                answer.set_exception(exc)
            else:
                res = int(f.result())
                answer.set_result(_REFUSALS.get(res, "marker_refused") if res < 0 else res)

        raw.add_done_callback(settle)
        return answer

    async def new_generation(self) -> None:
        """Fence every read-through fill in flight in this region (coherence docstring)."""
        with redis_unavailable(f"redis {self.region}"):
            await self._redis.set(coherence.GENERATION_KEY, secrets.token_hex(GENERATION_BYTES))

    async def drop_shard(self, slots: Collection[int]) -> int:
        """New generation, then delete every entry (any epoch) of ``slots``."""
        await self.new_generation()
        return await drop_entries(self._redis, slots, f"redis {self.region}")

    async def drop_accounts(self, accounts: Collection[int], epochs: Collection[int]) -> int:
        """New generation, then delete these accounts' entries under each of ``epochs``."""
        await self.new_generation()
        keys = [coherence.entry_key(e, a) for a in accounts for e in epochs]
        dropped = 0
        with redis_unavailable(f"redis {self.region}"):
            for i in range(0, len(keys), SWEEP_PAGE_KEYS):
                dropped += int(await self._redis.unlink(*keys[i : i + SWEEP_PAGE_KEYS]))
        return dropped

    async def copy_epoch(
        self, slots: Collection[int], old_epoch: int, new_epoch: int, skip: Collection[int]
    ) -> int:
        """Carry the values of ``slots``' accounts from ``old_epoch``'s keys to ``new_epoch``'s,
        except ``skip`` (accounts the feed cannot prove unchanged). Returns values written."""
        wanted = frozenset(slots)
        skipped = frozenset(skip)
        written = 0
        page: list[str] = []
        pattern = f"{coherence.ENTRY_PREFIX}{old_epoch}:*"
        with redis_unavailable(f"redis {self.region}"):
            async for raw in self._redis.scan_iter(match=pattern, count=SWEEP_PAGE_KEYS):
                parsed = coherence.parse_entry_key(_text(raw))
                if parsed is None or parsed[0] != old_epoch:
                    continue
                account = parsed[1]
                if ids.account_slot(account) not in wanted or account in skipped:
                    continue
                page += [_text(raw), coherence.entry_key(new_epoch, account)]
                if len(page) >= 2 * SWEEP_PAGE_KEYS:
                    written += int(await self._copy(keys=page, args=_ttls()))
                    page = []
            if page:
                written += int(await self._copy(keys=page, args=_ttls()))
        return written


def _ttls() -> list[str | int | bytes]:
    return [coherence.ENTRY_TTL_S, coherence.TOMBSTONE_TTL_S]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


__all__ = [
    "FEED_CALLS_IN_FLIGHT_MAX",
    "CacheUnavailable",
    "FeedEntries",
    "Marker",
    "OrderedScript",
    "RegionSink",
]
