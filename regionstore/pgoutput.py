"""pgoutput (protocol 1) messages parsed into the feed's typed changes (``regionstore.changes``).

``PgOutputParser`` takes every XLogData payload of a logical replication stream in order and
returns a ``CommittedTxn`` at each commit: the account rows (the region caches' payloads), the
transfer rows (the events' source) and whether the transaction was a slot move's copy. Relation
messages are remembered by id; rows of other relations are skipped. Message layouts as
PostgreSQL's "Logical Replication Message Formats" documents them; every value arrives as text
(the stream is started without ``binary``). A message the parser cannot read raises
``PgOutputError``: the stream is then unusable (the feed closes it and reads again from its
replication slot), never skipped.

Only the bytes of a message are read here: no socket, no slot, no durability (all
``regionstore.changefeed``'s).
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from dataclasses import dataclass, field
from typing import Final, cast

import orjson

from consistency import coherence
from regionstore.changes import (
    TRANSFER_FIELDS,
    AccountChange,
    CommittedTxn,
    TransferChange,
)

ACCOUNTS_RELATION: Final = ("txr", "accounts")
TRANSFERS_RELATION: Final = ("txr", "transfers")
SLOT_MOVES_RELATION: Final = ("txr", "slot_moves")
# pgoutput protocol 1 is what PostgreSQL 15 needs for column lists and non-streamed
# transactions; 2 (streaming of in-progress transactions) would hand us uncommitted changes.
PROTO_VERSION: Final = 1

# PostgreSQL's timestamps (commit times here, the client's clock in a status update) count
# microseconds from this instant.
PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
PG_USEC: Final = dt.timedelta(microseconds=1)


class PgOutputError(Exception):
    """A message that is not what protocol 1 with this publication sends."""


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
            self._clear()
            return None
        if kind == b"C":
            # flags(1) commit lsn(8) end lsn(8) commit time(8)
            _, commit_lsn, end_lsn, ts = struct.unpack_from("!bQQq", buf, 1)
            txn = CommittedTxn(
                commit_lsn,
                end_lsn,
                PG_EPOCH + ts * PG_USEC,
                tuple(self._changes.values()),
                tuple(self._transfers),
                self._slot_move,
            )
            self._in_txn = False
            self._clear()
            return txn
        if kind == b"R":
            self._relation(buf)
            return None
        # 'Y' types, 'O' origins, 'T' truncates (never of accounts: the schema forbids it to
        # the app role), 'M' messages (not requested): nothing the caches need.
        return None

    def _clear(self) -> None:
        """Forget the transaction's rows (at its Begin, and once its Commit handed them out)."""
        self._changes = {}
        self._transfers = []
        self._slot_move = False

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
            raise PgOutputError(f"change of relation {relid} before its Relation message")
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
            raise PgOutputError("an account change without its id")
        account_id = int(raw_id)
        raw_version = named["version"]
        if kind == b"D":
            # A delete carries only the key (replica identity): no version. The row left this
            # shard (a slot move); its new home's feed fills it. Version 0 = "drop, whatever".
            version = int(raw_version) if isinstance(raw_version, str) else 0
            return AccountChange(account_id, version, None, deleted=True)
        if not isinstance(raw_version, str):
            raise PgOutputError(f"account {account_id}: change without a version")
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
            raise PgOutputError(f"transfer change without its {missing}")
        row = cast(dict[str, str | None], dict(zip(TRANSFER_FIELDS, picked, strict=True)))
        if row["id"] is None or row["status"] is None:
            raise PgOutputError("a transfer change without its id or status")
        self._transfers.append(TransferChange(row, kind == b"I"))


class _Unchanged:
    """An unchanged TOAST value (pgoutput 'u'): not sent, so the row is incomplete."""


_UNCHANGED: Final = _Unchanged()


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
            raise PgOutputError(
                f"tuple column kind {bytes([kind])!r} not requested (binary is off)"
            )
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
