"""The change feed's fan-out: one decoder per shard, next to its primary, into every region.

The relay process of a region runs a ``ShardFeed`` for every shard whose *current* primary is in
that region (``RelayService`` follows the topology, so the decoder moves with the primary at a
failover or switchover, whoever made it). A ``ShardFeed`` reads the shard's stream
(``regionstore.changefeed``: durable commits only, with freshness proofs) and applies every batch
to every region's Redis, one script call per region per batch (``router.feedsink``), then
confirms to the slot the lowest position every region holds.

Per region: its position marker says which repl_slot and position its cache follows. A region
whose call fails (unreachable, timed out) or whose marker does not prove continuity is *behind*:
it gets no batches (its heartbeat stops, so its routers' lag guard sends reads to the primary),
and it keeps holding the slot at its position for ``REGION_HOLD_S`` at most; past that it is
*excluded* and the slot moves on without it. When it answers again:

* its marker still names our repl_slot at or past the slot's position: the stream is reopened
  from the slot's position (every region gets those batches again: harmless, every write is
  forward-only) and it catches up;
* otherwise (excluded meanwhile, Redis restarted, a new repl_slot after a failover): the
  *recovery* invalidates what cannot be proven applied. When the marker records the commit time
  T of the last transaction the region applied and the shard answers, only the accounts whose
  current row was committed at or after T - ``COMMIT_TIME_MARGIN_S`` are dropped
  (``accounts_committed_since``, commit timestamps: every later commit has a later commit time,
  up to the margin); the entries of a previous shard epoch (a failover or switchover starts a new
  one) are carried to the new epoch's keys for every other account. Else every entry of the
  shard in that region is dropped. Either way the generation changes first (in-flight fills are
  fenced), and ``txr_feed_region_resets_total`` counts it by kind.

Why commit timestamps rather than a column the procedures maintain: the commit time is set by
PostgreSQL at commit and WAL-logged (so a promoted standby has its old primary's), needs no
change to the write procedures, and compares with the commit time the stream itself reports for
the last applied transaction, on the same clock (the old primary's). A column written with
``now()`` would carry the transaction's *start*, which can precede an earlier commit by the
transaction's whole length.

Events: an ``EventSink`` (``router.events.publisher``) gets every batch too and publishes its
events; the slot's confirmed position is the minimum of every region's and the publisher's
acknowledged position, so a publisher that failed resumes, after a jittered back-off, from a
reopened stream, and nothing is skipped (no hold limit here: events are never given up).

Freshness: each region's heartbeat (``through``) is the newest proof instant whose position that
region has applied, written in the same script as the batch. A behind region's heartbeat stops.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from consistency import coherence
from consistency.topology import Shard, Topology
from regionstore.changefeed import (
    BATCH_TXNS_MAX,
    ChangeFeed,
    FeedBatch,
    FeedError,
    FeedStart,
)
from regionstore.changes import committed_accounts
from regionstore.errors import StoreError
from regionstore.store import ShardStore
from router.events.publisher import RETRY_BACKOFF_S_MAX as EVENTS_BACKOFF_S_MAX
from router.events.publisher import RETRY_BACKOFF_S_MIN as EVENTS_BACKOFF_S_MIN
from router.events.publisher import EventSink
from router.feedsink import FEED_CALLS_IN_FLIGHT_MAX, FeedEntries, Marker, RegionSink
from router.metrics import Metrics
from router.redisconn import CacheUnavailable

log = logging.getLogger(__name__)

# A region unreachable for longer than this no longer holds the replication slot back: the
# primary keeps WAL for it meanwhile (bounded by max_slot_wal_keep_size too). A minute covers a
# Redis restart or a short partition, after which the region catches up from its position; a
# longer outage costs that region a (partial) invalidation instead of the primary's disk.
REGION_HOLD_S: Final = 60.0
# Commit times are taken before the commit record is inserted, so two concurrent commits can
# carry times out of their WAL order by up to the time between taking it and inserting the
# record; after a failover the new primary's clock is another host's. One second covers both
# (NTP keeps hosts within milliseconds) at the price of invalidating the accounts committed in
# the last second before the region's last confirmed commit as well.
COMMIT_TIME_MARGIN_S: Final = 1.0
# A behind region is asked again after this, doubling up to the max (full jitter).
PROBE_BACKOFF_S_MIN: Final = 0.2
PROBE_BACKOFF_S_MAX: Final = 5.0
# Reopening the stream after a failure: exponential with full jitter.
RETRY_BACKOFF_S_MIN: Final = 0.1
RETRY_BACKOFF_S_MAX: Final = 5.0
# The recovery's query of the shard (a full scan of its accounts, once per failover).
RECOVERY_QUERY_TIMEOUT_S: Final = 30.0
# One region's marker read, batch or reset step must finish within this (the Redis client's own
# timeout bounds each round trip; a sweep is several).
REGION_CALL_TIMEOUT_S: Final = 60.0
# Batches queued for one region. Each region applies on its own task, so a slow or unreachable
# region never delays the others; one that falls this far behind (at one batch per heartbeat
# while idle, or per durable round under load: seconds of commits) is treated as unreachable.
REGION_QUEUE_BATCHES_MAX: Final = 1024
# Encoded batches kept for the other regions' workers (ShardFeed._entries): a region that is
# further behind than this re-encodes, which costs CPU only.
ENTRIES_MEMO_BATCHES: Final = 4
# While a region's calls are in flight, the next one goes out this long after the one before:
# what queued meanwhile rides in it (coalesce). A far region's commits then wait at most this
# before they leave (against a whole round trip, 190 ms, when calls went one at a time), and
# no region gets more than 1/this calls a second however slow its link; a near region's calls
# answer sooner, and the next then goes out at once, as before.
FEED_CALL_SPACING_S: Final = 0.005
# A stopping session waits this long at most for its region workers to end.
WORKER_STOP_TIMEOUT_S: Final = 5.0


class TopologySource(Protocol):
    @property
    def current(self) -> Topology: ...


StoreFor = Callable[[str], Awaitable[ShardStore]]


@dataclass(slots=True)
class _Region:
    name: str
    sink: RegionSink
    queue: asyncio.Queue[FeedBatch] = field(
        default_factory=lambda: asyncio.Queue(REGION_QUEUE_BATCHES_MAX)
    )
    # "attaching" (until its marker is checked), "ok" (applies batches), "recovering" (batches
    # queue up while what cannot be proven is invalidated), "behind" (gets nothing), "waiting"
    # (answers again and can catch up: the stream is reopened for it).
    state: str = "attaching"
    # The position this region's marker holds on the current stream; None until attached.
    applied: int | None = None
    behind_since: float | None = None
    # Monotonic instant up to which every acknowledged commit is in this region; None unknown.
    through: float | None = None
    excluded: bool = False
    # A batch taken from the queue that did not fit into the last coalesced call: the next
    # call starts with it (ShardFeed._next_batch).
    carry: FeedBatch | None = None

    def drop_queued(self) -> None:
        """Forget every batch waiting for this region (it is behind, or being recovered)."""
        self.carry = None
        while not self.queue.empty():
            self.queue.get_nowait()


@dataclass(slots=True)
class _Call:
    """A batch sent to a region, not answered yet."""

    batch: FeedBatch
    # The freshness the region has once this call is applied (its heartbeat's "through").
    through: float | None
    entries: int
    answer: asyncio.Future[int | str]
    sent: float
    deadline: float


class _Restart(Exception):
    """Reopen the stream (a region can catch up from the slot's position)."""


class _Moved(Exception):
    """The topology moved the shard's primary or epoch: this feed is no longer the shard's."""


class ShardFeed:
    """One shard's decoder and its fan-out (module docstring)."""

    def __init__(
        self,
        shard: str,
        *,
        region: str,
        topology: TopologySource,
        sinks: Mapping[str, RegionSink],
        conninfo: Callable[[Shard], str],
        store_for: StoreFor | None,
        metrics: Metrics | None = None,
        hold_s: float = REGION_HOLD_S,
        events: EventSink | None = None,
    ) -> None:
        self.shard = shard
        self.events = events
        self._events_backoff = EVENTS_BACKOFF_S_MIN
        self.region = region
        self.topology = topology
        self.conninfo = conninfo
        self.store_for = store_for
        self.metrics = metrics
        self.hold_s = hold_s
        self.sinks = dict(sinks)
        self.regions: dict[str, _Region] = {}
        self.feed: ChangeFeed | None = None
        self.start: FeedStart | None = None
        self.restarts = 0
        self.resets: dict[str, list[str]] = {name: [] for name in sinks}
        self._latest_proof: float | None = None
        self._last_commit_us: int | None = None
        self._entries_memo: OrderedDict[int, tuple[FeedBatch, int, FeedEntries]] = OrderedDict()
        self._restart_wanted = False
        self._moved = False
        self._stopping = False
        self._rng = random.Random()
        self._export()

    # -- the read path's and the tests' view ---------------------------------------------------

    def lag(self, region: str) -> float | None:
        """Seconds ``region``'s cache may be behind this shard's commits; None = unknown."""
        r = self.regions.get(region)
        if r is None or r.through is None or r.state != "ok":
            return None
        return max(0.0, time.monotonic() - r.through)

    def applied(self, region: str) -> int | None:
        r = self.regions.get(region)
        return None if r is None else r.applied

    def state(self, region: str) -> str | None:
        r = self.regions.get(region)
        return None if r is None else r.state

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled or the topology moves the primary away (then it returns)."""
        backoff = RETRY_BACKOFF_S_MIN
        reason = "start"
        while True:
            shard = self.topology.current.shards.get(self.shard)
            if shard is None or shard.primary.region != self.region:
                # The decoder runs next to the primary only: another region's relay has it now.
                return
            try:
                await self._session(shard, reason)
                return
            except _Moved:
                return
            except _Restart:
                reason = "catch_up"
                backoff = RETRY_BACKOFF_S_MIN
            except (FeedError, OSError, TimeoutError) as exc:
                _raise_if_cancelling()
                reason = "stream_failed"
                log.warning("feed %s: %s: %s; reopening", self.shard, type(exc).__name__, exc)
                await asyncio.sleep(self._rng.uniform(0.0, backoff))
                backoff = min(backoff * 2, RETRY_BACKOFF_S_MAX)

    async def _session(self, shard: Shard, reason: str) -> None:
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.feed_restarts.labels(self.region, self.shard, reason).inc()
        self._restart_wanted = False
        self._moved = False
        self._stopping = False
        # Freshness carries over a restart per region: it was earned by applied batches.
        previous = {name: r.through for name, r in self.regions.items()}
        self.regions = {
            name: _Region(name, sink, through=previous.get(name))
            for name, sink in self.sinks.items()
        }
        self.feed = ChangeFeed(self.shard, self.conninfo(shard))
        workers: list[asyncio.Task[None]] = []
        try:
            self.start = await self.feed.open()
            log.info(
                "feed %s: streaming %s from %s (%s)",
                self.shard,
                self.start.repl_slot,
                coherence.format_lsn(self.start.start_lsn),
                "new repl_slot" if self.start.created else reason,
            )
            workers = [
                asyncio.create_task(
                    self._region_worker(r, shard), name=f"feed-{self.shard}-{r.name}"
                )
                for r in self.regions.values()
            ]
            if self.events is not None:
                self.events.begin(self.start.start_lsn, self.start.repl_slot, shard.epoch)
                workers.append(
                    asyncio.create_task(self._events_worker(), name=f"events-{self.shard}")
                )
            while True:
                self._check_topology(shard)
                batch = await self.feed.next()
                self._check_topology(shard)
                self._hand_out(batch)
                self._confirm()
                if self._restart_wanted:
                    raise _Restart
        finally:
            self._stopping = True
            for w in workers:
                w.cancel()
            # Bounded: a library that swallowed a cancellation must not keep the feed alive;
            # the flag ends such a worker at its next turn.
            if workers:
                await asyncio.wait(workers, timeout=WORKER_STOP_TIMEOUT_S)
            feed, self.feed = self.feed, None
            await feed.close()

    def _check_topology(self, shard: Shard) -> None:
        current = self.topology.current.shards.get(self.shard)
        if (
            self._moved
            or current is None
            or current.primary != shard.primary
            or current.epoch != shard.epoch
        ):
            raise _Moved

    def _hand_out(self, batch: FeedBatch) -> None:
        if batch.txns:
            self._last_commit_us = _to_us(batch.txns[-1].commit_time)
        proof = max((q for _, q in batch.proofs), default=None)
        if proof is not None and (self._latest_proof is None or proof > self._latest_proof):
            self._latest_proof = proof
        for r in self.regions.values():
            # An attaching or recovering region gets its batches queued: the stream is
            # contiguous from where it will stand once its marker is set.
            if r.state not in ("ok", "attaching", "recovering"):
                continue
            try:
                r.queue.put_nowait(batch)
            except asyncio.QueueFull:
                self._behind(r, f"{REGION_QUEUE_BATCHES_MAX} batches queued")
        if self.events is not None:
            self.events.offer(batch)
        if self.metrics is not None:
            self.metrics.feed_batch_txns.labels(self.region, self.shard).observe(len(batch.txns))

    async def _events_worker(self) -> None:
        """Publish batches in order; after a failure, back off and reopen the stream."""
        assert self.events is not None
        while not self._stopping:
            if await self.events.run_once():
                self._events_backoff = EVENTS_BACKOFF_S_MIN
                continue
            # Reopen only once the log answers: each reopen re-reads everything since the
            # slot's position, so a long NATS outage must not turn into a replay loop.
            while not self._stopping:
                await asyncio.sleep(
                    self._rng.uniform(self._events_backoff / 2, self._events_backoff)
                )
                self._events_backoff = min(self._events_backoff * 2, EVENTS_BACKOFF_S_MAX)
                if await self.events.publisher.healthy():
                    break
            self._restart_wanted = True
            return

    # -- one region ----------------------------------------------------------------------------

    async def _region_worker(self, r: _Region, shard: Shard) -> None:
        """Attach, then apply batches in order; when behind, probe until it answers again."""
        backoff = PROBE_BACKOFF_S_MIN
        while not self._stopping:
            try:
                if r.state == "attaching":
                    await self._attach(r, shard)
                elif r.state == "behind":
                    await asyncio.sleep(self._rng.uniform(0.0, backoff))
                    backoff = min(backoff * 2, PROBE_BACKOFF_S_MAX)
                    self._check_excluded(r)
                    await self._probe(r, shard)
                elif r.state == "ok":
                    backoff = PROBE_BACKOFF_S_MIN
                    await self._pipeline(r, shard)
                else:
                    # "waiting": the session reopens the stream at its next batch (a heartbeat
                    # away at most) and ends this worker meanwhile.
                    await asyncio.sleep(PROBE_BACKOFF_S_MIN)
            except (CacheUnavailable, TimeoutError) as exc:
                _raise_if_cancelling()
                self._behind(r, str(exc) or type(exc).__name__)
            except _Moved:
                self._moved = True
                return

    async def _attach(self, r: _Region, shard: Shard) -> None:
        assert self.start is not None
        assert self.feed is not None
        async with asyncio.timeout(REGION_CALL_TIMEOUT_S):
            m = await r.sink.marker(self.shard)
        if m is not None and m.repl_slot == self.start.repl_slot and m.lsn >= self.start.start_lsn:
            if m.epoch is not None and m.epoch != shard.epoch:
                # Same stream, new epoch (an epoch bump on the same primary): carry every entry
                # over, nothing was missed.
                async with asyncio.timeout(REGION_CALL_TIMEOUT_S):
                    await r.sink.copy_epoch(self._slots(), m.epoch, shard.epoch, ())
            r.applied = self.start.start_lsn
            self._healthy(r)
            return
        await self._recover(r, m, shard)

    async def _probe(self, r: _Region, shard: Shard) -> None:
        assert self.start is not None
        assert self.feed is not None
        async with asyncio.timeout(REGION_CALL_TIMEOUT_S):
            m = await r.sink.marker(self.shard)
        if m is not None and m.repl_slot == self.start.repl_slot and m.lsn >= self.feed.confirmed:
            # The slot still holds everything this region lacks: reopen from it.
            log.info("feed %s -> %s: reachable again; catching up", self.shard, r.name)
            self._restart_wanted = True
            r.state = "waiting"
            return
        await self._recover(r, m, shard)

    async def _recover(self, r: _Region, m: Marker | None, shard: Shard) -> None:
        """Invalidate in ``r`` what cannot be proven applied; then follow from where the stream
        is now (batches handed out meanwhile queue up behind the recovery)."""
        assert self.start is not None
        assert self.feed is not None
        if m is not None and m.epoch is not None and m.epoch > shard.epoch:
            # A newer epoch's feed owns this region's marker: this feed is the stale one.
            raise _Moved
        # No await between these two lines: every batch handed out after ``pos`` is queued.
        r.drop_queued()
        r.state, pos = "recovering", self.feed.safe_lsn
        slots = self._slots()
        reason = (
            "marker_missing"
            if m is None
            else "repl_slot_changed"
            if m.repl_slot != self.start.repl_slot
            else "marker_behind"
        )
        unproven: list[int] | None = None
        if m is not None and m.commit_ts_us is not None and self.store_for is not None:
            since = _from_us(m.commit_ts_us) - dt.timedelta(seconds=COMMIT_TIME_MARGIN_S)
            try:
                store = await self.store_for(self.shard)
                unproven = await store.accounts_committed_since(
                    since, timeout_s=RECOVERY_QUERY_TIMEOUT_S
                )
            except (StoreError, LookupError) as exc:
                log.warning(
                    "feed %s: cannot list recent accounts (%s): full reset", self.shard, exc
                )
        async with asyncio.timeout(REGION_CALL_TIMEOUT_S):
            if unproven is not None and m is not None:
                epochs = {shard.epoch} if m.epoch is None else {shard.epoch, m.epoch}
                await r.sink.drop_accounts(unproven, epochs)
                copied = 0
                if m.epoch is not None and m.epoch != shard.epoch:
                    copied = await r.sink.copy_epoch(slots, m.epoch, shard.epoch, unproven)
                kind, ts = "partial", m.commit_ts_us
                log.warning(
                    "feed %s -> %s: %s; dropped %d recently written accounts, carried %d entries",
                    self.shard,
                    r.name,
                    reason,
                    len(unproven),
                    copied,
                )
            else:
                dropped = await r.sink.drop_shard(slots)
                kind, ts = "full", self._last_commit_us
                log.warning(
                    "feed %s -> %s: %s; dropped all %d entries of the shard",
                    self.shard,
                    r.name,
                    reason,
                    dropped,
                )
            await r.sink.set_marker(self.shard, Marker(self.start.repl_slot, pos, ts, shard.epoch))
        r.applied = pos
        self.resets[r.name].append(kind)
        if self.metrics is not None:
            self.metrics.feed_region_resets.labels(
                self.region, self.shard, r.name, kind, reason
            ).inc()
        self._healthy(r)

    def _healthy(self, r: _Region) -> None:
        r.state = "ok"
        r.behind_since = None
        r.excluded = False
        if self.metrics is not None:
            self.metrics.feed_region_excluded.labels(self.region, self.shard, r.name).set(0)

    def _behind(self, r: _Region, why: str) -> None:
        if r.state != "behind":
            log.warning("feed %s -> %s: behind (%s)", self.shard, r.name, why)
        r.state = "behind"
        r.drop_queued()
        if r.behind_since is None:
            r.behind_since = time.monotonic()

    def _check_excluded(self, r: _Region) -> None:
        if r.excluded or r.behind_since is None:
            return
        if time.monotonic() - r.behind_since > self.hold_s:
            r.excluded = True
            log.warning(
                "feed %s -> %s: unreachable for %.0fs, no longer holds the slot back",
                self.shard,
                r.name,
                self.hold_s,
            )
            if self.metrics is not None:
                self.metrics.feed_region_excluded.labels(self.region, self.shard, r.name).set(1)

    async def _next_batch(self, r: _Region) -> FeedBatch:
        """The region's next call: its next batch and every batch queued behind it, as one
        (``coalesce``, which says why)."""
        first = r.carry if r.carry is not None else await r.queue.get()
        batch, r.carry, merged = coalesce(first, r.queue)
        if merged and self.metrics is not None:
            self.metrics.feed_coalesced.labels(self.region, self.shard, r.name).inc(merged)
        return batch

    async def _pipeline(self, r: _Region, shard: Shard) -> None:
        """Apply batches in order while ``r`` is healthy. With nothing in flight a batch goes
        out at once. While calls are in flight (a far region: ``router.feedsink`` says why),
        the next goes out ``FEED_CALL_SPACING_S`` after the previous one, with everything
        queued meanwhile coalesced into it, up to ``FEED_CALLS_IN_FLIGHT_MAX`` unanswered;
        answers are taken in order. Returns when the region is no longer "ok"; the calls it
        leaves in flight are harmless (the script checks each against the marker) and are
        not counted as applied."""
        calls: deque[_Call] = deque()
        sent_through = r.through
        getter: asyncio.Task[FeedBatch] | None = None
        try:
            while r.state == "ok" and not self._stopping:
                if not calls:
                    call = await self._send(r, shard, await self._next_batch(r), sent_through)
                    sent_through = call.through
                    calls.append(call)
                    continue
                now = time.monotonic()
                ready = r.carry is not None or not r.queue.empty()
                room = len(calls) < FEED_CALLS_IN_FLIGHT_MAX
                send_at = calls[-1].sent + FEED_CALL_SPACING_S
                if ready and room and now >= send_at:
                    call = await self._send(r, shard, await self._next_batch(r), sent_through)
                    sent_through = call.through
                    calls.append(call)
                    continue
                first = calls[0]
                waits: set[asyncio.Future[Any]] = {first.answer}
                timeout = first.deadline - now
                if not ready:
                    getter = asyncio.ensure_future(r.queue.get())
                    waits.add(getter)
                elif room:
                    timeout = min(timeout, send_at - now)
                await asyncio.wait(
                    waits, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
                )
                if getter is not None:
                    if getter.done():
                        r.carry = getter.result()
                    else:
                        getter.cancel()
                    getter = None
                if first.answer.done():
                    calls.popleft()
                    self._answered(r, first, first.answer.result())
                elif time.monotonic() >= first.deadline:
                    raise TimeoutError(f"no answer in {REGION_CALL_TIMEOUT_S}s")
        finally:
            if getter is not None:
                getter.cancel()

    async def _send(
        self, r: _Region, shard: Shard, batch: FeedBatch, through: float | None
    ) -> _Call:
        assert self.start is not None
        proof = max((q for _, q in batch.proofs), default=None)
        if proof is not None and (through is None or proof > through):
            through = proof
        age = None if through is None else time.monotonic() - through
        entries = self._entries(batch, shard.epoch)
        async with asyncio.timeout(REGION_CALL_TIMEOUT_S):
            answer = await r.sink.send_apply(
                self.shard,
                repl_slot=self.start.repl_slot,
                from_lsn=batch.from_lsn,
                to_lsn=batch.to_lsn,
                commit_ts_us=_to_us(batch.txns[-1].commit_time) if batch.txns else None,
                epoch=shard.epoch,
                entries=entries,
                heartbeat_age_s=age,
                primary=shard.primary.name,
                lag_bytes=batch.lag_bytes,
            )
        sent = time.monotonic()
        return _Call(batch, through, len(entries.keys), answer, sent, sent + REGION_CALL_TIMEOUT_S)

    def _answered(self, r: _Region, call: _Call, written: int | str) -> None:
        if isinstance(written, str):
            self._behind(
                r,
                f"its marker does not prove continuity ({written}, batch from "
                f"{coherence.format_lsn(call.batch.from_lsn)})",
            )
            return
        r.applied = call.batch.to_lsn
        r.through = call.through
        if self.metrics is not None and call.entries:
            self.metrics.feed_applied.labels(self.region, self.shard, r.name).inc(call.entries)

    def _entries(self, batch: FeedBatch, epoch: int) -> FeedEntries:
        """The batch's entries, encoded once for all regions: every region's worker applies
        the same batches in the same order, usually within moments of each other, so the last
        few encodings are kept (each holds its batch, so an id is not reused meanwhile)."""
        memo = self._entries_memo
        hit = memo.get(id(batch))
        if hit is not None and hit[0] is batch and hit[1] == epoch:
            return hit[2]
        entries = FeedEntries.of(epoch, committed_accounts(batch.txns).values())
        memo[id(batch)] = (batch, epoch, entries)
        while len(memo) > ENTRIES_MEMO_BATCHES:
            memo.popitem(last=False)
        return entries

    def _confirm(self) -> None:
        assert self.feed is not None
        held: list[int] = []
        for r in self.regions.values():
            if r.excluded:
                continue
            if r.applied is None:
                return  # a region not attached yet (and not excluded) holds everything
            held.append(r.applied)
        if self.events is not None:
            if self.events.applied is None:
                return
            held.append(self.events.applied)
        if held:
            self.feed.confirm(min(held))

    def _slots(self) -> list[int]:
        return list(self.topology.current.slots.slots_of(self.shard))

    def _export(self) -> None:
        if self.metrics is None:
            return
        for name in self.sinks:

            def lag(name: str = name) -> float:
                value = self.lag(name)
                return math.nan if value is None else value

            def lag_bytes(name: str = name) -> float:
                feed, r = self.feed, self.regions.get(name)
                if feed is None or r is None or r.applied is None:
                    return math.nan
                return float(max(0, feed.flush_hint - r.applied))

            self.metrics.feed_lag_seconds.labels(self.region, self.shard, name).set_function(lag)
            self.metrics.feed_lag_bytes.labels(self.region, self.shard, name).set_function(
                lag_bytes
            )


def coalesce(
    first: FeedBatch, queue: asyncio.Queue[FeedBatch]
) -> tuple[FeedBatch, FeedBatch | None, int]:
    """``first`` and the batches queued behind it as one batch; the one taken that did not fit
    (to start the next call with), and how many were merged into ``first``.

    A region applies one call at a time, so a far region (one WAN round trip per call: 190 ms
    to ap-south under --wan realistic) applied only about five batches a second while the feed
    handed out more (every durable round, every heartbeat): its queue grew, and the remote
    visibility with it (p50 0.6 s, p99 10 s measured). Batches are contiguous, so consecutive
    ones merge: the first's start, the last's end, every transaction in order
    (``committed_accounts`` keeps each account's last change), every proof. At most
    ``changefeed.BATCH_TXNS_MAX`` transactions per call, like one batch of the stream."""
    parts = [first]
    txns = len(first.txns)
    carry: FeedBatch | None = None
    while not queue.empty():
        nxt = queue.get_nowait()
        if nxt.from_lsn != parts[-1].to_lsn or txns + len(nxt.txns) > BATCH_TXNS_MAX:
            carry = nxt
            break
        parts.append(nxt)
        txns += len(nxt.txns)
    if len(parts) == 1:
        return first, carry, 0
    merged = FeedBatch(
        first.from_lsn,
        parts[-1].to_lsn,
        tuple(t for p in parts for t in p.txns),
        tuple(q for p in parts for q in p.proofs),
        parts[-1].lag_bytes,
    )
    return merged, carry, len(parts) - 1


def _to_us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _from_us(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC)


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


__all__ = ["REGION_HOLD_S", "ShardFeed"]
