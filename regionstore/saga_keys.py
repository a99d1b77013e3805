"""Saga key rotation across every shard, with overlap (``txr keys rotate-saga``; migration 0008).

Leg 1 signs an outbox message with its shard's signing key; leg 2, on another shard, checks it
with the key the message names, and its receipt, checked by the settle on the source shard,
uses the same key. So a key must be on every shard before any shard signs with it, and must
stay on every shard while any pending message names it. The rotation, in that order:

1. **stage** a new key (the next id, a fresh secret) on every shard: it verifies, it does not
   sign. A shard that fails stops the command here; nothing signs with the key yet, and a
   rerun finishes staging the same key (read back from a shard that has it).
2. **activate** it on every shard, each under the exclusive fence lock (``admin.lock_fence``):
   that waits for the shard's write transactions in flight, which may have signed with the old
   key, to commit; every later leg 1 signs with the new one. Between the first and the last
   shard, messages carry either key, and every shard verifies both.
3. **retire** (``retire``, run by the rotation for keys older than the previous one): delete a
   key that no shard signs with and no pending outbox message on any shard names. After step 2
   no new message names an old key, so the pending count only falls; the previous key is kept
   by the rotation anyway (one rotation of overlap, like the JWT keys), for messages signed
   just before it on a shard whose relay is slow to claim them.

Admin role only (the key table is readable by the function owner alone). Never imports router.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from regionstore.admin import SAGA_KEY_BYTES_MIN, connect, lock_fence

# Fresh secrets are this long (the table refuses shorter than SAGA_KEY_BYTES_MIN).
SAGA_KEY_BYTES = 32
assert SAGA_KEY_BYTES >= SAGA_KEY_BYTES_MIN


@dataclass(frozen=True, slots=True)
class SagaKey:
    key_id: int
    signing: bool
    pending: int  # pending outbox messages of this shard that name the key


class RotationError(RuntimeError):
    """A shard disagrees (another secret under one id) or could not be reached."""


def list_keys(admin_dsn: str) -> list[SagaKey]:
    """The shard's saga keys, oldest first, with how many pending messages name each."""
    with connect(admin_dsn) as conn:
        rows = conn.execute(
            "SELECT k.key_id, k.signing,"
            " (SELECT count(*) FROM txr.outbox o"
            "   WHERE o.state = 'pending' AND o.key_id = k.key_id)"
            " FROM txr.saga_keys k ORDER BY k.key_id"
        ).fetchall()
    return [SagaKey(int(r[0]), bool(r[1]), int(r[2])) for r in rows]


def signing_key(keys: list[SagaKey]) -> int | None:
    """The id leg 1 signs with: the newest signing key (txr.saga_sign)."""
    ids = [k.key_id for k in keys if k.signing]
    return max(ids) if ids else None


def _secret(conn: psycopg.Connection[tuple[Any, ...]], key_id: int) -> bytes | None:
    row = conn.execute("SELECT secret FROM txr.saga_keys WHERE key_id = %s", (key_id,)).fetchone()
    return None if row is None else bytes(row[0])


def _stage(admin_dsn: str, key_id: int, secret: bytes) -> None:
    with connect(admin_dsn) as conn, conn.transaction():
        have = conn.execute(
            "SELECT secret FROM txr.saga_keys WHERE key_id = %s FOR UPDATE", (key_id,)
        ).fetchone()
        if have is None:
            conn.execute(
                "INSERT INTO txr.saga_keys (key_id, secret, signing) VALUES (%s, %s, false)",
                (key_id, secret),
            )
        elif bytes(have[0]) != secret:
            raise RotationError(f"saga key {key_id} already holds another secret")


def _activate(admin_dsn: str, key_id: int) -> None:
    with connect(admin_dsn) as conn, conn.transaction():
        # Wait for the writes in flight (they may have signed with the old key) to commit;
        # every leg 1 that starts after this commit signs with the new key.
        lock_fence(conn)
        conn.execute("UPDATE txr.saga_keys SET signing = (key_id = %s)", (key_id,))


def rotate(admin_dsns: Mapping[str, str]) -> dict[str, Any]:
    """Stage, activate and (for keys older than the previous one) retire, on every shard of
    ``admin_dsns`` (shard name -> admin DSN of its primary). Returns what it did."""
    try:
        keys = {shard: list_keys(dsn) for shard, dsn in admin_dsns.items()}
    except psycopg.Error as exc:
        raise RotationError(f"a shard's primary could not be read: {exc}") from exc
    ids = sorted({k.key_id for ks in keys.values() for k in ks})
    newest = ids[-1] if ids else 0
    # A rotation that stopped after staging: its key is the newest, not signing everywhere.
    resuming = newest > 0 and any(signing_key(ks) != newest for ks in keys.values())
    key_id = newest if resuming else newest + 1
    # The key that signed before this rotation: kept for one rotation of overlap.
    older = [i for i in ids if i < key_id]
    previous = older[-1] if older else None
    secret: bytes | None = None
    if resuming:
        for dsn in admin_dsns.values():
            with connect(dsn) as conn:
                secret = _secret(conn, key_id)
            if secret is not None:
                break
    if secret is None:
        secret = secrets.token_bytes(SAGA_KEY_BYTES)
    try:
        for dsn in admin_dsns.values():
            _stage(dsn, key_id, secret)
        for dsn in admin_dsns.values():
            _activate(dsn, key_id)
    except psycopg.Error as exc:
        raise RotationError(f"saga key {key_id}: a shard failed ({exc}); rerun to finish") from exc
    keep = {key_id} | ({previous} if previous is not None else set())
    retired = retire(admin_dsns, keep=keep)
    return {"key_id": key_id, "resumed": resuming, "kept": sorted(keep), "retired": retired}


def retire(admin_dsns: Mapping[str, str], *, keep: set[int] | None = None) -> list[int]:
    """Delete, on every shard, each key that no shard signs with, that no pending message on
    any shard names, and that is not in ``keep``. Returns the ids deleted."""
    try:
        keys = {shard: list_keys(dsn) for shard, dsn in admin_dsns.items()}
    except psycopg.Error as exc:
        raise RotationError(f"a shard's primary could not be read: {exc}") from exc
    needed = set(keep or ())
    for ks in keys.values():
        needed |= {k.key_id for k in ks if k.signing or k.pending > 0}
    candidates = sorted({k.key_id for ks in keys.values() for k in ks} - needed)
    if not candidates:
        return []
    for dsn in admin_dsns.values():
        with connect(dsn) as conn, conn.transaction():
            # Under the fence lock, recheck: no write in flight, none pending naming the key.
            lock_fence(conn)
            conn.execute(
                "DELETE FROM txr.saga_keys k WHERE k.key_id = ANY(%s) AND NOT k.signing"
                " AND NOT EXISTS (SELECT 1 FROM txr.outbox o"
                "  WHERE o.state = 'pending' AND o.key_id = k.key_id)",
                (candidates,),
            )
    return candidates
