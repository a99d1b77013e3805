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
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from consistency import ids
from consistency.limits import SLOT_COUNT
from consistency.saga import TransferStatus

CONNECT_TIMEOUT_S: Final = 10
# The exclusive fence lock waits for in-flight write transactions; those are bounded by the
# routers' call timeouts (seconds), so waiting longer than this means a stuck session.
FENCE_LOCK_TIMEOUT_MS: Final = 30_000
# Discrepancies listed by ledger_check (the counts are always complete).
LEDGER_CHECK_LIST_MAX: Final = 100


class EpochRegression(ValueError):
    """An admin call tried to move an epoch backwards."""


def connect(admin_dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(admin_dsn, connect_timeout=CONNECT_TIMEOUT_S)


def lock_fence(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    conn.execute(f"SET LOCAL lock_timeout = '{FENCE_LOCK_TIMEOUT_MS}ms'")
    conn.execute("SELECT pg_advisory_xact_lock(txr.fence_lock_key())")


def _check_slot(slot: int) -> None:
    if not 0 <= slot < SLOT_COUNT:
        raise ValueError(f"slot {slot} outside 0..{SLOT_COUNT - 1}")


def init_shard(admin_dsn: str, *, epoch: int, slots: Sequence[int], slot_epoch: int) -> None:
    """Set the shard epoch (unfenced) and own ``slots`` at ``slot_epoch``; idempotent."""
    for slot in slots:
        _check_slot(slot)
    with connect(admin_dsn) as conn, conn.transaction():
        lock_fence(conn)
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


# Key ids: 1.. (txr.saga_keys); a key shorter than this is refused by the table's CHECK too.
SAGA_KEY_BYTES_MIN: Final = 32


def set_saga_identity(admin_dsn: str, *, shard: str, key_id: int, secret: bytes) -> int:
    """Name this database's shard and store saga key ``key_id`` (the same secret on every
    shard; sql/functions/saga.sql), then sign the pending messages written before it had
    one. Idempotent for the same values; a different secret under an existing id is refused
    (messages signed with it would stop verifying). Returns how many messages it signed.

    Rotation: store the next id on every shard first (leg 2 checks with the id a message
    names), then leg 1 signs with the newest; an old key may go once no pending message and
    no receipt in flight names it.
    """
    if key_id < 1 or len(secret) < SAGA_KEY_BYTES_MIN:
        raise ValueError(f"saga key id must be >= 1 and its secret >= {SAGA_KEY_BYTES_MIN} bytes")
    with connect(admin_dsn) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO txr.shard_identity (singleton, name) VALUES (true, %s)"
            " ON CONFLICT (singleton) DO UPDATE SET name = excluded.name",
            (shard,),
        )
        row = conn.execute(
            "SELECT secret FROM txr.saga_keys WHERE key_id = %s FOR UPDATE", (key_id,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO txr.saga_keys (key_id, secret) VALUES (%s, %s)", (key_id, secret)
            )
        elif bytes(row[0]) != secret:
            raise ValueError(f"saga key {key_id} already holds another secret")
        signed = conn.execute("SELECT txr.sign_unsigned_outbox()").fetchone()
    return int(signed[0]) if signed else 0


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
    with connect(admin_dsn) as conn, conn.transaction():
        lock_fence(conn)
        _set_fence_locked(conn, epoch)


def fence_all(admin_dsn: str) -> None:
    """Refuse every write from now on (an old primary). Returns after in-flight writes commit."""
    with connect(admin_dsn) as conn, conn.transaction():
        lock_fence(conn)
        cur = conn.execute("UPDATE txr.fence SET fenced = true")
        if cur.rowcount != 1:
            # No fence row means the procedures already refuse everything; record it anyway.
            conn.execute("INSERT INTO txr.fence (singleton, epoch, fenced) VALUES (true, 0, true)")


def set_slot(admin_dsn: str, slot: int, *, epoch: int, owned: bool) -> None:
    """Own ``slot`` at ``epoch``, or (owned=False) stop owning it."""
    _check_slot(slot)
    with connect(admin_dsn) as conn, conn.transaction():
        lock_fence(conn)
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
    with connect(admin_dsn) as conn:
        fence = conn.execute("SELECT epoch, fenced FROM txr.fence").fetchone()
        slots = dict(conn.execute("SELECT slot, epoch FROM txr.owned_slots").fetchall())
    return {
        "epoch": fence[0] if fence else None,
        "fenced": fence[1] if fence else True,
        "slots": slots,
    }


# Per account whose row disagrees with its entries by any rule of ledger_check or
# reconcile_snapshot: (id, balance, version, entries' sum, entries, min seq, max seq, the last
# entry's balance_after). Each caller applies its own rules to these rows.
_ACCOUNT_MISMATCH_SQL: Final = (
    "SELECT a.id, a.balance, a.version,"
    " coalesce(e.total, 0), coalesce(e.n, 0), e.min_seq, e.max_seq, e.last_after"
    " FROM txr.accounts a"
    " LEFT JOIN LATERAL ("
    "   SELECT sum(amount) AS total, count(*) AS n, min(seq) AS min_seq,"
    "          max(seq) AS max_seq,"
    "          (array_agg(balance_after ORDER BY seq DESC))[1] AS last_after"
    "   FROM txr.ledger_entries le WHERE le.account_id = a.id) e ON true"
    " WHERE a.balance <> coalesce(e.total, 0) OR a.version <> coalesce(e.n, 0) + 1"
    "   OR (e.n > 0 AND (e.last_after IS DISTINCT FROM a.balance"
    "                    OR e.min_seq <> 2 OR e.max_seq <> a.version))"
)
_UNBALANCED_SQL: Final = (
    "SELECT transfer_id, sum(amount) FROM txr.ledger_entries"
    " GROUP BY transfer_id HAVING sum(amount) <> 0"
)


@dataclass(frozen=True, slots=True)
class _LedgerReads:
    """What both checks read, inside the caller's repeatable-read transaction."""

    accounts: int
    totals: dict[str, int]  # sum of balances per currency
    mismatched: list[tuple[Any, ...]]  # _ACCOUNT_MISMATCH_SQL rows
    unbalanced: list[tuple[Any, Any]]  # (transfer id, sum of its entries here)


def _read_ledger(conn: psycopg.Connection[tuple[Any, ...]]) -> _LedgerReads:
    totals = conn.execute(
        "SELECT currency, sum(balance) FROM txr.accounts GROUP BY currency"
    ).fetchall()
    accounts = (conn.execute("SELECT count(*) FROM txr.accounts").fetchone() or (0,))[0]
    return _LedgerReads(
        accounts=int(accounts),
        totals={cur: int(total) for cur, total in totals},
        mismatched=conn.execute(_ACCOUNT_MISMATCH_SQL).fetchall(),
        unbalanced=conn.execute(_UNBALANCED_SQL).fetchall(),
    )


def _snapshot(admin_dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    conn = connect(admin_dsn)
    conn.read_only = True
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    return conn


def ledger_check(admin_dsn: str) -> dict[str, Any]:
    """Check the shard's ledger (G4) on one consistent snapshot.

    - the sum of all balances (customer and transit) is 0: every posting balances;
    - each account's balance equals the sum of its entries, its version equals the number of its
      entries + 1, and its entries' seqs are exactly 2..version;
    - each transfer's entries on this shard sum to 0 (a same-shard posting; a cross-shard leg
      balances against the shard's transit account, so it sums to 0 here too).

    Returns ``{"ok", "accounts", "transfers", "total_balance", "balance_mismatches",
    "version_mismatches", "unbalanced_transfers"}``; the lists hold at most
    LEDGER_CHECK_LIST_MAX items each, the ``*_count`` keys the full counts. The reads are
    reconcile_snapshot's (``_read_ledger``) plus the transfer count.
    """
    with _snapshot(admin_dsn) as conn, conn.transaction():
        reads = _read_ledger(conn)
        transfers = (conn.execute("SELECT count(*) FROM txr.transfers").fetchone() or (0,))[0]
    total = sum(reads.totals.values())
    balance_bad: list[dict[str, Any]] = []
    version_bad: list[dict[str, Any]] = []
    for acc_id, balance, version, total_e, n, min_seq, max_seq, last_after in reads.mismatched:
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
    unbalanced = reads.unbalanced
    return {
        "ok": total == 0 and not balance_bad and not version_bad and not unbalanced,
        "accounts": reads.accounts,
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


# Per outbound row: (count, sum of debits, sum of credits) on the source, on t1 (the transit
# account leg 1 credited) and on t2 (the reroute's), and the count of all its entries here
# (anything beyond those three is an entry on a wrong account). See _outbound_leg_problem.
_OUT_LEGS_SQL: Final = (
    "SELECT o.transfer_id, o.state, o.amount, o.credit_shard IS NOT NULL,"
    " o.rerouted_from IS NOT NULL,"
    " t1.account_id IS NULL OR (o.rerouted_from IS NOT NULL AND t2.account_id IS NULL),"
    " i.transfer_id IS NOT NULL, count(e.amount),"
    " count(e.amount) FILTER (WHERE e.account_id = o.source),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = o.source AND e.amount < 0), 0),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = o.source AND e.amount > 0), 0),"
    " count(e.amount) FILTER (WHERE e.account_id = t1.account_id),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = t1.account_id AND e.amount < 0), 0),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = t1.account_id AND e.amount > 0), 0),"
    " count(e.amount) FILTER (WHERE e.account_id = t2.account_id),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = t2.account_id AND e.amount < 0), 0),"
    " coalesce(sum(e.amount) FILTER (WHERE e.account_id = t2.account_id AND e.amount > 0), 0)"
    " FROM txr.outbox o"
    " LEFT JOIN txr.transit_accounts t1 ON t1.currency = o.currency"
    "   AND t1.remote_shard = coalesce(o.rerouted_from, o.destination_shard)"
    " LEFT JOIN txr.transit_accounts t2 ON t2.currency = o.currency"
    "   AND t2.remote_shard = o.destination_shard AND o.rerouted_from IS NOT NULL"
    " LEFT JOIN txr.inbox i ON i.transfer_id = o.transfer_id"
    " LEFT JOIN txr.ledger_entries e ON e.transfer_id = o.transfer_id"
    " GROUP BY o.transfer_id, o.state, o.amount, o.credit_shard, o.rerouted_from, o.source,"
    "   t1.account_id, t2.account_id, i.transfer_id"
)
# Inbound rows whose entries here are wrong: the destination's credit (if applied) and the
# transit debit (unless it stayed on another shard: debit_shard). A transfer whose leg 1 is
# on this shard too (sent from here into a slot that moved here while it was in flight) shares
# its transfer id and transit accounts with leg 1: only the destination's entries are checked
# (the shard's sums, the per-posting sums and the pair checks cover the rest).
_IN_LEGS_SQL: Final = (
    "SELECT i.transfer_id, i.result FROM txr.inbox i"
    " LEFT JOIN txr.transit_accounts t"
    "   ON t.remote_shard = i.source_shard AND t.currency = i.currency"
    " LEFT JOIN txr.outbox o ON o.transfer_id = i.transfer_id"
    " LEFT JOIN txr.ledger_entries e ON e.transfer_id = i.transfer_id"
    " GROUP BY i.transfer_id, i.result, i.amount, i.destination, i.debit_shard, t.account_id,"
    "   o.transfer_id"
    " HAVING count(e.amount) FILTER (WHERE e.account_id = i.destination)"
    "     <> CASE WHEN i.result = 'applied' THEN 1 ELSE 0 END"
    "   OR coalesce(sum(e.amount) FILTER (WHERE e.account_id = i.destination), 0)"
    "     <> CASE WHEN i.result = 'applied' THEN i.amount ELSE 0 END"
    "   OR (o.transfer_id IS NULL AND count(e.amount) <> CASE WHEN i.result <> 'applied' THEN 0"
    "     WHEN i.debit_shard IS NULL THEN 2 ELSE 1 END)"
    "   OR (o.transfer_id IS NULL AND i.result = 'applied' AND i.debit_shard IS NULL"
    "     AND coalesce(sum(e.amount) FILTER (WHERE e.account_id = t.account_id), 0)"
    "       <> -i.amount)"
)


def reconcile_snapshot(admin_dsn: str) -> dict[str, Any]:
    """Everything ``consistency.reconcile.reconcile`` needs from this shard, read in one
    repeatable-read transaction (one consistent snapshot). See that module for the shape.

    Besides the ledger_check rules it checks each cross-shard leg's entries here, as
    (count, debits, credits) per account role:

    - outbound (the row names the transit account leg 1 credited, ``t1``): source -a and t1 +a;
      a reversed one also t1 -a and source +a; a settled one rerouted by a slot move also
      t1 -a and +a on the transit account toward the shard that applied it;
    - inbound 'applied': transit -a and destination +a; refused: no entries at all;
    - a row that arrived with a slot move (``credit_shard`` / ``debit_shard`` set) left its
      transit entry on that shard: only its account's entries are here.

    Postings whose entries sit on several shards (a slot move split them) are listed in
    ``unbalanced_postings`` with this shard's part; reconcile sums them over all shards.
    """
    with _snapshot(admin_dsn) as conn, conn.transaction():
        reads = _read_ledger(conn)
        transit = conn.execute(
            "SELECT t.remote_shard, t.currency, a.balance FROM txr.transit_accounts t"
            " JOIN txr.accounts a ON a.id = t.account_id"
        ).fetchall()
        outbox = conn.execute(
            "SELECT transfer_id, destination_shard, amount, currency, state, credit_shard"
            " FROM txr.outbox"
        ).fetchall()
        inbox = conn.execute(
            "SELECT transfer_id, source_shard, result, amount, currency, debit_shard FROM txr.inbox"
        ).fetchall()
        # Per outbound row: (count, sum of debits, sum of credits) on the source, on t1
        # (leg 1's transit account) and on t2 (the reroute's), and the count of all its
        # entries here (anything else is an entry on a wrong account).
        out_legs = conn.execute(_OUT_LEGS_SQL).fetchall()
        in_legs = conn.execute(_IN_LEGS_SQL).fetchall()
        owned = conn.execute("SELECT slot FROM txr.owned_slots ORDER BY slot").fetchall()
        account_slots = conn.execute(
            "SELECT DISTINCT txr.slot_of(id) FROM txr.accounts WHERE kind = 'customer' ORDER BY 1"
        ).fetchall()
        moves = conn.execute(
            "SELECT move_id, direction, slot, epoch, peer_shard, amounts FROM txr.slot_moves"
        ).fetchall()
    transits: dict[str, dict[str, int]] = {}
    for remote, currency, balance in transit:
        transits.setdefault(remote, {})[currency] = int(balance)
    leg_violations = [
        {"transfer_id": str(r[0]), "state": r[1], "reason": reason}
        for r in out_legs
        if (reason := _outbound_leg_problem(r))
    ]
    leg_violations += [
        {"transfer_id": str(t), "state": r, "reason": "inbound leg entries wrong"}
        for t, r in in_legs
    ]
    return {
        "accounts": reads.accounts,
        "totals": reads.totals,
        "balance_mismatches": [
            {"account_id": a, "balance": b, "entries_sum": int(t)}
            for a, b, _v, t, *_ in reads.mismatched
            if b != t
        ],
        "version_mismatches": [
            {"account_id": a, "version": v, "entries": int(n)}
            for a, _b, v, _t, n, *_ in reads.mismatched
            if v != n + 1
        ],
        "unbalanced_postings": [
            {"transfer_id": str(t), "sum": int(s)} for t, s in reads.unbalanced
        ],
        "leg_violations": leg_violations,
        "transit": transits,
        "outbox": [
            {
                "transfer_id": str(t),
                "destination_shard": d,
                "amount": int(a),
                "currency": c,
                "state": s,
                "credit_shard": cs,
            }
            for t, d, a, c, s, cs in outbox
        ],
        "inbox": [
            {
                "transfer_id": str(t),
                "source_shard": s,
                "result": r,
                "amount": int(a),
                "currency": c,
                "debit_shard": ds,
            }
            for t, s, r, a, c, ds in inbox
        ],
        "owned_slots": [int(r[0]) for r in owned],
        "account_slots": [int(r[0]) for r in account_slots],
        "moves": [
            {
                "move_id": str(m),
                "direction": d,
                "slot": int(sl),
                "epoch": int(ep),
                "peer_shard": p,
                "amounts": {k: int(v) for k, v in am.items()},
            }
            for m, d, sl, ep, p, am in moves
        ],
    }


def _outbound_leg_problem(row: Sequence[Any]) -> str | None:
    """Why an outbound row's entries here are wrong (see reconcile_snapshot), or None."""
    _tid, state, amount, moved, rerouted, no_transit, self_delivered, n_all = row[:8]
    src, t1, t2 = row[8:11], row[11:14], row[14:17]
    if no_transit and not moved:
        return "no transit account for its leg"
    reversed_ = state == TransferStatus.REVERSED
    want_src = (2, -amount, amount) if reversed_ else (1, -amount, 0)
    if self_delivered:
        # Leg 2 landed here too (see _IN_LEGS_SQL): its entries share the transit accounts.
        if tuple(int(x) for x in src) != want_src:
            return f"outbound leg entries wrong: source (count, debits, credits) {tuple(src)}"
        return None
    if moved:
        # Its transit entries stayed on the shard that credited them.
        want_t1: tuple[int, int, int] = (0, 0, 0)
        want_t2 = (0, 0, 0)
    elif reversed_:
        want_t1, want_t2 = (2, -amount, amount), (0, 0, 0)
    elif rerouted:
        want_t1, want_t2 = (2, -amount, amount), (1, 0, amount)
    else:
        want_t1, want_t2 = (1, 0, amount), (0, 0, 0)
    got = tuple(tuple(int(x) for x in part) for part in (src, t1, t2))
    if got != (want_src, want_t1, want_t2) or n_all != want_src[0] + want_t1[0] + want_t2[0]:
        return f"outbound leg entries wrong: (count, debits, credits) {got}"
    return None


# The fence's lock wait is bounded by FENCE_LOCK_TIMEOUT_MS; its COMMIT does not wait for the
# synchronous standby at all (see fence_and_flush_lsn), so this only bounds a stuck server.
FENCE_STATEMENT_TIMEOUT_MS: Final = 5_000
# Deciding that an old primary is dead must not take the whole failover budget.
FENCE_CONNECT_TIMEOUT_S: Final = 3


def fence_and_flush_lsn(admin_dsn: str) -> int:
    """``fence_all`` with bounded waits, then the WAL flush LSN (bytes) after the fence.

    After the fence nothing can commit here any more, so a standby that has received this LSN
    holds every transaction this server ever acknowledged. Raises ``psycopg.OperationalError``
    when the server does not answer within FENCE_CONNECT_TIMEOUT_S.
    """
    with psycopg.connect(
        admin_dsn,
        connect_timeout=FENCE_CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={FENCE_STATEMENT_TIMEOUT_MS}",
    ) as conn:
        with conn.transaction():
            # The fence works the moment it commits locally: every later write reads it. Its
            # COMMIT must not wait for the synchronous standby, which may be the node being
            # promoted or gone (statement_timeout does not cover that wait: PostgreSQL stops
            # the timer before COMMIT; checked, it waited in SyncRep for minutes).
            conn.execute("SET LOCAL synchronous_commit = local")
            lock_fence(conn)
            cur = conn.execute("UPDATE txr.fence SET fenced = true")
            if cur.rowcount != 1:
                conn.execute(
                    "INSERT INTO txr.fence (singleton, epoch, fenced) VALUES (true, 0, true)"
                )
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint"
        ).fetchone()
    assert row is not None
    return int(row[0])


# What a slot's rows are, table by table: an account lives in the slot of its id; ledger
# entries follow their account; a transfer, its idempotency key and its outbox message live
# with the source account (the public transfer id carries the source's slot); an inbox row
# lives with the destination account it credited. Transit accounts (and their entries) never
# move: they belong to the shard, and the move posting (0003) accounts for what changed hands.
# A slot's ids are a range (consistency.ids.slot_id_range): ``%(lo)s`` and ``%(hi)s``.
_SLOT_ROWS: Final = (
    ("accounts", "kind = 'customer' AND id >= %(lo)s AND id < %(hi)s"),
    ("ledger_entries", "account_id >= %(lo)s AND account_id < %(hi)s"),
    ("transfers", "source >= %(lo)s AND source < %(hi)s"),
    ("idempotency_keys", "source >= %(lo)s AND source < %(hi)s"),
    ("outbox", "source >= %(lo)s AND source < %(hi)s"),
    ("inbox", "destination >= %(lo)s AND destination < %(hi)s"),
)
_PENDING_OUT_SQL: Final = (
    "SELECT count(*) FROM txr.outbox"
    " WHERE state = 'pending' AND source >= %(lo)s AND source < %(hi)s"
)


def _slot_params(slot: int) -> dict[str, int]:
    lo, hi = ids.slot_id_range(slot)
    return {"slot": slot, "lo": lo, "hi": hi}


class SlotMoveError(RuntimeError):
    """A slot move step found the shards in a state it must not act on; nothing was changed."""


def slot_outbound_pending(admin_dsn: str, slot: int, *, nudge: bool = False) -> int:
    """Pending outbound transfers of ``slot``'s accounts on this shard. ``nudge``: make them due
    now and wake the relays (a rehome waits for them; their backoff or a router's delivery
    grace would only make it wait longer, and a second delivery is harmless)."""
    _check_slot(slot)
    params = _slot_params(slot)
    with connect(admin_dsn) as conn, conn.transaction():
        if nudge:
            conn.execute(
                "UPDATE txr.outbox SET next_attempt_at = now()"
                " WHERE state = 'pending' AND source >= %(lo)s AND source < %(hi)s"
                " AND next_attempt_at > now()",
                params,
            )
            conn.execute("SELECT pg_notify('txr_outbox', '')")
        row = conn.execute(_PENDING_OUT_SQL, params).fetchone()
    return int(row[0]) if row else 0


def incoming_move(admin_dsn: str, slot: int, epoch: int) -> str | None:
    """The source shard of the move that gave this shard ``slot`` at ``epoch``, if it did."""
    _check_slot(slot)
    with connect(admin_dsn) as conn:
        row = conn.execute(
            "SELECT peer_shard FROM txr.slot_moves"
            " WHERE direction = 'in' AND slot = %s AND epoch = %s",
            (slot, epoch),
        ).fetchone()
    return str(row[0]) if row else None


def _move_amounts(conn: psycopg.Connection[tuple[Any, ...]], move_id: str, direction: str) -> Any:
    row = conn.execute(
        "SELECT amounts FROM txr.slot_moves WHERE move_id = %s AND direction = %s",
        (move_id, direction),
    ).fetchone()
    return None if row is None else row[0]


def copy_slot_in(
    source_dsn: str,
    target_dsn: str,
    slot: int,
    *,
    source_shard: str,
    target_shard: str,
    new_epoch: int,
    move_id: str,
) -> dict[str, int]:
    """Copy every row of ``slot`` from the source to the target, post the target's half of the
    move (0003) and own the slot there at ``new_epoch``: one target transaction.

    The source must already refuse the slot (``set_slot(owned=False)``) and hold no pending
    outbound message of it (the rehome drains them): then no procedure can change its rows,
    and one repeatable-read snapshot of them is the slot. Idempotent: a target that already
    recorded this move is left alone. Returns the rows copied per table.
    """
    _check_slot(slot)
    params = _slot_params(slot)
    counts: dict[str, int] = {}
    with connect(target_dsn) as dst:
        if _move_amounts(dst, move_id, "in") is not None:
            return counts
    with connect(source_dsn) as src, connect(target_dsn) as dst:
        src.read_only = True
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        data: dict[str, bytes] = {}
        with src.transaction():
            if src.execute("SELECT 1 FROM txr.owned_slots WHERE slot = %s", (slot,)).fetchone():
                raise SlotMoveError(f"slot {slot} is still owned by {source_shard}: unown it first")
            pending = src.execute(_PENDING_OUT_SQL, params).fetchone()
            if pending and pending[0]:
                raise SlotMoveError(
                    f"slot {slot} has {pending[0]} pending outbound transfers on {source_shard}"
                )
            for table, where in _SLOT_ROWS:
                query = sql.SQL("COPY (SELECT * FROM {} WHERE {}) TO STDOUT").format(
                    sql.Identifier("txr", table),
                    # COPY takes no parameters: the range's two integers are written in.
                    sql.SQL(
                        where.replace("%(lo)s", str(int(params["lo"]))).replace(
                            "%(hi)s", str(int(params["hi"]))
                        )
                    ),
                )
                with src.cursor().copy(query) as cp:
                    data[table] = b"".join(bytes(block) for block in cp)
                counts[table] = data[table].count(b"\n")
        with dst.transaction():
            lock_fence(dst)
            for table, _where in _SLOT_ROWS:
                if not data[table]:
                    continue
                with dst.cursor().copy(
                    sql.SQL("COPY {} FROM STDIN").format(sql.Identifier("txr", table))
                ) as cp:
                    cp.write(data[table])
            dst.execute(
                "SELECT txr.mark_moved_rows(%s, %s, %s)", (slot, source_shard, target_shard)
            )
            dst.execute(
                "SELECT txr.post_slot_move(%s, 'in', %s, %s, %s)",
                (move_id, slot, new_epoch, source_shard),
            )
            row = dst.execute(
                "SELECT epoch FROM txr.owned_slots WHERE slot = %s FOR UPDATE", (slot,)
            ).fetchone()
            if row is not None and row[0] > new_epoch:
                raise EpochRegression(f"slot {slot} epoch {row[0]} > {new_epoch}")
            dst.execute(
                "INSERT INTO txr.owned_slots (slot, epoch) VALUES (%s, %s)"
                " ON CONFLICT (slot) DO UPDATE SET epoch = excluded.epoch",
                (slot, new_epoch),
            )
    return counts


def finish_slot_out(
    source_dsn: str, target_dsn: str, slot: int, *, target_shard: str, new_epoch: int, move_id: str
) -> dict[str, int]:
    """Post the source's half of the move and delete the slot's rows there: one source
    transaction, after the target holds the copy and etcd points at it.

    Both halves must carry the same amounts (checked before the commit; ``txr reconcile``
    checks them again when it reads them back). Idempotent: a source that already recorded
    the move is left alone. Returns the rows deleted per table.
    """
    _check_slot(slot)
    params = _slot_params(slot)
    counts: dict[str, int] = {}
    with connect(target_dsn) as dst:
        arrived = _move_amounts(dst, move_id, "in")
    if arrived is None:
        raise SlotMoveError(f"{target_shard} has not received move {move_id} of slot {slot}")
    with connect(source_dsn) as src, src.transaction():
        src.execute(f"SET LOCAL lock_timeout = '{FENCE_LOCK_TIMEOUT_MS}ms'")
        if _move_amounts(src, move_id, "out") is not None:
            return counts
        row = src.execute(
            "SELECT txr.post_slot_move(%s, 'out', %s, %s, %s)",
            (move_id, slot, new_epoch, target_shard),
        ).fetchone()
        left = row[0] if row else None
        if left != arrived:
            # Raising rolls the posting back: the rows stay, the move stays unfinished.
            raise SlotMoveError(
                f"move {move_id} of slot {slot}: the source holds {left}, "
                f"but {target_shard} received {arrived}"
            )
        # Children first (foreign keys: entries -> accounts).
        for table, where in reversed(_SLOT_ROWS):
            cur = src.execute(
                sql.SQL("DELETE FROM {} WHERE {}").format(
                    sql.Identifier("txr", table), sql.SQL(where)
                ),
                params,
            )
            counts[table] = cur.rowcount
    return counts
