"""Publishing events: a small interface, its JetStream implementation, and the decoder's sink.

``Publisher`` is what the decoder needs of an event log: store these events in this order, or
fail. ``JetStreamPublisher`` is the NATS one; a Kafka publisher (idempotent producer, one
partition per tenant) would implement the same two methods.

``EventSink`` runs inside one shard's decoder (``router.relays.feed.ShardFeed``) beside the
region sinks: it receives every durable batch in commit order, derives its events
(``router.events.model``), publishes them and records the batch's end as its acknowledged
position. The decoder confirms to the replication slot the minimum of every region's position
and this one, so a publisher that dies, or loses NATS, leaves the slot holding everything it had
not acknowledged: the decoder reopens the stream there and publishes again (ids are stable, the
stream drops the duplicates). Events of one shard go out in its commit order: a window is
published in order on one connection and the next waits for its acknowledgements; a failure
ends the session, and the next starts at the first unacknowledged transaction.

A new replication slot (after a failover: PostgreSQL 15 slots do not follow a promotion; or
the first start) begins at the new primary's current position: the commits between the last
published one and that position never come through the stream. The publisher keeps its
``Position`` (the slot it follows, the commit time of the last transaction it published; saved
at most every ``POSITION_SAVE_S``) in the log's own store, and when a session's slot is not the
one recorded it first publishes the events of every row committed since that time minus
``COMMIT_TIME_MARGIN_S`` (``regionstore``'s ``event_rows_since``; everything when no position
was ever saved), then records the new slot. What it publishes twice is within the duplicate
window, so the stream keeps one copy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from regionstore.changefeed import FeedBatch
from regionstore.errors import StoreError
from regionstore.store import ShardStore
from router.events import model, stream
from router.metrics import Metrics

log = logging.getLogger(__name__)

# Events published before their acknowledgements are awaited (one pipelined window): the
# stream's acknowledgement needs a quorum round trip across the WAN, so one-at-a-time would cap
# a shard at one event per RTT. Below the client's outstanding-publish bound (4,000).
PUBLISH_WINDOW_MAX: Final = 1024
# The acknowledgements of one window, all of them, within this.
PUBLISH_ACK_TIMEOUT_S: Final = 10.0
# Feed batches queued for the publisher; past it the publisher is behind and the decoder
# resumes it from the slot (the WAL holds the rest, not memory).
EVENT_QUEUE_BATCHES_MAX: Final = 1024
# Queued feed batches published together in one call (their events in one pipelined window
# sequence); bounds one call's memory at this many batches of the feed's own bound.
COALESCE_BATCHES_MAX: Final = 64
# After a failure, the decoder reopens the stream after this, doubling up to the max (jitter).
RETRY_BACKOFF_S_MIN: Final = 0.2
RETRY_BACKOFF_S_MAX: Final = 5.0
# The position is saved at most this often: what a failover re-derives (and republishes as
# duplicates) is at most this much older than what was published last.
POSITION_SAVE_S: Final = 1.0
# Commit times can be out of WAL order by a transaction's commit path, and a promoted standby's
# clock is another host's (router.relays.feed.COMMIT_TIME_MARGIN_S says the same for caches).
COMMIT_TIME_MARGIN_S: Final = 1.0
# The scan of a shard after a new slot (two full scans, once per failover).
RECOVERY_QUERY_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Position:
    repl_slot: str
    epoch: int
    # Commit time (µs since the epoch) of the last transaction whose events were published.
    commit_ts_us: int | None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"repl_slot": self.repl_slot, "epoch": self.epoch, "commit_ts_us": self.commit_ts_us}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Position:
        d = orjson.loads(raw)
        ts = d.get("commit_ts_us")
        return cls(str(d["repl_slot"]), int(d["epoch"]), None if ts is None else int(ts))


class PublishError(Exception):
    """Some event of the call was not stored; what follows it must not be published."""


@dataclass(frozen=True, slots=True)
class Published:
    stored: int
    duplicates: int


class Publisher(Protocol):
    async def publish(self, events: Sequence[model.Event]) -> Published:
        """Store ``events`` in this order (a duplicate id counts as stored), or raise
        PublishError."""
        ...

    async def healthy(self) -> bool:
        """The log answers (the decoder resumes a failed publisher only then)."""
        ...

    async def load_position(self, shard: str) -> Position | None:
        """The shard's saved position (None: never saved); PublishError if unreadable."""
        ...

    async def save_position(self, shard: str, position: Position) -> None:
        """Record it (PublishError on failure)."""
        ...

    async def close(self) -> None: ...


class JetStreamPublisher:
    """Publishes into ``TXR_EVENTS`` with ``Nats-Msg-Id`` = event id. Connects on first use
    (and again after ``close``), so a relay starts while NATS is still down."""

    def __init__(self, servers: Sequence[str], *, name: str) -> None:
        self._servers = list(servers)
        self._name = name
        self._nc: NATS | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> NATS:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await stream.connect(self._servers, name=self._name)
            return self._nc

    async def healthy(self) -> bool:
        try:
            nc = await self._client()
            js = nc.jetstream(timeout=stream.JS_API_TIMEOUT_S)
            await js.stream_info(stream.STREAM)
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError):
            return False
        return True

    async def _positions(self) -> KeyValue:
        nc = await self._client()
        return await nc.jetstream(timeout=stream.JS_API_TIMEOUT_S).key_value(
            stream.POSITIONS_BUCKET
        )

    async def load_position(self, shard: str) -> Position | None:
        try:
            kv = await self._positions()
            entry = await kv.get(shard)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            raise PublishError(f"position of {shard}: {exc!r}") from exc
        return Position.from_json(entry.value) if entry.value else None

    async def save_position(self, shard: str, position: Position) -> None:
        try:
            kv = await self._positions()
            await kv.put(shard, position.to_json())
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            raise PublishError(f"position of {shard}: {exc!r}") from exc

    async def publish(self, events: Sequence[model.Event]) -> Published:
        try:
            nc = await self._client()
        except stream.StreamUnavailable as exc:
            raise PublishError(str(exc)) from exc
        self._js = nc.jetstream(timeout=stream.JS_API_TIMEOUT_S)
        stored = dups = 0
        for start in range(0, len(events), PUBLISH_WINDOW_MAX):
            window = events[start : start + PUBLISH_WINDOW_MAX]
            try:
                async with asyncio.timeout(PUBLISH_ACK_TIMEOUT_S):
                    futures = [
                        await self._js.publish_async(
                            ev.subject,
                            ev.body(),
                            stream=stream.STREAM,
                            headers={"Nats-Msg-Id": ev.id, "Txr-Tenant": ev.tenant},
                        )
                        for ev in window
                    ]
                    acks = await asyncio.gather(*futures)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise PublishError(f"{type(exc).__name__}: {exc}") from exc
            for ack in acks:
                stored += 1
                dups += bool(ack.duplicate)
        return Published(stored, dups)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                log.warning("events: closing the NATS client: %r", exc)


class EventSink:
    """One shard decoder's publisher (module docstring). ``applied`` is the acknowledged
    position of the current stream session, None until the session starts."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        shard: str,
        region: str,
        home_region: str,
        metrics: Metrics | None = None,
        store: Callable[[], Awaitable[ShardStore]] | None = None,
    ) -> None:
        self.publisher = publisher
        self.store = store
        self._session: tuple[str, int] | None = None
        self._recover = False
        self._saved_at = 0.0
        self.recoveries = 0
        self.shard = shard
        self.region = region
        self.home_region = home_region
        self.metrics = metrics
        self.queue: asyncio.Queue[FeedBatch] = asyncio.Queue(EVENT_QUEUE_BATCHES_MAX)
        self.applied: int | None = None
        self.failed = False
        self.published = 0
        if metrics is not None:
            metrics.events_queue_batches.labels(region, shard).set_function(self.queue.qsize)

    def begin(self, start_lsn: int, repl_slot: str, epoch: int) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.applied = start_lsn
        self.failed = False
        self._session = (repl_slot, epoch)
        self._recover = True

    async def _recover_gap(self) -> None:
        """Before the session's first batch: publish what a new slot cannot show (module
        docstring). Raises PublishError (or StoreError) to fail the session."""
        assert self._session is not None
        repl_slot, epoch = self._session
        pos = await self.publisher.load_position(self.shard)
        if pos is not None and (pos.repl_slot == repl_slot or pos.epoch > epoch):
            # Ours already (a restart on the same slot), or a newer epoch's decoder owns it.
            return
        if self.store is None:
            raise PublishError("no store to read the rows a new slot skipped")
        since = None
        if pos is not None and pos.commit_ts_us is not None:
            since = dt.datetime.fromtimestamp(pos.commit_ts_us / 1e6, dt.UTC) - dt.timedelta(
                seconds=COMMIT_TIME_MARGIN_S
            )
        store = await self.store()
        accounts, transfers = await store.event_rows_since(
            since, timeout_s=RECOVERY_QUERY_TIMEOUT_S
        )
        events = model.events_of_rows(
            accounts, transfers, shard=self.shard, home_region=self.home_region, since=since
        )
        log.warning(
            "events %s: new replication slot %s; publishing %d events of rows committed since %s",
            self.shard,
            repl_slot,
            len(events),
            since,
        )
        if events:
            await self.publisher.publish(events)
        self.recoveries += 1
        await self.publisher.save_position(
            self.shard, Position(repl_slot, epoch, None if pos is None else pos.commit_ts_us)
        )

    def offer(self, batch: FeedBatch) -> None:
        if self.failed:
            return
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self._fail(f"{EVENT_QUEUE_BATCHES_MAX} batches queued")

    def _fail(self, why: str) -> None:
        if not self.failed:
            log.warning("events %s: publisher behind (%s); resuming from the slot", self.shard, why)
            if self.metrics is not None:
                self.metrics.events_publish_failures.labels(self.region, self.shard).inc()
        self.failed = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def run_once(self) -> bool:
        """Publish the next queued batch. False once the publisher failed (the decoder then
        reopens its stream from the slot)."""
        if self._recover:
            try:
                await self._recover_gap()
            except (PublishError, StoreError, LookupError) as exc:
                self._fail(f"recovery after a new slot: {exc}")
                return False
            self._recover = False
        batches = [await self.queue.get()]
        # Everything queued behind it goes in the same pipelined publish: one acknowledgement
        # round trip (a quorum across the WAN) per call, not per feed batch, or a shard's
        # publisher would be capped at one batch per RTT.
        while len(batches) < COALESCE_BATCHES_MAX and not self.queue.empty():
            batches.append(self.queue.get_nowait())
        if self.failed:
            return False
        txns = [t for b in batches for t in b.txns]
        last = batches[-1]
        events: list[model.Event] = []
        try:
            for txn in txns:
                events += model.events_of(txn, shard=self.shard, home_region=self.home_region)
        except (ValueError, KeyError, TypeError) as exc:
            # Never skipped: the slot keeps the transaction, and the operator sees this.
            log.error("events %s: cannot derive events before %X: %r", self.shard, last.to_lsn, exc)
            self._fail("derivation failed")
            return False
        if events:
            try:
                result = await self.publisher.publish(events)
            except PublishError as exc:
                self._fail(str(exc))
                return False
            self.published += result.stored
            if self.metrics is not None:
                self.metrics.events_published.labels(self.region, self.shard).inc(result.stored)
                if result.duplicates:
                    self.metrics.events_duplicates.labels(self.region, self.shard).inc(
                        result.duplicates
                    )
                now = time.time()
                hist = self.metrics.events_commit_to_ack.labels(self.region, self.shard)
                for txn in txns:
                    hist.observe(max(0.0, now - txn.commit_time.timestamp()))
        self.applied = last.to_lsn
        if txns and self._session is not None:
            now = time.monotonic()
            if now - self._saved_at >= POSITION_SAVE_S:
                self._saved_at = now
                ts = int(txns[-1].commit_time.timestamp() * 1_000_000)
                try:
                    await self.publisher.save_position(
                        self.shard, Position(self._session[0], self._session[1], ts)
                    )
                except PublishError as exc:
                    # Not a loss: a later failover re-derives from an older time (duplicates).
                    log.warning("events %s: position not saved: %s", self.shard, exc)
        return True
