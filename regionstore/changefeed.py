"""A shard's change feed: one logical replication stream (pgoutput) of its account rows.

What this module owns: the shard's replication slot (``repl_slot``: "slot" alone means a hash
slot in this project), the streaming replication protocol, the pgoutput parser (typed changes),
and the durability rule. It knows nothing of Redis or regions: the caller (the router's fan-out,
``router.relays.feed``) applies each batch wherever it must and then calls ``confirm``.

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
columns the caches hold; migration 0006 adds ``txr.transfers`` (the public transfer columns)
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
import functools
import hashlib
import logging
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson
import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq.abc import PGconn

from consistency import coherence

log = logging.getLogger(__name__)

PUBLICATION: Final = "txr_feed"
ACCOUNTS_RELATION: Final = ("txr", "accounts")
TRANSFERS_RELATION: Final = ("txr", "transfers")
SLOT_MOVES_RELATION: Final = ("txr", "slot_moves")
# The transfer columns migration 0006 publishes (all of them arrive as text).
TRANSFER_FIELDS: Final = (
    "id",
    "tenant",
    "source",
    "destination",
    "amount",
    "currency",
    "reference",
    "status",
    "created_at",
    "refusal_code",
)
# pgoutput protocol 1 is what PostgreSQL 15 needs for column lists and non-streamed
# transactions; 2 (streaming of in-progress transactions) would hand us uncommitted changes.
PROTO_VERSION: Final = 1
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

_PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_USEC: Final = dt.timedelta(microseconds=1)

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


# -- typed changes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountChange:
    """One account row as committed. ``row`` None: the row is incomplete (an unchanged TOAST
    value was not sent) or was deleted: the cache must drop it at ``version``."""

    account_id: int
    version: int
    row: dict[str, Any] | None
    deleted: bool = False
    # The row was inserted in this transaction (an account opened, or copied by a slot move).
    inserted: bool = False


@dataclass(frozen=True, slots=True)
class TransferChange:
    """One transfer row as committed (insert or update; deletes are slot moves: not sent).
    ``row`` maps TRANSFER_FIELDS to their text (None for SQL NULL)."""

    row: dict[str, str | None]
    inserted: bool


@dataclass(frozen=True, slots=True)
class CommittedTxn:
    commit_lsn: int
    end_lsn: int
    commit_time: dt.datetime
    changes: tuple[AccountChange, ...]
    # Transfer rows in change order (the events' source); empty for most cache-only tests.
    transfers: tuple[TransferChange, ...] = ()
    # The transaction wrote a txr.slot_moves row: its inserts are a slot move's copies.
    slot_move: bool = False


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


# -- pgoutput parsing ------------------------------------------------------------------------


@dataclass(slots=True)
class _Relation:
    namespace: str
    name: str
    columns: tuple[str, ...]
    # What the parser does with the relation's rows ("account", "transfer", "slot_move", or
    # "" for none of ours), and where the columns it reads are in a row (-1: absent), decided
    # once per Relation message rather than once per row.
    role: str = field(init=False)
    picks: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.role = _ROLES.get((self.namespace, self.name), "")
        wanted = _READS.get(self.role, ())
        self.picks = tuple(self.columns.index(c) if c in self.columns else -1 for c in wanted)

    def pick(self, values: list[str | _Unchanged | None]) -> list[str | _Unchanged | None]:
        """The columns this relation's role reads, in ``_READS`` order (None where absent)."""
        n = len(values)
        return [values[i] if 0 <= i < n else None for i in self.picks]


_ROW_KINDS: Final = frozenset((b"I", b"U", b"D"))
_ROLES: Final = {
    ACCOUNTS_RELATION: "account",
    TRANSFERS_RELATION: "transfer",
    SLOT_MOVES_RELATION: "slot_move",
}
_READS: Final[dict[str, tuple[str, ...]]] = {
    "account": coherence.ACCOUNT_FIELDS,
    "transfer": TRANSFER_FIELDS,
}


@dataclass(slots=True)
class PgOutputParser:
    """Turns pgoutput protocol-1 messages into transactions of account changes.

    Feed it every XLogData payload in stream order (``feed``); it returns a ``CommittedTxn`` at
    each commit. Relation messages (sent before a table's first change and after its schema
    changed) are remembered by id; changes of other relations are ignored.
    """

    relations: dict[int, _Relation] = field(default_factory=dict)
    _changes: dict[int, AccountChange] = field(default_factory=dict)
    _transfers: list[TransferChange] = field(default_factory=list)
    _slot_move: bool = False
    _in_txn: bool = False

    def feed(self, data: bytes | memoryview) -> CommittedTxn | None:
        buf = bytes(data)
        kind = buf[:1]
        # Row changes first: three of them per transfer, one Begin and one Commit per batch.
        if kind in _ROW_KINDS:
            change = self._row(kind, buf)
            if change is not None:
                prev = self._changes.get(change.account_id)
                if prev is not None and prev.inserted and not change.inserted:
                    change = AccountChange(
                        change.account_id, change.version, change.row, change.deleted, True
                    )
                if prev is None or change.version >= prev.version:
                    self._changes[change.account_id] = change
            return None
        if kind == b"B":
            self._in_txn = True
            self._changes = {}
            self._transfers = []
            self._slot_move = False
            return None
        if kind == b"C":
            # flags(1) commit lsn(8) end lsn(8) commit time(8)
            _, commit_lsn, end_lsn, ts = struct.unpack_from("!bQQq", buf, 1)
            txn = CommittedTxn(
                commit_lsn,
                end_lsn,
                _PG_EPOCH + ts * _USEC,
                tuple(self._changes.values()),
                tuple(self._transfers),
                self._slot_move,
            )
            self._in_txn = False
            self._changes = {}
            self._transfers = []
            self._slot_move = False
            return txn
        if kind == b"R":
            self._relation(buf)
            return None
        # 'Y' types, 'O' origins, 'T' truncates (never of accounts: the schema forbids it to
        # the app role), 'M' messages (not requested): nothing the caches need.
        return None

    @property
    def in_txn(self) -> bool:
        return self._in_txn

    def _relation(self, buf: bytes) -> None:
        (relid,) = struct.unpack_from("!I", buf, 1)
        pos = 5
        namespace, pos = _cstring(buf, pos)
        name, pos = _cstring(buf, pos)
        pos += 1  # replica identity setting
        (ncols,) = struct.unpack_from("!h", buf, pos)
        pos += 2
        cols: list[str] = []
        for _ in range(ncols):
            pos += 1  # flags (part of the key)
            col, pos = _cstring(buf, pos)
            pos += 8  # type oid, type modifier
            cols.append(col)
        self.relations[relid] = _Relation(namespace, name, tuple(cols))

    def _row(self, kind: bytes, buf: bytes) -> AccountChange | None:
        (relid,) = _UINT32(buf, 1)
        rel = self.relations.get(relid)
        if rel is None:
            raise FeedError(f"change of relation {relid} before its Relation message")
        role = rel.role
        if role == "transfer":
            if kind != b"D":
                self._transfer(kind, buf, rel)
            return None
        if role == "slot_move":
            self._slot_move = True
            return None
        if role != "account":
            return None
        pos = 5
        marker = buf[pos : pos + 1]
        if kind == b"U" and marker in (b"K", b"O"):
            _, pos = _tuple(buf, pos + 1)  # the old key: the new tuple follows
            marker = buf[pos : pos + 1]
        values, _ = _tuple(buf, pos + 1)
        picked = rel.pick(values)
        named = dict(zip(coherence.ACCOUNT_FIELDS, picked, strict=True))
        raw_id = named["id"]
        if not isinstance(raw_id, str):
            raise FeedError("an account change without its id")
        account_id = int(raw_id)
        raw_version = named["version"]
        if kind == b"D":
            # A delete carries only the key (replica identity): no version. The row left this
            # shard (a slot move); its new home's feed fills it. Version 0 = "drop, whatever".
            version = int(raw_version) if isinstance(raw_version, str) else 0
            return AccountChange(account_id, version, None, deleted=True)
        if not isinstance(raw_version, str):
            raise FeedError(f"account {account_id}: change without a version")
        version = int(raw_version)
        inserted = kind == b"I"
        if None in picked or _UNCHANGED in picked:
            return AccountChange(account_id, version, None, inserted=inserted)
        row = coherence.account_payload(
            id=account_id,
            tenant=str(named["tenant"]),
            currency=str(named["currency"]),
            balance=int(str(named["balance"])),
            overdraft_limit=int(str(named["overdraft_limit"])),
            version=version,
            metadata=orjson.loads(str(named["metadata"])),
            created_at=_created_at_iso(str(named["created_at"])),
        )
        return AccountChange(account_id, version, row, inserted=inserted)

    def _transfer(self, kind: bytes, buf: bytes, rel: _Relation) -> None:
        pos = 5
        marker = buf[pos : pos + 1]
        if kind == b"U" and marker in (b"K", b"O"):
            _, pos = _tuple(buf, pos + 1)
        values, _ = _tuple(buf, pos + 1)
        picked = rel.pick(values)
        if _UNCHANGED in picked:
            # Only a value over the TOAST threshold is left out, and no published transfer
            # column can be that long (reference is bounded far below it).
            missing = TRANSFER_FIELDS[picked.index(_UNCHANGED)]
            raise FeedError(f"transfer change without its {missing}")
        row = cast(dict[str, str | None], dict(zip(TRANSFER_FIELDS, picked, strict=True)))
        if row["id"] is None or row["status"] is None:
            raise FeedError("a transfer change without its id or status")
        self._transfers.append(TransferChange(row, kind == b"I"))


class _Unchanged:
    """An unchanged TOAST value (pgoutput 'u'): not sent, so the row is incomplete."""


_UNCHANGED: Final = _Unchanged()


def _finish_started(fut: asyncio.Future[PGconn]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().finish()


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


_UINT32: Final = struct.Struct("!I").unpack_from
_INT16: Final = struct.Struct("!h").unpack_from
_INT32: Final = struct.Struct("!i").unpack_from
_TEXT, _NULL, _TOASTED = b"t"[0], b"n"[0], b"u"[0]


def _tuple(buf: bytes, pos: int) -> tuple[list[str | _Unchanged | None], int]:
    # Three rows per transfer pass through here (the transfer and its two accounts): it was a
    # quarter of the decoder's CPU, hence the byte compares and the bound unpackers.
    (ncols,) = _INT16(buf, pos)
    pos += 2
    out: list[str | _Unchanged | None] = []
    append = out.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == _TEXT:
            (n,) = _INT32(buf, pos + 1)
            pos += 5
            append(buf[pos : pos + n].decode())
            pos += n
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _TOASTED:
            append(_UNCHANGED)
            pos += 1
        else:
            raise FeedError(f"tuple column kind {bytes([kind])!r} not requested (binary is off)")
    return out, pos


# Distinct timestamps _parse_timestamptz remembers: an account's created_at arrives with every
# change of the account, so the hot accounts of a busy shard are parsed once.
TIMESTAMPS_MEMO: Final = 4096


@functools.lru_cache(maxsize=TIMESTAMPS_MEMO)
def _parse_timestamptz(text: str) -> dt.datetime:
    # The walsender renders with the server's DateStyle (ISO, set by the cluster) and a short
    # offset ("+00"); Python 3.11 accepts both forms.
    return dt.datetime.fromisoformat(text)


@functools.lru_cache(maxsize=TIMESTAMPS_MEMO)
def _created_at_iso(text: str) -> str:
    """An account's created_at as the cache payload holds it (``coherence.account_payload``)."""
    return _parse_timestamptz(text).isoformat()


# -- stream framing --------------------------------------------------------------------------


def status_update(write: int, flush: int, apply: int, *, reply: bool) -> bytes:
    """A standby status update ('r'): positions +1 are not needed; time in PG epoch µs."""
    now = int((dt.datetime.now(dt.UTC) - _PG_EPOCH) / _USEC)
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


def committed_accounts(txns: Sequence[CommittedTxn]) -> dict[int, AccountChange]:
    """The last change of each account across ``txns`` (they are in commit order)."""
    out: dict[int, AccountChange] = {}
    for t in txns:
        for c in t.changes:
            prev = out.get(c.account_id)
            if prev is None or c.deleted or c.version >= prev.version:
                out[c.account_id] = c
    return out
