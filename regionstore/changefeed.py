"""A shard's change feed: one logical replication stream (pgoutput) of its account rows.

What this module owns: the shard's replication slot (``repl_slot``: "slot" alone means a hash
slot in this project), the streaming replication protocol and the durability rule; the
messages' contents are ``regionstore.pgoutput``'s to parse, into ``regionstore.changes``. It
knows nothing of Redis or regions: the caller (the router's fan-out, ``router.relays.feed``)
applies each batch wherever it must and then calls ``confirm``.

Reader: the walsender protocol over psycopg 3's libpq binding (``psycopg.pq``: a connection with
``replication=database``, ``START_REPLICATION``, CopyBoth, ``get_copy_data``), driven by the
event loop (``add_reader`` on the socket). Chosen over the two other candidates:

* ``pg_recvlogical`` as a child writes the plugin's output to a file with a newline after each
  message: fine for test_decoding's text, ambiguous for pgoutput's binary messages (a newline is
  a valid byte inside them), so it would force test_decoding back (every column of every table
  formatted as text, then parsed), which is what made the old relay expensive.
* psycopg2's ``LogicalReplicationConnection`` (a second PostgreSQL driver beside psycopg 3)
  consumes the server's keepalives itself (and advances the flush position it reports on them
  once every received message was confirmed), so a reader cannot see the walsender's position
  between data messages; this one sees every message. Both drive the same libpq underneath, so
  the per-message cost is this parser's either way. (Not measured against each other: the
  choice rests on the framing and keepalive reasons; the cluster-level figures are in the
  change-feed report.)

Publication ``txr_feed`` (migration 0005) publishes ``txr.accounts`` with a column list
(PostgreSQL 15), so the walsender decodes every table's WAL once but sends only the account
columns the caches hold; migration 0007 adds ``txr.transfers`` (the public transfer columns)
and ``txr.slot_moves`` (its key) for the ledger events (``router.events``): a transaction's
transfer changes are in ``CommittedTxn.transfers``, and ``slot_move`` marks a slot move's copy.
``txr.ledger_entries`` and the rest never leave the server.

Durability (G1 before G6). The walsender sends a commit once the *primary* flushed it, before
the synchronous standby did; a failover could undo such a commit. ``next()`` therefore returns a
transaction only once the synchronous standby's flush position covers its end: received
commits wait in ``pending`` and the standby's position is asked (one small query on an ordinary
connection) only while something is pending: first once the standby's own flush lag has passed
since the commit arrived, then again after a short bounded back-off.

Freshness proofs. A batch carries ``proofs``: pairs (lsn L, instant q, this host's monotonic
clock) meaning "every commit acknowledged to a client before q ends at or before L". They come
from the same state query: it reads the primary's WAL flush position F at a moment after q (the
query starts at q); any commit acknowledged before q was flushed before q. Once the caller has
applied everything up to L in a region, that region is fresh as of q. While idle the feed asks
only for ``pg_current_wal_flush_lsn()`` (no table, no slot is read) once per
``HEARTBEAT_INTERVAL_S``; the walsender's keepalive (asked for in the same beat) tells that the
stream has passed F. A pure keepalive scheme (equal positions in consecutive keepalives) was
considered and rejected: a walsender that has not yet noticed a flush answers a keepalive with
its old position, so it proves nothing about commits already acknowledged.

Positions: ``safe`` is the position up to which every commit was handed out by ``next()``
(everything before the first pending commit, or the walsender's last reported position);
``confirm(lsn)`` (never past ``safe``) becomes the slot's flush position in the next status
update, so the slot keeps the WAL of everything some region has not applied yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq.abc import PGconn

from consistency import coherence
from regionstore.changes import CommittedTxn
from regionstore.pgoutput import PG_EPOCH, PG_USEC, PROTO_VERSION, PgOutputError, PgOutputParser

log = logging.getLogger(__name__)

PUBLICATION: Final = "txr_feed"
REPL_SLOT_PREFIX: Final = "txr_feed_"
# PostgreSQL identifiers are at most 63 bytes; prefix + 24 + '_' + 8 hash + '_' + 8 random.
REPL_SLOT_SHARD_CHARS_MAX: Final = 24
REPL_SLOT_HASH_HEX: Final = 8
REPL_SLOT_INCARNATION_HEX: Final = 8

# Commits handed out in one batch: bounds one Redis script per region (a few ms of Redis time at
# the worst) and the memory of a batch. Past it the rest waits for the next call.
BATCH_TXNS_MAX: Final = 512
# Received commits waiting for the synchronous standby: the reader stops reading the socket
# (TCP then pushes back on the walsender) past this, so a standby that stalls cannot grow the
# decoder's memory without bound.
PENDING_TXNS_MAX: Final = 20_000
# After a state query found the oldest pending commit not yet durable: ask again after this,
# doubling up to the max. The first re-ask comes quickly because the standby's acknowledgement
# usually lands within a round trip of the walsender's send; the cap bounds the query rate
# while a standby is slow (then commits wait too, so latency is not what is lost).
DURABLE_RECHECK_S_MIN: Final = 0.001
DURABLE_RECHECK_S_MAX: Final = 0.05
# The first question about a newly received commit waits for the standby's own flush lag
# (pg_stat_replication.flush_lag, read by every state query: PostgreSQL's measure of local flush
# to the standby's flush acknowledgement), about one round trip to the standby's region (70-190
# ms under --wan realistic). Asking at once and then backing off found such a commit up to the
# back-off's cap (50 ms) late, and under load it asked twice per round, the first time always
# too early. A lag above this is a stalled standby, not a far one: the back-off covers it.
DURABLE_WAIT_S_MAX: Final = 0.5
# While nothing is pending: one flush-position query and one keepalive request this often, and
# each is one script call on every region's Redis (two of three across the WAN). An idle
# region's routers see a lag of at most about this, plus the beat's way to the farthest Redis
# (one RTT: 190 ms under --wan realistic), plus their own refresh (RELAY_LAG_REFRESH_S, 0.1 s),
# against the bound router.limits.CACHED_LAG_BOUND_S (1 s): 0.4 s leaves 0.3 s for a loaded
# machine before an idle shard's cached reads fall back to its primary (which is safe, only
# slower). Under load the batches carry the proofs and the beat matters less. It was 0.2 s: its
# rounds were a fifth of an idle cluster's CPU (relays, Redis, WAN, primaries).
# tests/unit/test_idle_intervals.py holds the sum under the bound.
HEARTBEAT_INTERVAL_S: Final = 0.4
# Status updates carry our flush position; the server drops a silent client after
# wal_sender_timeout (10 s locally), and heartbeats go out far more often than that anyway.
STATEMENT_TIMEOUT_MS: Final = 5000
CONNECT_TIMEOUT_S: Final = 5
# A keepalive or data from the walsender at least this often (we ask every heartbeat), or the
# stream is considered hung and closed (the caller reconnects).
STREAM_SILENCE_S_MAX: Final = 10.0

# The synchronous standbys' flush position (the durable end of WAL), or the local flush position
# when the primary runs without a synchronous standby; NULL while one is configured but none
# reports (nothing is durable then). The local flush position, for freshness proofs. And the
# standby's flush lag (DURABLE_WAIT_S_MAX), NULL while it has nothing to measure. One scan of
# pg_stat_replication: an aggregate without GROUP BY is always one row.
_STATE_SQL: Final = """
SELECT CASE WHEN current_setting('synchronous_standby_names') = ''
            THEN pg_current_wal_flush_lsn() ELSE s.flush END,
       pg_current_wal_flush_lsn(),
       extract(epoch FROM s.lag)::float8
  FROM (SELECT min(flush_lsn) AS flush, max(flush_lag) AS lag FROM pg_stat_replication
         WHERE sync_state IN ('sync', 'quorum')) AS s
"""
_FLUSH_SQL: Final = "SELECT pg_current_wal_flush_lsn()"


class FeedError(Exception):
    """The stream or its connection failed; the caller closes the feed and opens a new one."""


class ReplSlotLost(FeedError):
    """The replication slot is gone or unusable: nothing can prove what was skipped."""


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Durable commits in commit order, positions ``(from_lsn, to_lsn]`` of this stream."""

    from_lsn: int
    to_lsn: int
    txns: tuple[CommittedTxn, ...]
    proofs: tuple[tuple[int, float], ...]
    # Bytes of WAL between the primary's flush position and what was handed out: a backlog
    # indicator (every table's WAL counts), None until the first state query.
    lag_bytes: int | None


@dataclass(frozen=True, slots=True)
class FeedStart:
    repl_slot: str
    # Where the stream starts: the slot's confirmed flush position.
    start_lsn: int
    created: bool


def _finish_started(fut: asyncio.Future[PGconn]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().finish()


# -- stream framing --------------------------------------------------------------------------


def status_update(write: int, flush: int, apply: int, *, reply: bool) -> bytes:
    """A standby status update ('r'): positions +1 are not needed; time in PG epoch µs."""
    now = int((dt.datetime.now(dt.UTC) - PG_EPOCH) / PG_USEC)
    return b"r" + struct.pack("!QQQqb", write, flush, apply, now, 1 if reply else 0)


def repl_slot_prefix(shard: str) -> str:
    """``txr_feed_<shard>_<hash>_``: every incarnation of ``shard``'s replication slot."""
    clean = re.sub(r"[^a-z0-9_]", "_", shard.lower())[:REPL_SLOT_SHARD_CHARS_MAX]
    digest = hashlib.sha256(shard.encode()).hexdigest()[:REPL_SLOT_HASH_HEX]
    prefix = f"{REPL_SLOT_PREFIX}{clean}_{digest}_"
    assert len(prefix) + REPL_SLOT_INCARNATION_HEX <= 63
    return prefix


# -- the feed --------------------------------------------------------------------------------


class ChangeFeed:
    """One shard's stream. ``open`` -> ``next``/``confirm`` ... -> ``close``; single consumer.

    ``repl_conninfo``: the primary for a role with REPLICATION (and pg_read_all_stats, to see
    the standbys' positions); the same conninfo serves the ordinary state connection.
    """

    def __init__(self, shard: str, repl_conninfo: str) -> None:
        self.shard = shard
        self._conninfo = repl_conninfo
        self._pgconn: PGconn | None = None
        self._sql: psycopg.AsyncConnection[Any] | None = None
        self._parser = PgOutputParser()
        self._pending: deque[CommittedTxn] = deque()
        # When each pending commit arrived (this host's monotonic clock), in the same order.
        self._arrived: deque[float] = deque()
        # The standby's last reported flush lag (DURABLE_WAIT_S_MAX says why), in seconds.
        self._durable_wait_s = 0.0
        # Whether the current oldest pending commit was asked about already.
        self._asked_once = False
        self._durable = 0
        self._flush_hint = 0
        self._wal_end = 0
        self._safe = 0
        self._handed = 0
        self._confirmed = 0
        self._proofs: list[tuple[int, float]] = []
        self._lag_bytes: int | None = None
        self._wake = asyncio.Event()
        self._error: BaseException | None = None
        self._reading = False
        self._fd = -1
        self._last_rx = time.monotonic()
        self._next_beat = 0.0
        self._recheck_s = DURABLE_RECHECK_S_MIN
        self._recheck_at = 0.0
        self.repl_slot: str | None = None
        self.messages = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, create: bool = True) -> FeedStart:
        """Find (or create) the shard's slot and start streaming from its confirmed position.

        Raises ``ReplSlotLost`` when no usable slot exists and ``create`` is False.
        """
        self._sql = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )
        slot, start, created = await self._attach(create)
        self.repl_slot = slot
        # The blocking connect runs in a thread, which a cancellation cannot stop: shield it and
        # close what it opens, or a leaked walsender would keep the slot active.
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_stream, slot, start))
        try:
            self._pgconn = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_finish_started)
            raise
        self._safe = self._handed = self._confirmed = self._wal_end = start
        self._pgconn.nonblocking = 1
        # Kept: a broken connection no longer tells its socket, and the reader must go.
        self._fd = self._pgconn.socket
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self._reading = True
        self._last_rx = time.monotonic()
        return FeedStart(slot, start, created)

    async def close(self) -> None:
        conn, self._pgconn = self._pgconn, None
        if conn is not None:
            if self._reading:
                asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False
            conn.finish()
        sql, self._sql = self._sql, None
        if sql is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await sql.close()

    async def _attach(self, create: bool) -> tuple[str, int, bool]:
        assert self._sql is not None
        prefix = repl_slot_prefix(self.shard)
        cur = await self._sql.execute(
            "SELECT slot_name, confirmed_flush_lsn, wal_status, active FROM pg_replication_slots"
            " WHERE slot_type = 'logical' AND database = current_database()"
            " AND starts_with(slot_name, %s) ORDER BY slot_name",
            (prefix,),
        )
        rows = await cur.fetchall()
        usable = [r for r in rows if r[2] != "lost" and r[1] is not None]
        for name, _, _, active in rows:
            if (not usable or name != usable[0][0]) and not active:
                # A lost slot, or a duplicate of a race: left alone it pins WAL on the primary.
                with contextlib.suppress(psycopg.Error):
                    await self._sql.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        if usable:
            return str(usable[0][0]), coherence.parse_lsn(str(usable[0][1])), False
        if not create:
            raise ReplSlotLost(f"no usable replication slot for {self.shard}")
        name = prefix + secrets.token_hex(REPL_SLOT_INCARNATION_HEX // 2)
        cur = await self._sql.execute(
            "SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (name,)
        )
        row = await cur.fetchone()
        assert row is not None
        return name, coherence.parse_lsn(str(row[0])), True

    def _start_stream(self, slot: str, start: int) -> PGconn:
        info = {k: str(v) for k, v in conninfo_to_dict(self._conninfo).items() if v is not None}
        info["replication"] = "database"
        info.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
        conn = pq.PGconn.connect(make_conninfo("", **info).encode())
        if conn.status != pq.ConnStatus.OK:
            msg = conn.get_error_message()
            conn.finish()
            raise FeedError(f"replication connection failed: {msg}")
        # The slot name comes from repl_slot_prefix + hex (checked identifier characters); the
        # walsender's grammar takes no bind parameters.
        assert re.fullmatch(r"[a-z0-9_]{1,63}", slot)
        cmd = (
            f"START_REPLICATION SLOT {slot} LOGICAL {coherence.format_lsn(start)}"
            f" (proto_version '{PROTO_VERSION}', publication_names '{PUBLICATION}')"
        )
        res = conn.exec_(cmd.encode())
        if res.status != pq.ExecStatus.COPY_BOTH:
            msg = conn.get_error_message()
            conn.finish()
            if "does not exist" in msg or "can no longer" in msg:
                raise ReplSlotLost(msg)
            raise FeedError(f"START_REPLICATION failed: {msg}")
        return conn

    # -- reading -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        conn = self._pgconn
        if conn is None:
            return
        try:
            conn.consume_input()
            self._drain(conn)
        except FeedError as exc:
            self._fail(exc)
        except PgOutputError as exc:
            self._fail(FeedError(f"pgoutput: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a parse bug must end the stream, not the loop
            self._fail(FeedError(f"stream read failed: {exc!r}"))
        self._wake.set()

    def _drain(self, conn: PGconn) -> None:
        while True:
            if len(self._pending) >= PENDING_TXNS_MAX:
                self._pause_reading()
                return
            n, data = conn.get_copy_data(1)
            if n == 0:
                return
            if n < 0:
                res = conn.get_result()
                detail = conn.get_error_message() or (
                    res.error_message.decode() if res is not None else ""
                )
                if "can no longer" in detail or "does not exist" in detail:
                    raise ReplSlotLost(detail)
                raise FeedError(f"the walsender ended the stream: {detail or 'closed'}")
            self._last_rx = time.monotonic()
            self.messages += 1
            buf = bytes(data)
            if buf[:1] == b"w":
                # XLogData: start(8) server wal end(8) send time(8) payload
                txn = self._parser.feed(memoryview(buf)[25:])
                if txn is not None:
                    self._pending.append(txn)
                    self._arrived.append(self._last_rx)
                    self._wal_end = max(self._wal_end, txn.end_lsn)
            elif buf[:1] == b"k":
                (wal_end,) = struct.unpack_from("!Q", buf, 1)
                self._wal_end = max(self._wal_end, wal_end)
                if buf[17:18] == b"\x01":
                    self._send_status(reply=False)

    def _pause_reading(self) -> None:
        if self._reading and self._pgconn is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and self._pgconn is not None and self._error is None:
            asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
            self._reading = True
            self._on_readable()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._pause_reading()

    def _send_status(self, *, reply: bool) -> None:
        conn = self._pgconn
        if conn is None:
            return
        # write = what arrived, flush = what every region applied (the slot's new position).
        msg = status_update(self._wal_end, self._confirmed, self._confirmed, reply=reply)
        if conn.put_copy_data(msg) != 1 or conn.flush() < 0:
            self._fail(FeedError(f"status update failed: {conn.get_error_message()}"))

    # -- the consumer's side -----------------------------------------------------------------

    def confirm(self, lsn: int) -> None:
        """Every region applied everything up to ``lsn``: the slot may release it."""
        lsn = min(lsn, self._handed)
        if lsn > self._confirmed:
            self._confirmed = lsn
            self._send_status(reply=False)

    @property
    def confirmed(self) -> int:
        return self._confirmed

    @property
    def safe_lsn(self) -> int:
        return self._safe

    @property
    def flush_hint(self) -> int:
        """The primary's WAL flush position at the last state or flush query."""
        return self._flush_hint

    async def next(self) -> FeedBatch:
        """The next batch: durable commits, or (at each heartbeat) an empty one whose proofs and
        position move the regions' freshness forward. Raises ``FeedError`` when the stream
        broke (the feed is then unusable: ``close`` it)."""
        beat = False
        while True:
            if self._error is not None:
                raise self._error
            if time.monotonic() - self._last_rx > STREAM_SILENCE_S_MAX:
                raise FeedError(f"no message from the walsender for {STREAM_SILENCE_S_MAX}s")
            now = time.monotonic()
            if self._pending and self._pending[0].end_lsn > self._durable and now >= self._ask_at():
                await self._ask_durable()
            if now >= self._next_beat:
                self._next_beat = now + HEARTBEAT_INTERVAL_S
                if not self._pending:
                    # Nothing pending: every commit received is out, so durability needs no
                    # question; the flush position alone gives the freshness proof.
                    await self._query_flush()
                # Ask for a keepalive: its position tells that the stream passed the flush
                # position just read even when nothing of ours was in that WAL (and keeps a
                # stream whose commits wait for a stalled standby from looking silent).
                self._send_status(reply=True)
                beat = True
            batch = self._take(beat)
            # A moved position must go out too: the next batch starts where this one ends.
            if batch is not None and (batch.to_lsn > batch.from_lsn or beat or batch.proofs):
                return batch
            await self._wait()

    def _take(self, beat: bool) -> FeedBatch | None:
        ready: list[CommittedTxn] = []
        while self._pending and self._pending[0].end_lsn <= self._durable:
            ready.append(self._pending.popleft())
            self._arrived.popleft()
            if len(ready) >= BATCH_TXNS_MAX:
                break
        if not ready and self._pending and not beat:
            # A commit is on its way: the proofs and the position wait for its batch (a round
            # away) instead of a batch of their own, each one a call to every region (under
            # load they were as many as the batches with commits). A beat still takes them
            # out, so a stalled standby does not hold freshness back longer than before.
            return None
        if ready:
            self._recheck_s = DURABLE_RECHECK_S_MIN
            self._asked_once = False
            if not self._reading:
                self._resume_reading()
        # Everything before the first pending commit (or all the walsender reported) is out.
        # (A transaction still being received ends past every keepalive position so far.)
        safe = self._pending[0].commit_lsn if self._pending else self._wal_end
        safe = max(safe, self._safe)
        proofs = tuple(p for p in self._proofs if p[0] <= safe)
        self._proofs = [p for p in self._proofs if p[0] > safe]
        if not ready and safe == self._safe and not proofs:
            return FeedBatch(self._safe, self._safe, (), (), self._lag_bytes)
        batch = FeedBatch(self._safe, safe, tuple(ready), proofs, self._lag_bytes)
        self._safe = safe
        self._handed = safe
        return batch

    async def _wait(self) -> None:
        now = time.monotonic()
        deadline = self._next_beat
        if self._pending and self._pending[0].end_lsn > self._durable:
            deadline = min(deadline, max(self._ask_at(), now))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - now, 0.0)):
                await self._wake.wait()

    def _ask_at(self) -> float:
        """When to ask about the oldest pending commit next."""
        if not self._asked_once:
            return self._arrived[0] + self._durable_wait_s
        return self._recheck_at

    async def _ask_durable(self) -> None:
        await self._query_state()
        if not self._pending or self._pending[0].end_lsn <= self._durable:
            return
        self._asked_once = True
        self._recheck_at = time.monotonic() + self._recheck_s
        self._recheck_s = min(self._recheck_s * 2, DURABLE_RECHECK_S_MAX)

    async def _query_state(self) -> None:
        assert self._sql is not None
        started = time.monotonic()
        try:
            cur = await self._sql.execute(_STATE_SQL)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise FeedError(f"state query failed: {exc}") from exc
        assert row is not None
        durable_raw, flush_raw, lag_raw = row
        flush = coherence.parse_lsn(str(flush_raw))
        if durable_raw is not None:
            self._durable = max(self._durable, coherence.parse_lsn(str(durable_raw)))
        if lag_raw is not None:
            # NULL once the standby caught up and WAL stood still: the last figure stays.
            self._durable_wait_s = min(max(float(lag_raw), 0.0), DURABLE_WAIT_S_MAX)
        self._note_flush(flush, started)

    async def _query_flush(self) -> None:
        assert self._sql is not None
        started = time.monotonic()
        try:
            cur = await self._sql.execute(_FLUSH_SQL)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise FeedError(f"flush query failed: {exc}") from exc
        assert row is not None
        self._note_flush(coherence.parse_lsn(str(row[0])), started)

    def _note_flush(self, flush: int, started: float) -> None:
        self._flush_hint = flush
        self._lag_bytes = max(0, flush - self._handed)
        self._proofs.append((flush, started))
        if len(self._proofs) > PROOFS_MAX:
            # Keep the newest: a later proof implies an earlier one once it is satisfied.
            del self._proofs[: len(self._proofs) - PROOFS_MAX]


# Unsatisfied proofs kept: at one per heartbeat or state query, far more than a stream lags.
PROOFS_MAX: Final = 256
