"""Publishing events: a small interface, its JetStream implementation, and the decoder's sink.

``Publisher`` is what the decoder needs of an event log: store these events in this order, or
fail. ``router.events.jetstream.JetStreamPublisher`` is the NATS one; a Kafka publisher
(idempotent producer, one partition per tenant) would implement the same two methods.

``EventSink`` runs inside one shard's decoder (``router.relays.feed.ShardFeed``) beside the
region sinks: it receives every durable batch in commit order, derives its events
(``router.events.model``), publishes them and records the batch's end as its acknowledged
position. The decoder confirms to the replication slot the minimum of every region's position
and this one, so a publisher that dies, or loses NATS, leaves the slot holding everything it had
not acknowledged: the decoder reopens the stream there and publishes again (ids are stable, the
stream drops the duplicates).

Order. The events of one account (``Event.accounts``: the account opened, a transfer's source
and destination) are stored in its shard's commit order, by construction: ``waves`` splits a
call's events so that no wave holds events of one account from two transactions, each wave's
publishes are pipelined, and a wave is sent only once every publish of the waves before it was
acknowledged. So an event is sent only after every event of its accounts from an earlier
commit is stored: when publish k fails (rejected, lost with a connection or a route, a leader
change), no event of k's accounts from a later commit was sent, and none can be stored ahead of
k. Pipelining past an unacknowledged event of the same account would not be safe even with
de-duplication: a later event stored while k was not would stay ahead of k when k is
republished (the republish of the later one is a dropped duplicate, not a move). Events of one
transaction share its commit and a wave: after a partial failure they may be stored in another
order among themselves. Events of different accounts may be stored in another order than their
commits. A hot account costs one acknowledgement round trip per transaction of it in a call; a
call of distinct accounts costs one.

Position. A failed call acknowledges the end of the last transaction all of whose events are
within the contiguous stored prefix (``PublishError.stored``), never past the first event not
stored; the session ends and the next starts at the slot's confirmed position, so everything
from the first unstored event on is published again (what was stored is a duplicate).

A new replication slot (after a failover: PostgreSQL 15 slots do not follow a promotion; or
the first start) begins at the new primary's current position: the commits between the last
published one and that position never come through the stream. The publisher keeps its
``Position`` (the slot it follows, the commit time of the last transaction it published; saved
at most every ``POSITION_SAVE_S``) in the log's own store, and when a session's slot is not the
one recorded it first publishes the events of every row committed since that time minus
``COMMIT_TIME_MARGIN_S`` (``regionstore``'s ``event_rows_page``, in pages of
``RECOVERY_PAGE_ROWS``; everything when no position was ever saved), then records the new
slot. What it publishes twice is within the duplicate window, so the stream keeps one copy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from consistency import coherence
from regionstore.changefeed import FeedBatch
from regionstore.changes import CommittedTxn
from regionstore.errors import StoreError
from regionstore.store import ShardStore
from router.events import model
from router.metrics import Metrics

log = logging.getLogger(__name__)

# Events of one wave published before their acknowledgements are awaited (pipelined): the
# stream's acknowledgement needs a quorum round trip across the WAN, so one-at-a-time would cap
# a shard at one event per RTT (``waves`` keeps that cap for one account only). Also the bound
# of publishes awaiting an acknowledgement per publisher (one call, one wave at a time).
PUBLISH_WINDOW_MAX: Final = 1024
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
# The scan of a shard after a new slot, in keyset pages of this many rows (one page's rows and
# events in memory at a time; each page is published before the next is read).
RECOVERY_PAGE_ROWS: Final = 1000
# One page's query (a scan of the table: the filter is on commit timestamps, which no index has).
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
    """Some event of the call was not stored. ``stored``: how many of the call's events, from
    the first, are known to be stored (a contiguous prefix; later ones may be stored too)."""

    def __init__(self, message: str, stored: int = 0) -> None:
        super().__init__(message)
        self.stored = stored


@dataclass(frozen=True, slots=True)
class Published:
    stored: int
    duplicates: int


def waves(events: Sequence[model.Event]) -> list[list[int]]:
    """The call's events (indices, commit order kept inside each) in waves that are sent one
    after the other, each once the one before is acknowledged: an event is in the wave after
    the latest wave holding an event of one of its accounts from an earlier transaction, so no
    wave holds events of one account from two transactions. The events of one transaction (a
    batch commits many transfers of one account at once) share a wave: they have one commit,
    and the ledger itself commits a hot account's transactions one at a time (its row lock is
    held through the synchronous commit's round trip), so a wave per transaction keeps the
    publisher's rate per account of the same order as the ledger's. The rows re-derived after a
    new slot (``end_lsn`` 0) are each their own transaction. At most ``PUBLISH_WINDOW_MAX``
    events a wave: a longer one is split into consecutive waves (the order holds: each still
    waits for the ones before)."""
    # Per account: its latest transaction in the call, the highest wave of that transaction's
    # events of it, and the highest wave of its earlier transactions' events.
    state: dict[str, tuple[int, int, int]] = {}
    by_wave: list[list[int]] = []
    for i, ev in enumerate(events):
        txn = ev.end_lsn if ev.end_lsn else -1 - i
        w = 0
        for a in ev.accounts:
            st = state.get(a)
            if st is not None:
                w = max(w, 1 + (st[2] if st[0] == txn else st[1]))
        if w == len(by_wave):
            by_wave.append([])
        by_wave[w].append(i)
        for a in ev.accounts:
            st = state.get(a)
            if st is None:
                state[a] = (txn, w, -1)
            elif st[0] == txn:
                state[a] = (txn, max(st[1], w), st[2])
            else:
                state[a] = (txn, w, st[1])
    return [
        wave[start : start + PUBLISH_WINDOW_MAX]
        for wave in by_wave
        for start in range(0, len(wave), PUBLISH_WINDOW_MAX)
    ]


class Publisher(Protocol):
    async def publish(self, events: Sequence[model.Event]) -> Published:
        """Store ``events`` (a duplicate id counts as stored), each event only after every
        earlier event of its accounts is stored (module docstring, "Order"), or raise
        PublishError with the stored prefix."""
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


def acknowledged_through(
    txns: Sequence[CommittedTxn], events: Sequence[model.Event], stored: int
) -> int | None:
    """After a failed call: the end of the last transaction all of whose events are among the
    first ``stored`` (None: no transaction is). ``events`` are the call's, derived from
    ``txns`` in order, so a transaction that ends before the first unstored event's is
    complete, and none at or after it is."""
    if stored >= len(events):
        return txns[-1].end_lsn if txns else None
    first_missing = events[stored].end_lsn
    ends = [t.end_lsn for t in txns if t.end_lsn < first_missing]
    return max(ends, default=None)


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

    async def recover_gap(self) -> None:
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
        log.warning(
            "events %s: new replication slot %s; publishing the events of rows committed since %s",
            self.shard,
            repl_slot,
            since,
        )
        published = 0
        # Accounts first (an account's opening precedes its transfers), then transfers, each in
        # (created_at, id) pages: one page in memory, published before the next is read.
        for table in ("accounts", "transfers"):
            after: tuple[Any, Any] | None = None
            while True:
                rows = await store.event_rows_page(
                    table,
                    since,
                    after,
                    limit=RECOVERY_PAGE_ROWS,
                    timeout_s=RECOVERY_QUERY_TIMEOUT_S,
                )
                accounts, transfers = (rows, []) if table == "accounts" else ([], rows)
                events = model.events_of_rows(
                    accounts, transfers, shard=self.shard, home_region=self.home_region, since=since
                )
                if events:
                    await self.publisher.publish(events)
                    published += len(events)
                if len(rows) < RECOVERY_PAGE_ROWS:
                    break
                after = model.row_page_key(table, rows[-1])
        log.warning("events %s: %d events of the new slot's gap published", self.shard, published)
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
                await self.recover_gap()
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
            log.error(
                "events %s: cannot derive events before %s: %r",
                self.shard,
                coherence.format_lsn(last.to_lsn),
                exc,
            )
            self._fail("derivation failed")
            return False
        if events:
            try:
                result = await self.publisher.publish(events)
            except PublishError as exc:
                through = acknowledged_through(txns, events, exc.stored)
                if through is not None and self.applied is not None:
                    self.applied = max(self.applied, through)
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
