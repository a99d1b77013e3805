"""Async client of one shard primary: the only way the router writes money.

Each method is one round trip: writes call a stored procedure (``txr.post_transfers``,
``txr.create_account``) in autocommit mode, so the statement is its own transaction and no
BEGIN/COMMIT round trips are added; reads are single parameterised SELECTs.

Cross-shard transfers (DESIGN.md section 6) add leg 2 (``apply_inbound``, on the destination),
the source's mark (``settle_outbound``), the relay's queue operations (``claim_outbox``,
``defer_outbox``, ``outbox_stats``) and its wake-up (``wait_for_outbox``: LISTEN on a dedicated
connection, the only connection not taken from the pool).

Business outcomes come back as values (``TransferCode`` per item, ``CreateAccountCode``,
``InboundCode``, ``SettleCode``);
operational failures raise the exceptions of :mod:`regionstore.errors`, classified by what the
caller may conclude about a write:

- nothing sent (pool acquire timed out, server unreachable, pool closed) -> StoreUnavailable;
- sent, then the deadline passed, the connection broke, or the primary reported that the
  commit's wait for the synchronous standby was cancelled -> StoreOutcomeUnknown;
- the server rolled the statement back (connection healthy) -> StoreUnavailable, or
  StoreInvariantViolation when the refusal is a bug (bad arguments, CHECK, ledger assertion).

Deadlines are strict: the call runs in its own task and the caller waits on it for at most
``timeout_s``. On expiry the caller gets its exception at once, and the task is cancelled in
the background: psycopg then cancels the query on the server and the pool rolls back or
discards the connection, so a connection is never reused mid-transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Literal, TypeVar

import msgspec
import orjson
import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.abc import Params, QueryNoTemplate
from psycopg.pq import TransactionStatus
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

from consistency.limits import BATCH_ITEMS_MAX, ENTRIES_PAGE_MAX, ENTRIES_PAGE_MIN
from consistency.saga import STATUS_OF, TransferStatus
from regionstore import pgwait
from regionstore.errors import (
    StoreError,
    StoreInvariantViolation,
    StoreOutcomeUnknown,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# A row dataclass that class_row builds from a query whose columns name its fields.
R = TypeVar("R")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

# Establishing a TCP + SCRAM session to a primary across a WAN takes a few round trips; beyond
# this the server is as good as down and the pool retries with backoff.
CONNECT_TIMEOUT_S: Final = 5
# Server-side ceiling on any statement: router deadlines are far shorter, so this only bounds
# the work of a call whose client went away without its cancel reaching the server.
STATEMENT_TIMEOUT_MS: Final = 30_000
# Recycle connections now and then (server memory, DNS/primary moves after failover) and close
# idle extras so a quiet router does not pin server slots.
POOL_MAX_LIFETIME_S: Final = 30 * 60.0
POOL_MAX_IDLE_S: Final = 5 * 60.0
# A primary may be down for a whole failover; keep reconnecting with backoff that long.
POOL_RECONNECT_TIMEOUT_S: Final = 10 * 60.0
# Waiters beyond this fail at once (StoreUnavailable) instead of queueing without bound.
POOL_MAX_WAITING: Final = 1024
# Closing waits this long for checked-out connections to come back.
POOL_CLOSE_TIMEOUT_S: Final = 5.0
# psycopg prepares a statement server-side after this many executions on a connection: our few
# hot statements are prepared almost at once, and parse/plan is skipped afterwards.
PREPARE_THRESHOLD: Final = 2

# SQLSTATE classes that mean the call itself was wrong: data exception, integrity violation,
# syntax/privilege error, PL/pgSQL RAISE, internal error. Retrying cannot help.
_INVARIANT_SQLSTATE_CLASSES: Final = frozenset({"22", "23", "42", "P0", "XX", "2B", "2F"})
# When a commit's wait for the synchronous standby is cancelled (statement_timeout,
# pg_cancel_backend) the server commits locally, sends a WARNING and then the normal result: the
# write is not known to be replicated (G1). PostgreSQL 15 gives that WARNING no SQLSTATE of its
# own (01000), so it is recognised by its message; the cluster runs lc_messages=C (initdb
# --locale=C), so the text is stable. The SQLSTATEs cover the variant sent before termination.
_SYNC_WAIT_CANCELLED_TEXT: Final = "wait for synchronous replication"
_SYNC_WAIT_CANCELLED_SQLSTATES: Final = frozenset({"57014", "57P01", "57P02"})


class TransferCode(StrEnum):
    OK = "ok"
    REPLAYED = "replayed"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    CURRENCY_MISMATCH = "currency_mismatch"
    NOT_FOUND = "not_found"
    STALE_EPOCH = "stale_epoch"
    WRONG_SHARD = "wrong_shard"
    BALANCE_LIMIT = "balance_limit"


# By value, for the batch answer's rows: a dict lookup instead of EnumType.__call__, which a
# py-spy profile showed as a visible share of the router at saturation.
_TRANSFER_CODES: Final = {c.value: c for c in TransferCode}


class CreateAccountCode(StrEnum):
    OK = "ok"
    STALE_EPOCH = "stale_epoch"
    WRONG_SHARD = "wrong_shard"
    ID_TAKEN = "id_taken"
    # Idempotent opens (sql/functions/accounts.sql): the key was used before with the same
    # body (the original account is returned) or with another one (nothing written).
    REPLAYED = "replayed"
    KEY_REUSED = "key_reused"
    # The key's arbiter shard (txr.claim_account_key): the caller's id is the key's now.
    CLAIMED = "claimed"


class TransferItem(msgspec.Struct, frozen=True, gc=False):
    """One transfer of a batch. A msgspec Struct: several are built per request (issue 11)."""

    transfer_id: uuid.UUID
    tenant: str
    source: int
    destination: int
    amount: int
    currency: str
    reference: str | None
    idempotency_key: str
    fingerprint: bytes
    source_slot_epoch: int
    destination_slot_epoch: int
    # None: the destination lives on this shard (one transaction). A shard name: leg 1 of a
    # cross-shard transfer to that shard (debit + transit credit + outbox; status 'pending').
    destination_shard: str | None = None


class TransferResult(msgspec.Struct, frozen=True, gc=False):
    """One item's outcome. ``ok`` and ``replayed`` carry the transfer and both accounts'
    balances and versions (for ``replayed``: the original transfer, current balances);
    refusals carry only the code. A cross-shard item (leg 1) carries no destination balance:
    the destination lives on another shard."""

    code: TransferCode
    transfer_id: uuid.UUID | None
    status: TransferStatus | None
    created_at: datetime | None
    source_balance: int | None
    source_version: int | None
    destination_balance: int | None
    destination_version: int | None


@dataclass(frozen=True, slots=True)
class AccountRow:
    id: int
    tenant: str
    currency: str
    balance: int
    overdraft_limit: int
    version: int
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TransferRow:
    id: uuid.UUID
    tenant: str
    source: int
    destination: int
    amount: int
    currency: str
    reference: str | None
    status: TransferStatus
    created_at: datetime
    # Why the destination refused a cross-shard transfer (status 'reversed'); else None.
    refusal_code: str | None = None

    def __post_init__(self) -> None:
        # class_row hands over the stored text: carry it as the enum (an unknown one raises).
        object.__setattr__(self, "status", STATUS_OF[self.status])


class InboundCode(StrEnum):
    """Leg 2's answer on the destination shard. not_found / currency_mismatch /
    balance_limit are refusals (recorded: every re-delivery gets the same one)."""

    APPLIED = "applied"
    NOT_FOUND = "not_found"
    CURRENCY_MISMATCH = "currency_mismatch"
    BALANCE_LIMIT = "balance_limit"
    STALE_EPOCH = "stale_epoch"
    WRONG_SHARD = "wrong_shard"
    # The message's MAC does not check (forged, altered, or signed with a key this shard
    # lacks): nothing recorded, the relay keeps it pending and shouts.
    UNAUTHENTICATED = "unauthenticated"
    # Leg 1 is older than the delivery window (consistency.limits.SAGA_DELIVERY_WINDOW_S):
    # nothing recorded, the money stays in flight for an operator.
    EXPIRED = "expired"


INBOUND_REFUSALS: Final = frozenset(
    {InboundCode.NOT_FOUND, InboundCode.CURRENCY_MISMATCH, InboundCode.BALANCE_LIMIT}
)


class SettleCode(StrEnum):
    SETTLED = "settled"
    REVERSED = "reversed"
    ALREADY = "already"  # settled or reversed before: ``status`` says which
    STALE_EPOCH = "stale_epoch"
    # The receipt does not check: not leg 2's answer. Nothing changed.
    UNAUTHENTICATED = "unauthenticated"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A pending cross-shard transfer as a relay delivers it."""

    transfer_id: uuid.UUID
    tenant: str
    source: int
    destination: int
    amount: int
    currency: str
    destination_shard: str  # as resolved at leg 1: names the transit account it credited
    attempts: int  # claims so far, this one included
    created_at: datetime  # leg 1's commit time (signed)
    # Leg 1's signature (sql/functions/saga.sql); None on a message written before the shard
    # had a saga key, which leg 2 refuses until the admin signs it.
    key_id: int | None = None
    mac: bytes | None = None


@dataclass(frozen=True, slots=True)
class InboundResult:
    code: InboundCode
    replayed: bool
    destination_balance: int | None  # after the credit; None unless applied
    destination_version: int | None
    # The shard whose transit account this leg 2 debited, when not the one answering: a replay
    # of an inbox row that arrived with a slot move (0003). The relay passes it to the settle.
    debit_shard: str | None = None
    # The destination's signed answer, which settle_outbound checks; None when nothing was
    # recorded (stale_epoch, wrong_shard, unauthenticated, expired).
    receipt: bytes | None = None


@dataclass(frozen=True, slots=True)
class SettleResult:
    code: SettleCode
    status: TransferStatus | None  # after the call; None for stale_epoch
    source_balance: int | None
    source_version: int | None


@dataclass(frozen=True, slots=True)
class EntryRow:
    account_id: int
    seq: int
    transfer_id: uuid.UUID
    counterparty: int
    amount: int
    balance_after: int
    created_at: datetime


# Longest wait for a pooled connection. Writes are batched (a couple in flight per shard) and
# reads are short, so a healthy pool hands one out in milliseconds.
ACQUIRE_TIMEOUT_S_MAX: Final = 1.0

# The batch travels as one jsonb parameter (an array of item arrays, regionstore/sql/functions/
# ledger.sql): psycopg dumping twelve arrays element by element cost ~460 us per batch of 17,
# orjson and one parameter ~24 us (issue 11).
_POST_TRANSFERS_SQL: Final = (
    "SELECT idx, code, transfer_id, status, created_at, source_balance, source_version,"
    " destination_balance, destination_version"
    " FROM txr.post_transfers_json(%s::bigint, %s::jsonb, %s::double precision)"
)
_APPLY_INBOUND_SQL: Final = (
    "SELECT code, replayed, destination_balance, destination_version, debit_shard, receipt"
    " FROM txr.apply_inbound(%s::bigint, %s::uuid, %s::text, %s::text, %s::bigint, %s::bigint,"
    " %s::bigint, %s::text, %s::bigint, %s::timestamptz, %s::int, %s::bytea)"
)
_SETTLE_OUTBOUND_SQL: Final = (
    "SELECT code, status, source_balance, source_version"
    " FROM txr.settle_outbound(%s::bigint, %s::uuid, %s::text, %s::text, %s::bytea)"
)
_CLAIM_OUTBOX_SQL: Final = (
    "SELECT transfer_id, tenant, source, destination, amount, currency, destination_shard,"
    " attempts, created_at, key_id, mac FROM txr.claim_outbox(%s::int, %s::float8)"
)
_DEFER_OUTBOX_SQL: Final = "SELECT txr.defer_outbox(%s::uuid, %s::float8)"
_OUTBOX_SIGNATURE_SQL: Final = "SELECT key_id, mac FROM txr.outbox WHERE transfer_id = %s::uuid"
_PRUNE_SQL: Final = (
    "SELECT idempotency_keys, account_open_keys, outbox, inbox FROM txr.prune_retained(%s::int)"
)
_OUTBOX_STATS_SQL: Final = (
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
    " FROM txr.outbox WHERE state = 'pending'"
)
_EVENT_PAGE_SQL: Final = {
    "accounts": "SELECT * FROM txr.event_accounts_page(%s, %s, %s, %s)",
    "transfers": "SELECT * FROM txr.event_transfers_page(%s, %s, %s, %s)",
}
_OUTBOX_NEXT_DUE_SQL: Final = (
    "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8"
    " FROM txr.outbox WHERE state = 'pending'"
)
# The channel post_transfers notifies on commit of a cross-shard leg 1.
OUTBOX_CHANNEL: Final = "txr_outbox"
# Reconnecting the LISTEN connection after a failure: at most this often, so a down primary
# does not turn the relay's wait into a connect loop (polling covers the gap).
LISTEN_RETRY_MIN_S: Final = 1.0
_CREATE_ACCOUNT_SQL: Final = (
    "SELECT code, created_at, account_id, currency, overdraft_limit, metadata"
    " FROM txr.create_account(%s::bigint, %s::bigint, %s::bigint, %s::text, %s::text,"
    " %s::bigint, %s::jsonb, %s::text, %s::bytea)"
)
_CLAIM_ACCOUNT_KEY_SQL: Final = (
    "SELECT code, account_id FROM txr.claim_account_key(%s::bigint, %s::text, %s::text,"
    " %s::bytea, %s::bigint, %s::text, %s::bigint, %s::jsonb)"
)
_RELEASE_ACCOUNT_KEY_SQL: Final = (
    "SELECT txr.release_account_key(%s::bigint, %s::text, %s::text, %s::bigint)"
)
_GET_ACCOUNT_SQL: Final = (
    "SELECT id, tenant, currency, balance, overdraft_limit, version, metadata, created_at"
    " FROM txr.accounts WHERE id = %s::bigint AND tenant = %s::text AND kind = 'customer'"
)
_GET_CUSTOMER_ACCOUNT_SQL: Final = (
    "SELECT id, tenant, currency, balance, overdraft_limit, version, metadata, created_at"
    " FROM txr.accounts WHERE id = %s::bigint AND kind = 'customer'"
)
_GET_TRANSFER_SQL: Final = (
    "SELECT id, tenant, source, destination, amount, currency, reference, status, created_at,"
    " refusal_code FROM txr.transfers WHERE id = %s::uuid AND tenant = %s::text"
)
# One round trip answers both "is the account visible" (no row) and "its page" (a row per entry,
# or one all-NULL row when it has none).
_LIST_ENTRIES_SQL: Final = (
    "SELECT e.account_id, e.seq, e.transfer_id, e.counterparty, e.amount, e.balance_after,"
    " e.created_at"
    " FROM txr.accounts a"
    " LEFT JOIN LATERAL ("
    "   SELECT le.account_id, le.seq, le.transfer_id, le.counterparty, le.amount,"
    "          le.balance_after, le.created_at"
    "   FROM txr.ledger_entries le"
    "   WHERE le.account_id = a.id AND le.seq < coalesce(%s::bigint, 9223372036854775807)"
    "   ORDER BY le.seq DESC LIMIT %s::int"
    " ) e ON true"
    " WHERE a.id = %s::bigint AND a.tenant = %s::text AND a.kind = 'customer'"
    " ORDER BY e.seq DESC"
)


def encode_items(items: Sequence[TransferItem]) -> str:
    """The batch as post_transfers_json reads it: one array per item, fields by position (the
    order of the function's jsonb_array_elements reads), the fingerprint as hex."""
    return orjson.dumps(
        [
            (
                str(it.transfer_id),
                it.tenant,
                it.source,
                it.destination,
                it.amount,
                it.currency,
                it.reference,
                it.idempotency_key,
                it.fingerprint.hex(),
                it.source_slot_epoch,
                it.destination_slot_epoch,
                it.destination_shard,
            )
            for it in items
        ]
    ).decode()


class _CallState:
    """What a call got as far as, so a failure can be classified (sent or not)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class ShardStore:
    """A pool of connections to one shard primary, as the app role."""

    def __init__(self, conninfo: str, *, name: str, pool_min: int = 2, pool_max: int = 10) -> None:
        assert 0 < pool_min <= pool_max
        self.name = name
        # Per connection: set when the server warned that a commit's synchronous-replication
        # wait was cancelled (checked after each write).
        self._sync_wait_cancelled: weakref.WeakKeyDictionary[Conn, bool] = (
            weakref.WeakKeyDictionary()
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._conninfo = conninfo
        # The dedicated LISTEN connection of wait_for_outbox (not pooled: it holds a session).
        self._listen: Conn | None = None
        self._listen_failed_at = -LISTEN_RETRY_MIN_S
        # True once a LISTEN connection was (re)opened and before a wait returned for it.
        self._listen_fresh = False
        # One waiter at a time on the LISTEN connection (psycopg allows one operation per
        # connection); a notification wakes whichever waiter holds it, the others poll.
        self._listen_lock = asyncio.Lock()
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            conninfo,
            min_size=pool_min,
            max_size=pool_max,
            open=False,
            name=f"shard-{name}",
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "prepare_threshold": PREPARE_THRESHOLD,
                "application_name": f"txr-router-{name}"[:63],
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            },
            configure=self._configure,
            # A connection the server closed while it sat in the pool (a cut link, a restart)
            # is discarded at checkout, never handed to a write that would then be unknown.
            check=pgwait.check_idle,
            max_waiting=POOL_MAX_WAITING,
            max_lifetime=POOL_MAX_LIFETIME_S,
            max_idle=POOL_MAX_IDLE_S,
            reconnect_timeout=POOL_RECONNECT_TIMEOUT_S,
            reconnect_failed=self._reconnect_failed,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, *, timeout_s: float) -> None:
        """Open the pool; wait up to ``timeout_s`` for a first connection, never fail on it.

        A router starts while a primary may be down (failover, cold start): the pool keeps
        connecting in the background and calls fail with StoreUnavailable until it succeeds.
        """
        await self._pool.open(wait=False)
        try:
            # Borrow and return one connection: proves the server answers. (The pool's own
            # wait() would close the pool on timeout, and this pool must keep trying.)
            conn = await self._pool.getconn(timeout=timeout_s)
            await self._pool.putconn(conn)
        except psycopg_pool.PoolTimeout:
            logger.warning("shard %s: no connection after %.1fs; retrying", self.name, timeout_s)

    async def close(self) -> None:
        await self._close_listen()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.close(timeout=POOL_CLOSE_TIMEOUT_S)

    async def _configure(self, conn: Conn) -> None:
        # Every integer we send is a bigint column: dump Python ints as int8 always, so a
        # statement has one parameter signature (one prepared plan), whatever the values.
        conn.adapters.register_dumper(int, Int8Dumper)
        conn.adapters.register_dumper(int, Int8BinaryDumper)
        self._sync_wait_cancelled[conn] = False
        ref = weakref.ref(conn)

        def on_notice(diag: pg_errors.Diagnostic) -> None:
            c = ref()
            if c is None:
                return
            if diag.sqlstate in _SYNC_WAIT_CANCELLED_SQLSTATES or (
                _SYNC_WAIT_CANCELLED_TEXT in (diag.message_primary or "")
            ):
                logger.warning("shard %s: %s", self.name, diag.message_primary)
                self._sync_wait_cancelled[c] = True

        conn.add_notice_handler(on_notice)

    def _reconnect_failed(self, pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
        logger.error("shard %s: reconnection attempts exhausted; retrying on demand", self.name)

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        op: Callable[[Conn], Awaitable[T]],
        *,
        timeout_s: float,
        write: bool,
        what: str,
    ) -> T:
        """Run ``op`` on a pooled connection within ``timeout_s``, classifying failures."""
        state = _CallState()
        deadline = time.monotonic() + timeout_s
        task = asyncio.ensure_future(self._on_connection(op, state, deadline, write, what))
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(task)
        except TimeoutError as exc:
            self._abandon(task)
            if write and state.sent:
                raise StoreOutcomeUnknown(
                    f"shard {self.name}: {what} timed out after {timeout_s}s once sent"
                ) from exc
            raise StoreUnavailable(
                f"shard {self.name}: {what} timed out after {timeout_s}s"
                + (" (read)" if state.sent else " before it was sent")
            ) from exc
        except asyncio.CancelledError:
            self._abandon(task)
            raise

    async def _fetchone(
        self,
        query: QueryNoTemplate,
        params: Params | None,
        *,
        timeout_s: float,
        write: bool,
        what: str,
    ) -> tuple[Any, ...] | None:
        """One statement through :meth:`_call`; its first row (None: no row)."""

        async def op(conn: Conn) -> tuple[Any, ...] | None:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

        return await self._call(op, timeout_s=timeout_s, write=write, what=what)

    async def _fetchall(
        self,
        query: QueryNoTemplate,
        params: Params | None,
        *,
        timeout_s: float,
        write: bool,
        what: str,
    ) -> list[tuple[Any, ...]]:
        """One statement through :meth:`_call`; all its rows."""

        async def op(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        return await self._call(op, timeout_s=timeout_s, write=write, what=what)

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """Cancel a call we stopped waiting for and let it clean up in the background."""
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: the caller already got its own exception
            return
        task.cancel()
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled():
                t.exception()

        task.add_done_callback(done)

    async def _on_connection(
        self,
        op: Callable[[Conn], Awaitable[T]],
        state: _CallState,
        deadline: float,
        write: bool,
        what: str,
    ) -> T:
        try:
            # Bounded separately from the call: a pool that has no connection for this long is
            # reconnecting to a dead server, and the caller does better to learn it now (and,
            # for a write, wait for a failover) than at the end of its deadline.
            wait_s = min(deadline - time.monotonic(), ACQUIRE_TIMEOUT_S_MAX)
            conn = await self._pool.getconn(timeout=max(wait_s, 0.001))
        except (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as exc:
            raise StoreUnavailable(f"shard {self.name}: no connection for {what}") from exc
        except psycopg_pool.PoolClosed as exc:
            raise StoreUnavailable(f"shard {self.name}: store closed") from exc
        try:
            state.sent = True
            self._sync_wait_cancelled[conn] = False
            try:
                result = await op(conn)
            except psycopg.Error as exc:
                raise self._classify(exc, conn, write, what) from exc
            if write and self._sync_wait_cancelled.get(conn, False):
                raise StoreOutcomeUnknown(
                    f"shard {self.name}: {what} committed locally but its synchronous "
                    "replication wait was cancelled"
                )
            return result
        finally:
            # The pool checks the state: a connection still running a query (cancelled
            # mid-call) is closed, one inside a transaction is rolled back, never reused as is.
            await self._pool.putconn(conn)

    def _classify(self, exc: psycopg.Error, conn: Conn, write: bool, what: str) -> StoreError:
        status = conn.pgconn.transaction_status
        if conn.closed or status not in (TransactionStatus.IDLE, TransactionStatus.INERROR):
            # The connection broke under the call: a write may have committed before it did.
            if write:
                return StoreOutcomeUnknown(f"shard {self.name}: {what}: connection lost ({exc})")
            return StoreUnavailable(f"shard {self.name}: {what}: connection lost ({exc})")
        # The server answered with an error on a live autocommit connection: the statement was
        # rolled back, the write certainly did not happen.
        sqlstate = exc.sqlstate or ""
        if sqlstate[:2] in _INVARIANT_SQLSTATE_CLASSES:
            return StoreInvariantViolation(
                f"shard {self.name}: {what} refused: {sqlstate} {exc.diag.message_primary}"
            )
        return StoreUnavailable(f"shard {self.name}: {what} rolled back: {sqlstate}")

    # -- writes ----------------------------------------------------------------------------

    async def post_transfers(
        self,
        shard_epoch: int,
        items: Sequence[TransferItem],
        *,
        timeout_s: float,
        relay_grace_s: float = 0.0,
    ) -> list[TransferResult]:
        """Post a batch in one transaction; one result per item, in order.

        ``relay_grace_s``: how long the caller itself will deliver the cross-shard items' leg 2
        before the relays take over (0: the relays start at once).
        """
        if len(items) > BATCH_ITEMS_MAX:
            raise ValueError(f"{len(items)} items exceed BATCH_ITEMS_MAX={BATCH_ITEMS_MAX}")
        if not items:
            return []
        params = (shard_epoch, encode_items(items), relay_grace_s)

        rows = await self._fetchall(
            _POST_TRANSFERS_SQL, params, timeout_s=timeout_s, write=True, what="post_transfers"
        )
        if [r[0] for r in rows] != list(range(len(items))):
            # Committed, but we cannot tell which item got what: the client must retry with
            # the same keys (replays), exactly as for any unknown outcome.
            raise StoreOutcomeUnknown(
                f"shard {self.name}: post_transfers returned {len(rows)} rows for {len(items)}"
            )
        return [
            TransferResult(
                code=_TRANSFER_CODES[r[1]],
                transfer_id=r[2],
                status=None if r[3] is None else STATUS_OF[r[3]],
                created_at=r[4],
                source_balance=r[5],
                source_version=r[6],
                destination_balance=r[7],
                destination_version=r[8],
            )
            for r in rows
        ]

    async def create_account(
        self,
        *,
        shard_epoch: int,
        slot_epoch: int,
        account_id: int,
        tenant: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        timeout_s: float,
        idempotency_key: str | None = None,
        fingerprint: bytes | None = None,
    ) -> tuple[CreateAccountCode, AccountRow | None]:
        """Create a customer account with balance 0 and version 1; the row when ``ok``, and
        for ``replayed`` the original account as it was opened (balance 0, version 1: the
        original answer). With ``idempotency_key`` (and the request's ``fingerprint``) the
        open happens at most once per (tenant, key)."""
        meta = dict(metadata)
        params = (
            shard_epoch,
            slot_epoch,
            account_id,
            tenant,
            currency,
            overdraft_limit,
            Jsonb(meta),
            idempotency_key,
            fingerprint,
        )

        async def op(conn: Conn) -> tuple[Any, ...] | None:
            cur = await conn.execute(_CREATE_ACCOUNT_SQL, params)
            return await cur.fetchone()

        row = await self._call(op, timeout_s=timeout_s, write=True, what="create_account")
        if row is None:
            raise StoreOutcomeUnknown(f"shard {self.name}: create_account returned no row")
        code = CreateAccountCode(row[0])
        if code not in (CreateAccountCode.OK, CreateAccountCode.REPLAYED):
            return code, None
        return code, AccountRow(
            id=int(row[2]),
            tenant=tenant,
            currency=str(row[3]),
            balance=0,
            overdraft_limit=int(row[4]),
            version=1,
            metadata=row[5],
            created_at=row[1],
        )

    async def claim_account_key(
        self,
        *,
        shard_epoch: int,
        tenant: str,
        key: str,
        fingerprint: bytes,
        account_id: int,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        timeout_s: float,
    ) -> tuple[CreateAccountCode, int | None]:
        """On the key's arbiter shard: ``(claimed, account_id)``, ``(replayed, the claimed
        id)``, or ``(key_reused | stale_epoch, None)`` (nothing written)."""
        params = (
            shard_epoch,
            tenant,
            key,
            fingerprint,
            account_id,
            currency,
            overdraft_limit,
            Jsonb(dict(metadata)),
        )

        async def op(conn: Conn) -> tuple[Any, ...] | None:
            cur = await conn.execute(_CLAIM_ACCOUNT_KEY_SQL, params)
            return await cur.fetchone()

        row = await self._call(op, timeout_s=timeout_s, write=True, what="claim_account_key")
        if row is None:
            raise StoreOutcomeUnknown(f"shard {self.name}: claim_account_key returned no row")
        return CreateAccountCode(row[0]), None if row[1] is None else int(row[1])

    async def release_account_key(
        self, *, shard_epoch: int, tenant: str, key: str, account_id: int, timeout_s: float
    ) -> bool:
        """Remove the key's claim if it still names ``account_id`` (whose id was taken)."""
        params = (shard_epoch, tenant, key, account_id)

        async def op(conn: Conn) -> bool:
            cur = await conn.execute(_RELEASE_ACCOUNT_KEY_SQL, params)
            row = await cur.fetchone()
            return bool(row is not None and row[0])

        return await self._call(op, timeout_s=timeout_s, write=True, what="release_account_key")

    # -- cross-shard saga (regionstore/sql/functions/saga.sql) -----------------------------

    async def apply_inbound(
        self,
        shard_epoch: int,
        *,
        transfer_id: uuid.UUID,
        source_shard: str,
        tenant: str,
        source: int,
        destination: int,
        amount: int,
        currency: str,
        destination_slot_epoch: int,
        created_at: datetime,
        key_id: int | None,
        mac: bytes | None,
        timeout_s: float,
    ) -> InboundResult:
        """Leg 2 on this (destination) shard, exactly once per ``transfer_id``.

        A first call applies or refuses and records the answer in the inbox; any later call
        returns the recorded answer with ``replayed=True``. stale_epoch / wrong_shard record
        nothing (deliver again after re-resolving the destination's shard). ``created_at``,
        ``key_id`` and ``mac`` are leg 1's signature: a message whose MAC does not check is
        answered ``unauthenticated`` and changes nothing.
        """
        params = (
            shard_epoch,
            transfer_id,
            source_shard,
            tenant,
            source,
            destination,
            amount,
            currency,
            destination_slot_epoch,
            created_at,
            key_id,
            mac,
        )

        row = await self._fetchone(
            _APPLY_INBOUND_SQL, params, timeout_s=timeout_s, write=True, what="apply_inbound"
        )
        if row is None:
            raise StoreOutcomeUnknown(f"shard {self.name}: apply_inbound returned no row")
        return InboundResult(
            code=InboundCode(row[0]),
            replayed=row[1],
            destination_balance=row[2],
            destination_version=row[3],
            debit_shard=row[4],
            receipt=None if row[5] is None else bytes(row[5]),
        )

    async def settle_outbound(
        self,
        shard_epoch: int,
        transfer_id: uuid.UUID,
        *,
        refusal_code: str | None,
        timeout_s: float,
        leg2_shard: str | None = None,
        receipt: bytes | None = None,
    ) -> SettleResult:
        """Record leg 2's answer on this (source) shard: settled (refusal_code None), or post
        the reversal with that code. Idempotent: a second call answers ``already``.

        ``leg2_shard``: the shard whose transit account leg 2 debited. When it is not the shard
        leg 1 named (the destination's slot moved), the settle moves leg 1's transit credit to
        the transit account toward it (0003), so every pair of shards still nets to zero.
        ``receipt``: leg 2's signed answer (InboundResult.receipt); without one that checks the
        call answers ``unauthenticated`` and changes nothing."""
        params = (shard_epoch, transfer_id, refusal_code, leg2_shard, receipt)

        row = await self._fetchone(
            _SETTLE_OUTBOUND_SQL, params, timeout_s=timeout_s, write=True, what="settle_outbound"
        )
        if row is None:
            raise StoreOutcomeUnknown(f"shard {self.name}: settle_outbound returned no row")
        return SettleResult(
            code=SettleCode(row[0]),
            status=None if row[1] is None else STATUS_OF[row[1]],
            source_balance=row[2],
            source_version=row[3],
        )

    async def claim_outbox(
        self, *, limit: int, lease_s: float, timeout_s: float
    ) -> list[OutboxMessage]:
        """Up to ``limit`` due pending messages, each leased for ``lease_s`` (not due again
        until then, so concurrent relays do not deliver the same message at once)."""

        rows = await self._fetchall(
            _CLAIM_OUTBOX_SQL,
            (limit, lease_s),
            timeout_s=timeout_s,
            write=True,
            what="claim_outbox",
        )
        return [
            OutboxMessage(
                transfer_id=r[0],
                tenant=r[1],
                source=r[2],
                destination=r[3],
                amount=r[4],
                currency=r[5],
                destination_shard=r[6],
                attempts=r[7],
                created_at=r[8],
                key_id=r[9],
                mac=None if r[10] is None else bytes(r[10]),
            )
            for r in rows
        ]

    async def outbox_signature(
        self, transfer_id: uuid.UUID, *, timeout_s: float
    ) -> tuple[int | None, bytes | None]:
        """Leg 1's (key id, MAC) of an outbox message, for a delivery that did not claim it
        (the router's inline one); (None, None) when there is no such row or it is unsigned."""

        row = await self._fetchone(
            _OUTBOX_SIGNATURE_SQL,
            (transfer_id,),
            timeout_s=timeout_s,
            write=False,
            what="outbox_signature",
        )
        if row is None:
            return None, None
        return row[0], None if row[1] is None else bytes(row[1])

    async def prune_retained(self, *, batch: int, timeout_s: float) -> dict[str, int]:
        """Delete at most ``batch`` expired rows of each kind (sql/functions/retention.sql):
        idempotency keys, account-open keys, final outbox rows, inbox rows. Returns the counts
        per kind; a count equal to ``batch`` means more is due."""

        row = await self._fetchone(
            _PRUNE_SQL, (batch,), timeout_s=timeout_s, write=True, what="prune_retained"
        )
        names = ("idempotency_keys", "account_open_keys", "outbox", "inbox")
        return dict(zip(names, (int(x) for x in row), strict=True)) if row else {}

    async def defer_outbox(
        self, transfer_id: uuid.UUID, *, delay_s: float, timeout_s: float
    ) -> None:
        """Make a pending message due again in ``delay_s`` (backoff after a failed attempt)."""

        async def op(conn: Conn) -> None:
            await conn.execute(_DEFER_OUTBOX_SQL, (transfer_id, delay_s))

        await self._call(op, timeout_s=timeout_s, write=True, what="defer_outbox")

    async def outbox_stats(self, *, timeout_s: float) -> tuple[int, float]:
        """(pending messages, age in seconds of the oldest one; 0 when none)."""

        row = await self._fetchone(
            _OUTBOX_STATS_SQL, None, timeout_s=timeout_s, write=False, what="outbox_stats"
        )
        if row is None:
            return 0, 0.0
        return int(row[0]), float(row[1])

    async def outbox_next_due_s(self, *, timeout_s: float) -> float | None:
        """Seconds until the next pending message is due (<= 0: due now); None: none pending.
        Reads the partial index of pending messages: one small query."""

        row = await self._fetchone(
            _OUTBOX_NEXT_DUE_SQL, None, timeout_s=timeout_s, write=False, what="outbox_next_due"
        )
        if row is None or row[0] is None:
            return None
        return float(row[0])

    async def accounts_committed_since(self, since: datetime, *, timeout_s: float) -> list[int]:
        """Accounts whose current row was committed at or after ``since``
        (sql/functions/changefeed.sql: the change feed's failover step). A full scan: run once
        per failover, never per request."""

        rows = await self._fetchall(
            "SELECT id FROM txr.accounts_committed_since(%s)",
            (since,),
            timeout_s=timeout_s,
            write=False,
            what="accounts_committed_since",
        )
        return [int(r[0]) for r in rows]

    async def event_rows_page(
        self,
        table: Literal["accounts", "transfers"],
        since: datetime | None,
        after: tuple[Any, Any] | None,
        *,
        limit: int,
        timeout_s: float,
    ) -> list[tuple[Any, ...]]:
        """One keyset page of the accounts opened, or the transfers written, at or after
        ``since`` (None: all): at most ``limit`` rows after the (created_at, id) ``after``
        (None: from the first), in that order, as rows of sql/functions/events.sql. The event
        publisher's step after a new replication slot."""
        query = _EVENT_PAGE_SQL[table]
        after_at, after_id = (None, None) if after is None else after

        return await self._fetchall(
            query,
            (since, after_at, after_id, limit),
            timeout_s=timeout_s,
            write=False,
            what=f"event_{table}_page",
        )

    async def wait_for_outbox(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a leg-1 commit's notification: True when one came.

        Uses a dedicated LISTEN connection, opened on first use and reopened after a failure
        (at most every LISTEN_RETRY_MIN_S). A notification sent while we were not waiting is
        queued on the connection and returns at once next time; one sent while no connection
        listened is lost, so the first wait on a (re)opened connection returns True at once
        (the caller then looks for due work itself). Never raises for a connection problem: it
        waits out the timeout and returns False.
        """
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._listen_lock.acquire()
        except TimeoutError:
            return False
        try:
            return await self._wait_locked(deadline)
        finally:
            self._listen_lock.release()

    async def _wait_locked(self, deadline: float) -> bool:
        try:
            conn = await self._listen_connection(deadline)
            if conn is not None and self._listen_fresh:
                self._listen_fresh = False
                return True
            if conn is not None:
                # Wait in the kernel (pgwait: psycopg's notifies() alone wakes every 0.1 s),
                # then let psycopg read what came: a notification, or end of file (raises).
                if not await pgwait.readable(conn, max(deadline - time.monotonic(), 0.0)):
                    return False
                remaining = max(deadline - time.monotonic(), 0.0)
                async for _ in conn.notifies(timeout=remaining, stop_after=1):
                    return True
                return False
        except (psycopg.Error, TimeoutError, OSError) as exc:
            logger.warning("shard %s: outbox LISTEN connection failed: %s", self.name, exc)
            self._listen_failed_at = time.monotonic()
            await self._close_listen()
        except asyncio.CancelledError:
            # Interrupted mid-wait: the connection's protocol state is unknown; start afresh.
            await self._close_listen()
            raise
        await asyncio.sleep(max(deadline - time.monotonic(), 0.0))
        return False

    async def _listen_connection(self, deadline: float) -> Conn | None:
        if self._listen is not None and not self._listen.closed:
            return self._listen
        if time.monotonic() - self._listen_failed_at < LISTEN_RETRY_MIN_S:
            return None
        await self._close_listen()
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=f"txr-listen-{self.name}"[:63],
            )
            self._listen = conn
            await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
            # Notifications sent while no connection listened are lost: the caller must look.
            self._listen_fresh = True
        return conn

    async def _close_listen(self) -> None:
        conn, self._listen = self._listen, None
        if conn is not None and not conn.closed:
            # Already broken or not: nothing else to release.
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    # -- reads -----------------------------------------------------------------------------

    async def get_account(
        self, account_id: int, tenant: str, *, timeout_s: float
    ) -> AccountRow | None:
        """The account, or None when missing, another tenant's, or a transit account."""
        return await self._fetch_one(
            AccountRow, _GET_ACCOUNT_SQL, (account_id, tenant), timeout_s, "get_account"
        )

    async def get_customer_account(self, account_id: int, *, timeout_s: float) -> AccountRow | None:
        """The customer account whatever its tenant (None: missing or transit). For shared work
        only (the cache fill that every tenant's reads join); the caller checks the tenant."""
        return await self._fetch_one(
            AccountRow, _GET_CUSTOMER_ACCOUNT_SQL, (account_id,), timeout_s, "get_account"
        )

    async def get_transfer(
        self, transfer_id: uuid.UUID, tenant: str, *, timeout_s: float
    ) -> TransferRow | None:
        return await self._fetch_one(
            TransferRow, _GET_TRANSFER_SQL, (transfer_id, tenant), timeout_s, "get_transfer"
        )

    async def _fetch_one(
        self, cls: type[R], sql: str, params: tuple[Any, ...], timeout_s: float, what: str
    ) -> R | None:
        """One row as ``cls``; the query's column names are the dataclass's field names."""

        async def op(conn: Conn) -> R | None:
            cur = conn.cursor(row_factory=class_row(cls))
            await cur.execute(sql, params)
            return await cur.fetchone()

        return await self._call(op, timeout_s=timeout_s, write=False, what=what)

    async def list_entries(
        self,
        account_id: int,
        tenant: str,
        *,
        before_seq: int | None,
        limit: int,
        timeout_s: float,
    ) -> list[EntryRow] | None:
        """Entries newest first (seq < before_seq when given); None when not visible."""
        if not ENTRIES_PAGE_MIN <= limit <= ENTRIES_PAGE_MAX:
            raise ValueError(f"limit {limit} outside {ENTRIES_PAGE_MIN}..{ENTRIES_PAGE_MAX}")

        rows = await self._fetchall(
            _LIST_ENTRIES_SQL,
            (before_seq, limit, account_id, tenant),
            timeout_s=timeout_s,
            write=False,
            what="list_entries",
        )
        if not rows:
            return None
        return [
            EntryRow(
                account_id=r[0],
                seq=r[1],
                transfer_id=r[2],
                counterparty=r[3],
                amount=r[4],
                balance_after=r[5],
                created_at=r[6],
            )
            for r in rows
            if r[0] is not None
        ]

    async def ping(self, *, timeout_s: float) -> float:
        """Round-trip seconds of ``SELECT 1`` on a pooled connection (acquire excluded)."""

        async def op(conn: Conn) -> float:
            start = time.perf_counter()
            cur = await conn.execute("SELECT 1")
            await cur.fetchone()
            return time.perf_counter() - start

        return await self._call(op, timeout_s=timeout_s, write=False, what="ping")
