"""The invalidation relay: every shard's committed account changes into this region's Redis.

One relay per region (in the relay process, ``python -m router.relays``); one worker per shard
of the topology. A worker reads the shard primary's commit log through PostgreSQL logical
decoding (built-in ``test_decoding`` plugin, a logical slot per (region, shard), polled with
``pg_logical_slot_peek_changes`` over a normal connection: psycopg 3 has no replication
protocol), turns each committed row of ``txr.accounts`` into a forward-only fill (or a
tombstone when the row is incomplete), applies the batch to Redis together with the shard's
position marker, and only then advances the slot.
A crash anywhere re-delivers (harmless: every write is forward-only) and never skips.

Durability (G1 before G6): decoding reads the primary's local WAL, which holds commits still
waiting for their synchronous standby; a failover may lose those. A worker therefore decodes
only up to the flush position of the shard's synchronous standby, so the cache never shows a
change a failover could undo.

Continuity: the slot keeps the position in PostgreSQL; the marker in Redis says which slot and
position this Redis follows. If the slot is missing or recreated (failover: logical slots do not
follow a promotion; an operator dropped it; WAL retention invalidated it), the marker is missing
(Redis restarted) or behind the slot, the worker cannot prove it saw every change: it *resets*
the shard: (slot first, then) new cache generation, drop the region's entries of the shard's
slots, marker at the slot's position (coherence docstring explains the order).

Lag (the read path's freshness guard, ``router.freshness``, in the routers' processes): each
worker publishes *applied_through* per shard in this region's Redis (``publish_relay_state``,
at most every ``HEARTBEAT_INTERVAL_S``, after rounds that did or did not apply anything, so the
heartbeat advances while idle and stops when the relay does). ``lag(shard)`` here is the relay's
own view: now - *applied_through*, the newest
instant T such that every change acknowledged to a client before T is in Redis.
* A round that found the slot drained (everything up to the synchronous standby's flush position
  read at the start of the round applied) sets T = the start of that round: a commit
  acknowledged before then was flushed by the standby before then.
* A round that left a backlog sets T = the commit time of the last change it applied (mapped to
  this host's clock through the server's clock in the same reply, so clock skew between hosts
  does not enter).
So an idle healthy relay reports at most about one poll interval plus a round trip, and a
stopped, paused, partitioned or failing relay reports a lag that keeps growing: "idle" and
"dead" are never confused. None = unknown (no round completed since start or reset, or the
topology moved the shard to a primary or epoch the worker has not caught up with): not fresh.
``txr_invalidation_lag_bytes`` = pg_current_wal_lsn() - the slot's confirmed_flush_lsn at the
start of the last round (WAL of every database and table counts, so it is a backlog indicator,
not a count of pending account changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import make_conninfo

from consistency import coherence
from consistency.topology import Node, Shard, Topology
from router.cache import CacheUnavailable, RegionCache, RelayOp
from router.config import RouterConfig
from router.metrics import Metrics

log = logging.getLogger(__name__)

# Rows (BEGIN, changes, COMMIT) decoded per round. Decoding stops at the first transaction end
# past this, so a round holds whole transactions; bounds the memory of a round and the keys of
# one Redis script (a few ms of Redis time).
PEEK_ROWS_MAX: Final = 1000
# Pause between rounds once drained. Commit-to-cache latency is about half of it plus a round;
# an idle round costs two small queries on the primary and one script on the local Redis.
POLL_INTERVAL_S: Final = 0.05
# Reconnect / retry after an operational failure: exponential with full jitter, so the workers
# of every region do not hammer a recovering primary in step.
RETRY_BACKOFF_S_MIN: Final = 0.1
RETRY_BACKOFF_S_MAX: Final = 5.0
# One round (three statements and a Redis script) must finish within this, or the connection
# is considered hung and replaced. Above the statement timeout, which PostgreSQL enforces.
ROUND_TIMEOUT_S: Final = 10.0
STATEMENT_TIMEOUT_MS: Final = 5000
CONNECT_TIMEOUT_S: Final = 5
# TCP keepalives: a primary that vanished (region down) is noticed in about 10 s, not at the
# kernel's two hours.
KEEPALIVES_IDLE_S: Final = 5
KEEPALIVES_INTERVAL_S: Final = 2
KEEPALIVES_COUNT: Final = 3
# The supervisor starts and stops workers as the topology gains or loses shards.
SUPERVISE_INTERVAL_S: Final = 1.0
# Each worker publishes its heartbeat (applied-through, router.freshness) at most this often.
# The routers' guard over-states the lag by up to this much on a healthy relay; 0.1 s of a 1 s
# bound, for one small script per shard per interval instead of one per 50 ms round.
HEARTBEAT_INTERVAL_S: Final = 0.1
# PostgreSQL identifiers (slot names) are at most 63 bytes (NAMEDATALEN - 1).
SLOT_NAME_LEN_MAX: Final = 63
SLOT_PREFIX: Final = "txr_inval_"
# Each part of a slot name keeps this many sanitised characters; a hash of the exact names keeps
# truncated names distinct. 10 + 16 + 1 + 16 + 1 + 8 + 1 + 8 = 61 <= 63.
SLOT_NAME_PART_MAX: Final = 16
SLOT_HASH_HEX: Final = 8
SLOT_INCARNATION_HEX: Final = 8

_ACCOUNTS_TABLE: Final = "table txr.accounts: "
_COMMIT_RE: Final = re.compile(r"COMMIT(?: \d+)?(?: \(at (.+)\))?")
# test_decoding column format: name[type]:value, value 'quoted' (quotes doubled) or a bare word.
_COLUMN_RE: Final = re.compile(r"(\w+)\[([^\]]+)\]:('(?:[^']|'')*'|\S+)")
_UNCHANGED_TOAST: Final = "unchanged-toast-datum"

# The synchronous standbys' flush position (the durable end of WAL), or the local flush position
# when the primary runs without a synchronous standby. NULL while a synchronous standby is
# configured but none reports: then nothing is known durable and the worker waits.
_STATE_SQL: Final = """
SELECT CASE WHEN current_setting('synchronous_standby_names') = ''
            THEN pg_current_wal_flush_lsn()
            ELSE (SELECT min(flush_lsn) FROM pg_stat_replication
                   WHERE sync_state IN ('sync', 'quorum')) END,
       s.confirmed_flush_lsn,
       pg_current_wal_lsn() - s.confirmed_flush_lsn,
       s.wal_status
  FROM pg_replication_slots s
 WHERE s.slot_name = %s
"""
_PEEK_SQL: Final = """
SELECT lsn, data, clock_timestamp()
  FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, %s,
       'include-timestamp', 'on', 'skip-empty-xacts', 'on', 'include-xids', 'off')
"""
# GREATEST: advancing below the slot's position is an error, and another relay of this region
# (sharing the slot) may have advanced it further meanwhile.
_ADVANCE_SQL: Final = """
SELECT pg_replication_slot_advance(s.slot_name, GREATEST(%s::pg_lsn, s.confirmed_flush_lsn))
  FROM pg_replication_slots s
 WHERE s.slot_name = %s
"""
_LIST_SLOTS_SQL: Final = """
SELECT slot_name, confirmed_flush_lsn, wal_status, active
  FROM pg_replication_slots
 WHERE slot_type = 'logical' AND database = current_database() AND starts_with(slot_name, %s)
 ORDER BY slot_name
"""
_CREATE_SLOT_SQL: Final = (
    "SELECT slot_name, lsn FROM pg_create_logical_replication_slot(%s, 'test_decoding')"
)
_DROP_SLOT_SQL: Final = "SELECT pg_drop_replication_slot(%s)"


class TopologySource(Protocol):
    """What the relay needs of the topology (the router's TopologyWatcher)."""

    @property
    def current(self) -> Topology: ...


# Shard -> libpq conninfo of its current primary for a role with REPLICATION.
ConnInfo = Callable[[Shard], str]


class SlotGone(Exception):
    """The worker's slot disappeared or became unusable mid-flight: re-attach (and reset)."""


def slot_prefix(region: str, shard: str) -> str:
    """``txr_inval_<region>_<shard>_<hash>_``: the slots of one (region, shard) pair."""

    def clean(s: str) -> str:
        return re.sub(r"[^a-z0-9_]", "_", s.lower())[:SLOT_NAME_PART_MAX]

    digest = hashlib.sha256(f"{region}\0{shard}".encode()).hexdigest()[:SLOT_HASH_HEX]
    prefix = f"{SLOT_PREFIX}{clean(region)}_{clean(shard)}_{digest}_"
    assert len(prefix) + SLOT_INCARNATION_HEX <= SLOT_NAME_LEN_MAX
    return prefix


@dataclass(slots=True)
class _Txn:
    end_lsn: int
    commit_ts: datetime | None
    server_now: datetime
    ops: dict[int, RelayOp] = field(default_factory=dict)


def parse_row(data: str) -> tuple[int, RelayOp] | None:
    """An ``INSERT``/``UPDATE`` line of txr.accounts as (account id, op); None for others.

    A row with a column shown as unchanged TOAST (large metadata not rewritten by an update) is
    incomplete: it becomes a tombstone at its version, and the next read fills it.
    """
    if not data.startswith(_ACCOUNTS_TABLE):
        return None
    kind, _, cols = data[len(_ACCOUNTS_TABLE) :].partition(": ")
    if kind not in ("INSERT", "UPDATE"):
        return None  # DELETE: the row left this shard (a slot move); its new home's relay fills
    raw: dict[str, str] = {}
    incomplete = False
    for m in _COLUMN_RE.finditer(cols):
        value = m.group(3)
        if value == _UNCHANGED_TOAST:
            incomplete = True
        elif value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        raw[m.group(1)] = value
    account_id = int(raw["id"])
    version = int(raw["version"])
    if incomplete or any(f not in raw or raw[f] == "null" for f in coherence.ACCOUNT_FIELDS):
        return account_id, RelayOp(account_id, version, None)
    payload = coherence.account_payload(
        id=account_id,
        tenant=raw["tenant"],
        currency=raw["currency"],
        balance=int(raw["balance"]),
        overdraft_limit=int(raw["overdraft_limit"]),
        version=version,
        metadata=orjson.loads(raw["metadata"]),
        created_at=datetime.fromisoformat(raw["created_at"]),
    )
    return account_id, RelayOp(account_id, version, payload)


class _ShardWorker:
    """Follows one shard's commit log into this region's Redis."""

    def __init__(self, relay: InvalidationRelay, shard: str) -> None:
        self.relay = relay
        self.shard = shard
        self.prefix = slot_prefix(relay.region, shard)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.node: Node | None = None
        self.epoch: int | None = None
        self.slot: str | None = None
        # Monotonic time of applied_through (module docstring); None = unknown.
        self.applied_through: float | None = None
        self.lag_bytes: int | None = None
        self.resets = 0
        self.warned_no_standby = False
        self.published_at = -math.inf
        self.running = asyncio.Event()
        self.running.set()
        self._rng = random.Random()

    def lag(self) -> float | None:
        if self.applied_through is None:
            return None
        return max(0.0, time.monotonic() - self.applied_through)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        self.slot = None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def run(self) -> None:
        backoff = RETRY_BACKOFF_S_MIN
        try:
            while True:
                await self.running.wait()
                _raise_if_cancelling()
                shard = self.relay.topology.current.shards.get(self.shard)
                if shard is None:
                    return
                try:
                    # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancel that
                    # arrives as the round ends, and the worker would outlive stop().
                    async with asyncio.timeout(ROUND_TIMEOUT_S):
                        drained = await self._step(shard)
                    backoff = RETRY_BACKOFF_S_MIN
                except SlotGone as exc:
                    log.warning("invalidation %s: %s; re-attaching", self.shard, exc)
                    self.slot = None
                    continue
                except (psycopg.Error, OSError, TimeoutError, CacheUnavailable) as exc:
                    # psycopg answers a cancel mid-query with QueryCanceled, redis-py may with a
                    # connection error: a stop() must not be mistaken for a failed round.
                    _raise_if_cancelling()
                    log.warning(
                        "invalidation %s: round failed (%s: %s); retrying",
                        self.shard,
                        type(exc).__name__,
                        exc,
                    )
                    await self.close()
                    await asyncio.sleep(self._rng.uniform(0.0, backoff))
                    backoff = min(backoff * 2, RETRY_BACKOFF_S_MAX)
                    continue
                await self._publish()
                if drained:
                    await asyncio.sleep(self.relay.poll_interval_s)
        finally:
            await self.close()

    async def _publish(self) -> None:
        """The heartbeat the routers' freshness guard reads; best effort (a missed one only
        makes the lag look larger)."""
        now = time.monotonic()
        if self.node is None or self.epoch is None:
            return
        if now - self.published_at < HEARTBEAT_INTERVAL_S:
            return
        self.published_at = now
        age = None if self.applied_through is None else now - self.applied_through
        try:
            await self.relay.cache.publish_relay_state(
                self.shard,
                age_s=age,
                epoch=self.epoch,
                primary=self.node.name,
                lag_bytes=self.lag_bytes,
            )
        except CacheUnavailable as exc:
            _raise_if_cancelling()
            log.debug("invalidation %s: heartbeat not published: %s", self.shard, exc)

    async def _step(self, shard: Shard) -> bool:
        if self.epoch is not None and (shard.primary != self.node or shard.epoch != self.epoch):
            # Failover, switchover or an epoch bump: entries under the new epoch may have been
            # filled by reads while we were writing the old epoch's keys. Start over.
            await self.close()
            self.applied_through = None
            self._count_reset("topology")
            await self.relay.cache.drop_shard(
                self.relay.topology.current.slots.slots_of(self.shard)
            )
            self.node, self.epoch = shard.primary, shard.epoch
        if self.conn is None:
            self.applied_through = None
            self.conn = await psycopg.AsyncConnection.connect(
                self.relay.conninfo(shard), autocommit=True
            )
            self.node, self.epoch = shard.primary, shard.epoch
        if self.slot is None:
            self.applied_through = None
            await self._attach()
        return await self._round(shard)

    # -- slot and continuity ----------------------------------------------------------------

    async def _attach(self) -> None:
        """Find (or create) this pair's slot and prove continuity with Redis, else reset."""
        assert self.conn is not None
        cur = await self.conn.execute(_LIST_SLOTS_SQL, (self.prefix,))
        slots = [(str(r[0]), r[1], r[2], bool(r[3])) for r in await cur.fetchall()]
        marker = await self.relay.cache.position(self.shard)
        usable = [s for s in slots if s[2] != "lost" and s[1] is not None]
        chosen = next((s for s in usable if marker is not None and s[0] == marker[0]), None)
        if chosen is None and usable:
            chosen = usable[0]
        for name, _, _, active in slots:
            if (chosen is None or name != chosen[0]) and not active:
                # A lost slot, or a duplicate from a race between routers of this region:
                # left alone it would pin WAL on the primary.
                with contextlib.suppress(psycopg.Error):
                    await self.conn.execute(_DROP_SLOT_SQL, (name,))
        reason: str | None = None
        if chosen is None:
            name = self.prefix + secrets.token_hex(SLOT_INCARNATION_HEX // 2)
            cur = await self.conn.execute(_CREATE_SLOT_SQL, (name,))
            row = await cur.fetchone()
            assert row is not None
            chosen = (name, row[1], "reserved", True)
            reason = "slot_created"
        elif marker is None:
            reason = "marker_missing"
        elif marker[0] != chosen[0]:
            reason = "marker_other_slot"
        elif marker[1] < coherence.parse_lsn(str(chosen[1])):
            reason = "marker_behind"
        self.slot = chosen[0]
        if reason is not None:
            await self._reset(reason, coherence.parse_lsn(str(chosen[1])))

    async def _reset(self, reason: str, slot_lsn: int) -> None:
        assert self.slot is not None
        log.warning(
            "invalidation %s: cannot prove continuity (%s); dropping the region's entries",
            self.shard,
            reason,
        )
        self._count_reset(reason)
        slots = self.relay.topology.current.slots.slots_of(self.shard)
        dropped = await self.relay.cache.drop_shard(slots)
        await self.relay.cache.set_position(self.shard, self.slot, slot_lsn)
        self.applied_through = None
        log.info(
            "invalidation %s: dropped %d entries, following %s", self.shard, dropped, self.slot
        )

    def _count_reset(self, reason: str) -> None:
        self.resets += 1
        m = self.relay.metrics
        if m is not None:
            m.invalidation_resets.labels(self.relay.region, self.shard, reason).inc()

    # -- one round --------------------------------------------------------------------------

    async def _round(self, shard: Shard) -> bool:
        """Decode, apply, advance. True when the slot was drained up to the durable end."""
        assert self.conn is not None
        assert self.slot is not None
        started = time.monotonic()
        cur = await self.conn.execute(_STATE_SQL, (self.slot,))
        state = await cur.fetchone()
        if state is None:
            raise SlotGone(f"slot {self.slot} no longer exists")
        durable_raw, confirmed_raw, lag_bytes, wal_status = state
        if wal_status == "lost" or confirmed_raw is None:
            raise SlotGone(f"slot {self.slot} is unusable (wal_status {wal_status})")
        confirmed = coherence.parse_lsn(str(confirmed_raw))
        self.lag_bytes = int(lag_bytes) if lag_bytes is not None else None
        if self.relay.metrics is not None and self.lag_bytes is not None:
            self.relay.metrics.invalidation_lag_bytes.labels(self.relay.region, self.shard).set(
                self.lag_bytes
            )
        if durable_raw is None:
            if not self.warned_no_standby:
                # Also what a role without pg_read_all_stats sees: pg_stat_replication hides it.
                log.warning(
                    "invalidation %s: a synchronous standby is configured but none reports a "
                    "flush position; waiting (lag grows)",
                    self.shard,
                )
                self.warned_no_standby = True
            return True
        self.warned_no_standby = False
        durable = coherence.parse_lsn(str(durable_raw))
        if durable <= confirmed:
            return await self._apply([], confirmed, confirmed, started, drained=True)

        try:
            cur = await self.conn.execute(
                _PEEK_SQL, (self.slot, coherence.format_lsn(durable), PEEK_ROWS_MAX)
            )
        except pg_errors.UndefinedObject as exc:
            raise SlotGone(str(exc)) from exc
        rows = await cur.fetchall()
        received = time.monotonic()
        txns = self._parse(rows)
        # A commit record straddling the durable position is decoded but not yet durable.
        applied = [t for t in txns if t.end_lsn <= durable]
        drained = len(rows) < PEEK_ROWS_MAX and len(applied) == len(txns)
        # Advancing past a decoded-but-skipped commit would skip it for good: stop at the last
        # applied commit unless everything up to the durable position was applied.
        position = durable if drained else (applied[-1].end_lsn if applied else confirmed)
        position = max(position, confirmed)
        await self._apply(applied, confirmed, position, started, drained=drained)
        if not drained and applied and applied[-1].commit_ts is not None:
            last = applied[-1]
            assert last.commit_ts is not None
            behind = (last.server_now - last.commit_ts).total_seconds()
            candidate = received - max(behind, 0.0)
            if self.applied_through is None or candidate > self.applied_through:
                self.applied_through = candidate
        return drained

    async def _apply(
        self, txns: list[_Txn], confirmed: int, position: int, started: float, *, drained: bool
    ) -> bool:
        assert self.conn is not None
        assert self.slot is not None
        assert self.epoch is not None
        ops: dict[int, RelayOp] = {}
        for t in txns:
            for acc, op in t.ops.items():
                if acc not in ops or op.version >= ops[acc].version:
                    ops[acc] = op
        written = await self.relay.cache.relay_apply(
            self.shard,
            self.epoch,
            slot=self.slot,
            slot_confirmed=confirmed,
            position=position,
            ops=list(ops.values()),
        )
        if written is None:
            # Redis lost the marker (restart) or follows another slot: what it held cannot be
            # trusted. The undelivered changes stay in the slot and come in the next round.
            await self._reset("marker_lost", confirmed)
            return False
        if position > confirmed:
            await self.conn.execute(_ADVANCE_SQL, (coherence.format_lsn(position), self.slot))
        if drained:
            self.applied_through = started
        m = self.relay.metrics
        if m is not None and ops:
            m.invalidation_applied.labels(self.relay.region, self.shard).inc(len(ops))
        return drained

    def _parse(self, rows: list[tuple[Any, ...]]) -> list[_Txn]:
        txns: list[_Txn] = []
        current: dict[int, RelayOp] = {}
        for lsn, data, server_now in rows:
            text = str(data)
            if text.startswith("BEGIN"):
                current = {}
                continue
            m = _COMMIT_RE.fullmatch(text)
            if m is not None:
                ts = datetime.fromisoformat(m.group(1)) if m.group(1) else None
                txns.append(_Txn(coherence.parse_lsn(str(lsn)), ts, server_now, current))
                current = {}
                continue
            parsed = parse_row(text)
            if parsed is not None:
                acc, op = parsed
                if acc not in current or op.version >= current[acc].version:
                    current[acc] = op
        return txns


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


class InvalidationRelay:
    """This region's relay: one worker per shard of the topology (module docstring)."""

    def __init__(
        self,
        region: str,
        topology: TopologySource,
        cache: RegionCache,
        conninfo: ConnInfo,
        *,
        metrics: Metrics | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll interval must be positive")
        self.region = region
        self.topology = topology
        self.cache = cache
        self.conninfo = conninfo
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self._workers: dict[str, _ShardWorker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._paused: set[str] = set()
        self._all_paused = False

    @classmethod
    def from_config(
        cls,
        config: RouterConfig,
        topology: TopologySource,
        cache: RegionCache,
        metrics: Metrics | None,
    ) -> InvalidationRelay:
        """The router's relay: the replication role, each primary through the dial mapping."""
        assert config.repl_password_file is not None
        password = config.repl_password_file.read_text().strip()

        def conninfo(shard: Shard) -> str:
            host, port = config.dial_address(shard.primary.host, shard.primary.port)
            return make_conninfo(
                host=host,
                port=port,
                dbname=config.db_name,
                user=config.repl_user,
                password=password,
                application_name=f"txr-inval-{config.region}",
                connect_timeout=CONNECT_TIMEOUT_S,
                keepalives=1,
                keepalives_idle=KEEPALIVES_IDLE_S,
                keepalives_interval=KEEPALIVES_INTERVAL_S,
                keepalives_count=KEEPALIVES_COUNT,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )

        return cls(config.region, topology, cache, conninfo, metrics=metrics)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._supervisor is None:
            self._supervise_once()
            self._supervisor = asyncio.create_task(self._supervise(), name="invalidation")

    async def stop(self) -> None:
        tasks = [t for t in (self._supervisor, *self._tasks.values()) if t is not None]
        self._supervisor = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._workers.clear()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            self._supervise_once()

    def _supervise_once(self) -> None:
        shards = set(self.topology.current.shards)
        for name in shards:
            task = self._tasks.get(name)
            if task is None or task.done():
                if task is not None and not task.cancelled() and task.exception() is not None:
                    log.error("invalidation %s: worker died", name, exc_info=task.exception())
                worker = _ShardWorker(self, name)
                if self._all_paused or name in self._paused:
                    worker.running.clear()
                self._workers[name] = worker
                self._tasks[name] = asyncio.create_task(worker.run(), name=f"inval-{name}")
                self._export(worker)
        for name in set(self._tasks) - shards:
            self._tasks.pop(name).cancel()
            self._workers.pop(name, None)

    def _export(self, worker: _ShardWorker) -> None:
        if self.metrics is None:
            return

        def lag() -> float:
            value = self.lag(worker.shard)
            return math.nan if value is None else value

        self.metrics.invalidation_lag_seconds.labels(self.region, worker.shard).set_function(lag)

    # -- the read path's guard --------------------------------------------------------------

    def lag(self, shard: str) -> float | None:
        """Seconds this region's cache may be behind ``shard``'s commits; None = unknown."""
        worker = self._workers.get(shard)
        if worker is None:
            return None
        current = self.topology.current.shards.get(shard)
        if current is None or current.primary != worker.node or current.epoch != worker.epoch:
            return None
        return worker.lag()

    def lag_bytes(self, shard: str) -> int | None:
        worker = self._workers.get(shard)
        return worker.lag_bytes if worker is not None else None

    def resets(self, shard: str) -> int:
        worker = self._workers.get(shard)
        return worker.resets if worker is not None else 0

    # -- tests and operators ----------------------------------------------------------------

    def pause(self, shard: str | None = None) -> None:
        """Stop applying (one shard, or all) after the round in flight; lag keeps growing."""
        if shard is None:
            self._all_paused = True
        else:
            self._paused.add(shard)
        for name, worker in self._workers.items():
            if shard is None or name == shard:
                worker.running.clear()

    def resume(self, shard: str | None = None) -> None:
        if shard is None:
            self._all_paused = False
            self._paused.clear()
        else:
            self._paused.discard(shard)
        for name, worker in self._workers.items():
            if not self._all_paused and name not in self._paused:
                worker.running.set()
