"""Shard administration for the launcher and operators (sync psycopg, admin role).

Every change to the fencing rows (``txr.fence``, ``txr.owned_slots``) takes the fence advisory
lock *exclusively* in its transaction. The write procedures hold it shared for their whole
transaction, so a change waits for every in-flight write to commit, and every write that starts
later reads the new rows: there is no window in which a write can pass a fence already reported
as set.

Epochs only move forward (a fencing token that could go back would let a stale router in
again), so these functions refuse to lower one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg

from consistency.limits import SLOT_COUNT

CONNECT_TIMEOUT_S: Final = 10
# The exclusive fence lock waits for in-flight write transactions; those are bounded by the
# routers' call timeouts (seconds), so waiting longer than this means a stuck session.
FENCE_LOCK_TIMEOUT_MS: Final = 30_000
# Discrepancies listed by ledger_check (the counts are always complete).
LEDGER_CHECK_LIST_MAX: Final = 100


class EpochRegression(ValueError):
    """An admin call tried to move an epoch backwards."""


def _connect(admin_dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(admin_dsn, connect_timeout=CONNECT_TIMEOUT_S)


def _lock_fence(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    conn.execute(f"SET LOCAL lock_timeout = '{FENCE_LOCK_TIMEOUT_MS}ms'")
    conn.execute("SELECT pg_advisory_xact_lock(txr.fence_lock_key())")


def _check_slot(slot: int) -> None:
    if not 0 <= slot < SLOT_COUNT:
        raise ValueError(f"slot {slot} outside 0..{SLOT_COUNT - 1}")


def init_shard(admin_dsn: str, *, epoch: int, slots: Sequence[int], slot_epoch: int) -> None:
    """Set the shard epoch (unfenced) and own ``slots`` at ``slot_epoch``; idempotent."""
    for slot in slots:
        _check_slot(slot)
    with _connect(admin_dsn) as conn, conn.transaction():
        _lock_fence(conn)
        _set_fence_locked(conn, epoch)
        for_update = conn.execute(
            "SELECT slot, epoch FROM txr.owned_slots WHERE slot = ANY(%s::int[])", (list(slots),)
        ).fetchall()
        for slot, current in for_update:
            if current > slot_epoch:
                raise EpochRegression(f"slot {slot} epoch {current} > {slot_epoch}")
        conn.execute(
            "INSERT INTO txr.owned_slots (slot, epoch)"
            " SELECT s, %s FROM unnest(%s::int[]) AS s"
            " ON CONFLICT (slot) DO UPDATE SET epoch = excluded.epoch",
            (slot_epoch, list(slots)),
        )


def _set_fence_locked(conn: psycopg.Connection[tuple[Any, ...]], epoch: int) -> None:
    row = conn.execute("SELECT epoch FROM txr.fence FOR UPDATE").fetchone()
    if row is not None and row[0] > epoch:
        raise EpochRegression(f"shard epoch {row[0]} > {epoch}")
    conn.execute(
        "INSERT INTO txr.fence (singleton, epoch, fenced) VALUES (true, %s, false)"
        " ON CONFLICT (singleton) DO UPDATE SET epoch = excluded.epoch, fenced = false",
        (epoch,),
    )


def set_fence(admin_dsn: str, *, epoch: int) -> None:
    """Accept writes under ``epoch`` only (and unfence): run on a newly promoted primary."""
    with _connect(admin_dsn) as conn, conn.transaction():
        _lock_fence(conn)
        _set_fence_locked(conn, epoch)


def fence_all(admin_dsn: str) -> None:
    """Refuse every write from now on (an old primary). Returns after in-flight writes commit."""
    with _connect(admin_dsn) as conn, conn.transaction():
        _lock_fence(conn)
        cur = conn.execute("UPDATE txr.fence SET fenced = true")
        if cur.rowcount != 1:
            # No fence row means the procedures already refuse everything; record it anyway.
            conn.execute("INSERT INTO txr.fence (singleton, epoch, fenced) VALUES (true, 0, true)")


def set_slot(admin_dsn: str, slot: int, *, epoch: int, owned: bool) -> None:
    """Own ``slot`` at ``epoch``, or (owned=False) stop owning it."""
    _check_slot(slot)
    with _connect(admin_dsn) as conn, conn.transaction():
        _lock_fence(conn)
        row = conn.execute(
            "SELECT epoch FROM txr.owned_slots WHERE slot = %s FOR UPDATE", (slot,)
        ).fetchone()
        if row is not None and row[0] > epoch:
            raise EpochRegression(f"slot {slot} epoch {row[0]} > {epoch}")
        if owned:
            conn.execute(
                "INSERT INTO txr.owned_slots (slot, epoch) VALUES (%s, %s)"
                " ON CONFLICT (slot) DO UPDATE SET epoch = excluded.epoch",
                (slot, epoch),
            )
        else:
            conn.execute("DELETE FROM txr.owned_slots WHERE slot = %s", (slot,))


def fence_state(admin_dsn: str) -> dict[str, Any]:
    """``{"epoch", "fenced", "slots": {slot: epoch}}`` as the database holds them."""
    with _connect(admin_dsn) as conn:
        fence = conn.execute("SELECT epoch, fenced FROM txr.fence").fetchone()
        slots = dict(conn.execute("SELECT slot, epoch FROM txr.owned_slots").fetchall())
    return {
        "epoch": fence[0] if fence else None,
        "fenced": fence[1] if fence else True,
        "slots": slots,
    }


def ledger_check(admin_dsn: str) -> dict[str, Any]:
    """Check the shard's ledger (G4) on one consistent snapshot.

    - the sum of all balances (customer and transit) is 0: every posting balances;
    - each account's balance equals the sum of its entries, its version equals the number of its
      entries + 1, and its entries' seqs are exactly 2..version;
    - each transfer's entries on this shard sum to 0 (a same-shard posting; a cross-shard leg
      balances against the shard's transit account, so it sums to 0 here too).

    Returns ``{"ok", "accounts", "transfers", "total_balance", "balance_mismatches",
    "version_mismatches", "unbalanced_transfers"}``; the lists hold at most
    LEDGER_CHECK_LIST_MAX items each, the ``*_count`` keys the full counts.
    """
    with _connect(admin_dsn) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            accounts, total = conn.execute(
                "SELECT count(*), coalesce(sum(balance), 0) FROM txr.accounts"
            ).fetchone() or (0, 0)
            transfers = (conn.execute("SELECT count(*) FROM txr.transfers").fetchone() or (0,))[0]
            per_account = conn.execute(
                "SELECT a.id, a.balance, a.version,"
                " coalesce(e.total, 0), coalesce(e.n, 0), e.min_seq, e.max_seq, e.last_after"
                " FROM txr.accounts a"
                " LEFT JOIN LATERAL ("
                "   SELECT sum(amount) AS total, count(*) AS n, min(seq) AS min_seq,"
                "          max(seq) AS max_seq,"
                "          (array_agg(balance_after ORDER BY seq DESC))[1] AS last_after"
                "   FROM txr.ledger_entries le WHERE le.account_id = a.id) e ON true"
            ).fetchall()
            unbalanced = conn.execute(
                "SELECT transfer_id, sum(amount) FROM txr.ledger_entries"
                " GROUP BY transfer_id HAVING sum(amount) <> 0"
            ).fetchall()
    balance_bad: list[dict[str, Any]] = []
    version_bad: list[dict[str, Any]] = []
    for acc_id, balance, version, total_e, n, min_seq, max_seq, last_after in per_account:
        if balance != total_e or (n > 0 and last_after != balance):
            balance_bad.append(
                {
                    "account_id": acc_id,
                    "balance": balance,
                    "entries_sum": int(total_e),
                    "last_balance_after": last_after,
                }
            )
        if version != n + 1 or (n > 0 and (min_seq != 2 or max_seq != version)):
            version_bad.append(
                {
                    "account_id": acc_id,
                    "version": version,
                    "entries": n,
                    "min_seq": min_seq,
                    "max_seq": max_seq,
                }
            )
    return {
        "ok": total == 0 and not balance_bad and not version_bad and not unbalanced,
        "accounts": accounts,
        "transfers": transfers,
        "total_balance": int(total),
        "balance_mismatches": balance_bad[:LEDGER_CHECK_LIST_MAX],
        "balance_mismatches_count": len(balance_bad),
        "version_mismatches": version_bad[:LEDGER_CHECK_LIST_MAX],
        "version_mismatches_count": len(version_bad),
        "unbalanced_transfers": [
            {"transfer_id": str(t), "sum": int(s)} for t, s in unbalanced[:LEDGER_CHECK_LIST_MAX]
        ],
        "unbalanced_transfers_count": len(unbalanced),
    }
