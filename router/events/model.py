"""Events as derived from committed transactions: types, stable ids, JSON bodies.

``events_of(txn, ...)`` is a pure function of one committed transaction of one shard (as the
change feed hands it out), so a decoder that reads the same WAL again derives the same events
with the same ids and bodies, and a republish is a duplicate, never a new event:

* an account row inserted (customer accounts only: transit accounts are the shard's own) ->
  ``account.created``;
* a transfer row inserted with status ``settled`` (a same-shard transfer) -> ``transfer.settled``
  only; inserted ``pending`` (leg 1 of a cross-shard saga) -> ``transfer.pending``; its status
  updated to ``settled`` or ``reversed`` (the settle) -> that event;
* nothing for a slot move's copies (``txn.slot_move``): those rows' events came from the shard
  that committed them; nothing for a refused transfer (it writes no row).

Event id = ``evt_`` + 32 hex of SHA-256 over (type, object id): one object has one event per
type, whichever shard or decoder derives it. ``created_at`` is the commit time.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from consistency import ids
from consistency.saga import TransferStatus
from regionstore.changes import CommittedTxn, TransferChange
from router import render
from router.events import stream

ACCOUNT_CREATED: Final = "account.created"
TRANSFER_PENDING: Final = "transfer.pending"
TRANSFER_SETTLED: Final = "transfer.settled"
TRANSFER_REVERSED: Final = "transfer.reversed"
EVENT_TYPES: Final = (ACCOUNT_CREATED, TRANSFER_PENDING, TRANSFER_SETTLED, TRANSFER_REVERSED)
# A stored status (a plain str from the change feed) looks its member up: StrEnum members hash
# and compare as their values.
_TRANSFER_TYPES: Final[dict[str, str]] = {
    TransferStatus.PENDING: TRANSFER_PENDING,
    TransferStatus.SETTLED: TRANSFER_SETTLED,
    TransferStatus.REVERSED: TRANSFER_REVERSED,
}
TRANSIT_TENANT: Final = "__transit__"
EVENT_ID_HEX: Final = 32


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    tenant: str
    created_at: str
    data: dict[str, Any]
    # The end of the committing transaction in its shard's WAL: the publisher's position.
    end_lsn: int

    @property
    def subject(self) -> str:
        return stream.subject(self.tenant, self.type)

    @property
    def accounts(self) -> tuple[str, ...]:
        """The accounts whose event sequence this is part of (the publisher keeps each one's
        in commit order): the account opened, or a transfer's source and destination."""
        if self.type == ACCOUNT_CREATED:
            return (str(self.data["id"]),)
        return (str(self.data["source"]), str(self.data["destination"]))

    def body(self) -> bytes:
        """The public JSON (API.md): the NATS payload and the webhook body, byte for byte."""
        return orjson.dumps(
            {"id": self.id, "type": self.type, "created_at": self.created_at, "data": self.data}
        )


def event_id(event_type: str, object_id: str) -> str:
    digest = hashlib.sha256(f"{event_type}\0{object_id}".encode()).hexdigest()
    return "evt_" + digest[:EVENT_ID_HEX]


# Distinct timestamps remembered by _ts: a batch's transfers share their transaction's
# created_at (now() is the transaction's start), so one parse serves the whole batch; a few
# hundred cover the transactions of one publish call.
TIMESTAMPS_MEMO: Final = 512


@functools.lru_cache(maxsize=TIMESTAMPS_MEMO)
def _ts(text: str) -> str:
    return render.timestamp(dt.datetime.fromisoformat(text))


def _int(v: str | None) -> int:
    if v is None:
        raise ValueError("a NOT NULL column arrived as NULL")
    return int(v)


def transfer_data(row: dict[str, str | None]) -> dict[str, Any]:
    source = _int(row["source"])
    tid = uuid.UUID(str(row["id"]))
    return {
        "id": ids.format_transfer_id(ids.account_slot(source), tid),
        "source": ids.format_account_id(source),
        "destination": ids.format_account_id(_int(row["destination"])),
        "amount": _int(row["amount"]),
        "currency": str(row["currency"]),
        "reference": row["reference"],
        "status": str(row["status"]),
        "refusal_code": row["refusal_code"],
        "created_at": _ts(str(row["created_at"])),
    }


def _transfer_event(change: TransferChange, created_at: str, end_lsn: int) -> Event | None:
    row = change.row
    status = str(row["status"])
    event_type = _TRANSFER_TYPES.get(status)
    if event_type is None:
        return None
    if not change.inserted and status == TransferStatus.PENDING:
        return None  # an update that leaves it pending (attempt counters live in the outbox)
    data = transfer_data(row)
    return Event(
        event_id(event_type, data["id"]),
        event_type,
        str(row["tenant"]),
        created_at,
        data,
        end_lsn,
    )


def events_of(txn: CommittedTxn, *, shard: str, home_region: str | None) -> list[Event]:
    """The events of one committed transaction of ``shard``, in change order (accounts first:
    an account is always opened in a transaction of its own). ``home_region`` is the shard's,
    as the account object shows it."""
    if txn.slot_move:
        return []
    created_at = render.timestamp(txn.commit_time)
    out: list[Event] = []
    for change in txn.changes:
        row = change.row
        if not change.inserted or row is None or row.get("tenant") == TRANSIT_TENANT:
            continue
        account_id = int(row["id"])
        data = {
            "id": ids.format_account_id(account_id),
            "currency": row["currency"],
            "balance": row["balance"],
            "overdraft_limit": row["overdraft_limit"],
            "home_region": home_region,
            "shard": shard,
            "version": row["version"],
            "metadata": row["metadata"],
            "created_at": _ts(str(row["created_at"])),
        }
        out.append(
            Event(
                event_id(ACCOUNT_CREATED, data["id"]),
                ACCOUNT_CREATED,
                str(row["tenant"]),
                created_at,
                data,
                txn.end_lsn,
            )
        )
    for t in txn.transfers:
        ev = _transfer_event(t, created_at, txn.end_lsn)
        if ev is not None:
            out.append(ev)
    return out


def events_of_rows(
    accounts: Sequence[tuple[Any, ...]],
    transfers: Sequence[tuple[Any, ...]],
    *,
    shard: str,
    home_region: str | None,
    since: dt.datetime | None,
) -> list[Event]:
    """The events of the rows ``regionstore`` read after a new replication slot
    (sql/functions/events.sql), each as the commit-time derivation would have made it:
    account.created for an account opened at or after ``since``; for a transfer, pending if a
    saga's leg 1 was at or after ``since``, and its final state (settled or reversed) if its
    current row is. Every id is the one ``events_of`` gives, so what was already published
    is a duplicate. ``end_lsn`` is 0: these precede the new slot's first commit.

    In the order of their commits as the rows show them (an insert's ``created_at``, a final
    state's commit timestamp), so one account's events among these keep its commit order: a
    saga settled after a later transfer of its account comes after that transfer, not next to
    its pending. The order holds within one call (one page of rows)."""
    out: list[tuple[dt.datetime, Event]] = []
    for acc_id, tenant, currency, metadata, created_at in accounts:
        if tenant == TRANSIT_TENANT:
            continue
        data: dict[str, Any] = {
            "id": ids.format_account_id(int(acc_id)),
            "currency": str(currency),
            # As opened: an account starts at zero, version 1 (the event records the opening).
            "balance": 0,
            "overdraft_limit": 0,
            "home_region": home_region,
            "shard": shard,
            "version": 1,
            "metadata": dict(metadata),
            "created_at": render.timestamp(created_at),
        }
        out.append(
            (
                created_at,
                Event(
                    event_id(ACCOUNT_CREATED, data["id"]),
                    ACCOUNT_CREATED,
                    str(tenant),
                    render.timestamp(created_at),
                    data,
                    0,
                ),
            )
        )
    for (
        tid,
        tenant,
        source,
        destination,
        amount,
        currency,
        reference,
        status,
        created_at,
        refusal_code,
        cross_shard,
        committed_at,
    ) in transfers:
        tdata: dict[str, Any] = {
            "id": ids.format_transfer_id(ids.account_slot(int(source)), tid),
            "source": ids.format_account_id(int(source)),
            "destination": ids.format_account_id(int(destination)),
            "amount": int(amount),
            "currency": str(currency),
            "reference": reference,
            "status": str(status),
            "refusal_code": refusal_code,
            "created_at": render.timestamp(created_at),
        }
        when = render.timestamp(committed_at or created_at)
        inserted_since = since is None or created_at >= since
        if cross_shard and inserted_since:
            pending = {**tdata, "status": TransferStatus.PENDING.value, "refusal_code": None}
            out.append(
                (
                    created_at,
                    Event(
                        event_id(TRANSFER_PENDING, tdata["id"]),
                        TRANSFER_PENDING,
                        str(tenant),
                        render.timestamp(created_at),
                        pending,
                        0,
                    ),
                )
            )
        final = _TRANSFER_TYPES.get(str(status))
        changed_since = (
            since is None or inserted_since or (committed_at is not None and committed_at >= since)
        )
        if final is not None and final != TRANSFER_PENDING and changed_since:
            out.append(
                (
                    committed_at or created_at,
                    Event(event_id(final, tdata["id"]), final, str(tenant), when, tdata, 0),
                )
            )
    # Stable: a pending and its final state at one instant (a clock tick) stay in that order.
    out.sort(key=lambda pair: pair[0])
    return [ev for _, ev in out]


def row_page_key(table: str, row: Sequence[Any]) -> tuple[Any, Any]:
    """The keyset position (created_at, id) of a row of sql/functions/events.sql's pages."""
    if table == "accounts":
        return (row[4], row[0])
    return (row[8], row[0])
