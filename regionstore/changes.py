"""The change feed's typed changes: what one committed transaction of a shard did to the rows
the region caches and the event log are built from (account rows, transfer rows, slot moves).

A decoder produces them (``regionstore.pgoutput`` from a logical replication stream); the feed
(``regionstore.changefeed``) hands them out in durable batches; the fan-out to the regions'
caches (``router.feedsink``, ``router.relays.feed``) and the events (``router.events``) consume
them. Plain frozen data: nothing here reads a socket or knows the protocol.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# The transfer columns the publication carries (migration 0007; all of them arrive as text):
# the keys of ``TransferChange.row``.
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


@dataclass(frozen=True, slots=True)
class AccountChange:
    """One account row as committed. ``row`` None: the row is incomplete (a cached column did
    not arrive: an unchanged TOAST value, a NULL, a relation without it) or was deleted: the
    cache must drop it at ``version``."""

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


def committed_accounts(txns: Sequence[CommittedTxn]) -> dict[int, AccountChange]:
    """The last change of each account across ``txns`` (they are in commit order)."""
    out: dict[int, AccountChange] = {}
    for t in txns:
        for c in t.changes:
            prev = out.get(c.account_id)
            if prev is None or c.deleted or c.version >= prev.version:
                out[c.account_id] = c
    return out
