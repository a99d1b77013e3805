"""The pgoutput parser (regionstore.pgoutput.PgOutputParser) on hand-built protocol-1 messages.

The messages are laid out as PostgreSQL's logical replication protocol documents them
("Logical Replication Message Formats"); the integration tests run the same parser on a real
walsender's stream.
"""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from consistency import coherence
from regionstore.changefeed import repl_slot_prefix, status_update
from regionstore.changes import committed_accounts
from regionstore.pgoutput import PgOutputError, PgOutputParser

ACCOUNTS_RELID = 16400
OTHER_RELID = 16500
COLUMNS = (
    "id",
    "tenant",
    "currency",
    "balance",
    "overdraft_limit",
    "version",
    "metadata",
    "created_at",
)
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def relation(relid: int, namespace: str, name: str, columns: tuple[str, ...]) -> bytes:
    out = b"R" + struct.pack("!I", relid) + cstr(namespace) + cstr(name) + b"d"
    out += struct.pack("!h", len(columns))
    for i, col in enumerate(columns):
        out += bytes([1 if i == 0 else 0]) + cstr(col) + struct.pack("!Ii", 25, -1)
    return out


def tuple_data(values: list[str | bytes | None]) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == b"u":
            out += b"u"
        else:
            assert isinstance(v, str)
            raw = v.encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def begin(final_lsn: int = 0x100, xid: int = 7) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, 0, xid)


def commit(commit_lsn: int, end_lsn: int, when: dt.datetime) -> bytes:
    us = int((when - PG_EPOCH) / dt.timedelta(microseconds=1))
    return b"C" + struct.pack("!bQQq", 0, commit_lsn, end_lsn, us)


def row(
    acc: int, version: int, balance: int = 5, metadata: str = '{"a": "it\'s"}'
) -> list[str | bytes | None]:
    return [
        str(acc),
        "tenant-1",
        "EUR",
        str(balance),
        "0",
        str(version),
        metadata,
        "2026-12-01 07:00:00.123456+00",
    ]


def insert(relid: int, values: list[str | bytes | None]) -> bytes:
    return b"I" + struct.pack("!I", relid) + b"N" + tuple_data(values)


def update(relid: int, values: list[str | bytes | None], old_key: int | None = None) -> bytes:
    out = b"U" + struct.pack("!I", relid)
    if old_key is not None:
        out += b"K" + tuple_data([str(old_key), None, None, None, None, None, None, None])
    return out + b"N" + tuple_data(values)


def delete(relid: int, acc: int) -> bytes:
    key = [str(acc), None, None, None, None, None, None, None]
    return b"D" + struct.pack("!I", relid) + b"K" + tuple_data(key)


def feed_all(parser: PgOutputParser, msgs: list[bytes]) -> list[object]:
    return [t for m in msgs if (t := parser.feed(m)) is not None]


WHEN = dt.datetime(2026, 12, 1, 7, 0, 1, 250000, tzinfo=dt.UTC)


def test_a_transaction_of_account_rows() -> None:
    p = PgOutputParser()
    txns = feed_all(
        p,
        [
            relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS),
            begin(),
            insert(ACCOUNTS_RELID, row(11, 1)),
            update(ACCOUNTS_RELID, row(12, 4, balance=-3)),
            commit(0x1000, 0x1040, WHEN),
        ],
    )
    assert len(txns) == 1
    (t,) = txns
    assert t.commit_lsn == 0x1000
    assert t.end_lsn == 0x1040
    assert t.commit_time == WHEN
    by_id = {c.account_id: c for c in t.changes}
    assert set(by_id) == {11, 12}
    c = by_id[12]
    assert c.version == 4
    assert c.row is not None
    assert set(c.row) == set(coherence.ACCOUNT_FIELDS)
    assert c.row["balance"] == -3
    assert c.row["metadata"] == {"a": "it's"}
    assert c.row["tenant"] == "tenant-1"
    assert dt.datetime.fromisoformat(c.row["created_at"]) == dt.datetime(
        2026, 12, 1, 7, 0, 0, 123456, tzinfo=dt.UTC
    )


def test_last_version_of_an_account_wins_within_and_across_transactions() -> None:
    p = PgOutputParser()
    msgs = [
        relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS),
        begin(),
        update(ACCOUNTS_RELID, row(11, 2)),
        update(ACCOUNTS_RELID, row(11, 3)),
        commit(0x10, 0x20, WHEN),
        begin(),
        update(ACCOUNTS_RELID, row(11, 4), old_key=11),
        commit(0x30, 0x40, WHEN),
    ]
    txns = feed_all(p, msgs)
    assert [len(t.changes) for t in txns] == [1, 1]
    assert txns[0].changes[0].version == 3
    last = committed_accounts(txns)
    assert last[11].version == 4


def test_unchanged_toast_makes_a_tombstone_and_other_tables_are_skipped() -> None:
    p = PgOutputParser()
    incomplete = row(11, 5)
    incomplete[6] = b"u"
    txns = feed_all(
        p,
        [
            relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS),
            relation(OTHER_RELID, "txr", "ledger_entries", ("id", "amount")),
            begin(),
            insert(OTHER_RELID, ["1", "100"]),
            update(ACCOUNTS_RELID, incomplete),
            delete(ACCOUNTS_RELID, 13),
            b"Y" + struct.pack("!I", 99) + cstr("pg_catalog") + cstr("int8"),
            commit(0x50, 0x60, WHEN),
        ],
    )
    (t,) = txns
    by_id = {c.account_id: c for c in t.changes}
    assert set(by_id) == {11, 13}
    assert by_id[11].row is None
    assert by_id[11].version == 5
    assert not by_id[11].deleted
    assert by_id[13].deleted
    assert by_id[13].row is None


def test_a_null_or_missing_column_makes_a_tombstone_not_a_payload() -> None:
    """Any cached column the stream does not carry (NULL, or a relation without it) leaves the
    row incomplete: the region gets a tombstone at that version, never a partial payload."""
    p = PgOutputParser()
    with_null = row(11, 5)
    with_null[1] = None
    narrower = tuple(c for c in COLUMNS if c != "metadata")
    short = [v for i, v in enumerate(row(12, 6)) if COLUMNS[i] != "metadata"]
    txns = feed_all(
        p,
        [
            relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS),
            begin(),
            update(ACCOUNTS_RELID, with_null),
            commit(0x50, 0x60, WHEN),
            relation(ACCOUNTS_RELID, "txr", "accounts", narrower),
            begin(),
            update(ACCOUNTS_RELID, short),
            commit(0x70, 0x80, WHEN),
        ],
    )
    first, second = txns
    assert [(c.account_id, c.version, c.row) for c in first.changes] == [(11, 5, None)]
    assert [(c.account_id, c.version, c.row) for c in second.changes] == [(12, 6, None)]


def test_a_relation_changed_mid_stream_is_followed() -> None:
    """A Relation message is resent after a schema change; columns are read by name."""
    p = PgOutputParser()
    reordered = ("version", *(c for c in COLUMNS if c != "version"))
    values = row(11, 9)
    values = [values[5], *(v for i, v in enumerate(values) if i != 5)]
    txns = feed_all(
        p,
        [
            relation(ACCOUNTS_RELID, "txr", "accounts", reordered),
            begin(),
            update(ACCOUNTS_RELID, values),
            commit(0x70, 0x80, WHEN),
        ],
    )
    (t,) = txns
    assert t.changes[0].version == 9
    assert t.changes[0].row is not None
    assert t.changes[0].row["balance"] == 5


def test_protocol_violations_end_the_stream() -> None:
    p = PgOutputParser()
    with pytest.raises(PgOutputError, match="before its Relation"):
        p.feed(insert(ACCOUNTS_RELID, row(11, 1)))
    p.feed(relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS))
    binary = b"I" + struct.pack("!I", ACCOUNTS_RELID) + b"N" + struct.pack("!h", 1) + b"b"
    with pytest.raises(PgOutputError, match="binary"):
        p.feed(binary)
    no_version = row(11, 1)
    no_version[5] = None
    with pytest.raises(PgOutputError, match="without a version"):
        p.feed(update(ACCOUNTS_RELID, no_version))


def test_status_update_and_slot_names() -> None:
    msg = status_update(0x30, 0x20, 0x20, reply=True)
    kind, write, flush, apply, _, reply = struct.unpack("!cQQQqb", msg)
    assert (kind, write, flush, apply, reply) == (b"r", 0x30, 0x20, 0x20, 1)
    a, b = repl_slot_prefix("us-east-1"), repl_slot_prefix("us_east-1")
    assert a != b, "the hash keeps sanitised names apart"
    assert a.startswith("txr_feed_us_east_1_")
    long = repl_slot_prefix("x" * 200)
    assert len(long) + 8 <= 63


TRANSFERS_RELID = 16600
SLOT_MOVES_RELID = 16700
TRANSFER_COLUMNS = (
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


def transfer_row(tid: str, status: str) -> list[str | bytes | None]:
    return [tid, "tenant-1", "11", "12", "250", "EUR", None, status, "2026-12-01 07:00:00+00", None]


def test_transfer_rows_and_slot_moves_for_the_events() -> None:
    """Migration 0006's tables: transfer inserts and updates in change order (deletes, a slot
    move's source half, are not events), and a slot_moves row marks the transaction."""
    tid = "0b7f0e4e-3d59-4c8e-9d41-2f1f6c0d0a01"
    p = PgOutputParser()
    txns = feed_all(
        p,
        [
            relation(ACCOUNTS_RELID, "txr", "accounts", COLUMNS),
            relation(TRANSFERS_RELID, "txr", "transfers", TRANSFER_COLUMNS),
            relation(SLOT_MOVES_RELID, "txr", "slot_moves", ("move_id", "direction")),
            begin(),
            insert(ACCOUNTS_RELID, row(11, 2)),
            insert(TRANSFERS_RELID, transfer_row(tid, "pending")),
            commit(0x1000, 0x1040, WHEN),
            begin(),
            update(TRANSFERS_RELID, transfer_row(tid, "settled")),
            b"D" + struct.pack("!I", TRANSFERS_RELID) + b"K" + tuple_data([tid] + [None] * 9),
            commit(0x2000, 0x2040, WHEN),
            begin(),
            insert(ACCOUNTS_RELID, row(13, 1)),
            insert(SLOT_MOVES_RELID, ["5c1e2a7e-0000-4000-8000-000000000001", "in"]),
            commit(0x3000, 0x3040, WHEN),
        ],
    )
    first, second, moved = txns
    assert [(t.row["status"], t.inserted) for t in first.transfers] == [("pending", True)]
    assert first.changes[0].inserted
    assert not first.slot_move
    assert [(t.row["status"], t.inserted) for t in second.transfers] == [("settled", False)]
    assert second.transfers[0].row["reference"] is None
    assert not second.slot_move
    assert moved.slot_move
    assert moved.transfers == ()
