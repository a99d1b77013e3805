"""Read-only audit queries for one tenant on one shard: what a checker compares a client's
history with (chaos/checker.py), read over the admin role, in one snapshot.

Owns no writes. Never imports router, bench, chaos or infra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import class_row

from consistency import ids
from consistency.saga import STATUS_OF, TransferStatus

CONNECT_TIMEOUT_S: Final = 5
# A chaos run writes thousands of transfers per tenant, not millions: one read is enough.
TRANSFERS_MAX: Final = 1_000_000


@dataclass(frozen=True)
class StoredTransfer:
    """A transfer as its source shard holds it (public ids, as the API shows them)."""

    id: str
    reference: str | None
    source: str
    destination: str
    amount: int
    status: TransferStatus
    shard: str


@dataclass(frozen=True)
class _Row:
    id: Any
    reference: str | None
    source: int
    destination: int
    amount: int
    status: str


@dataclass(frozen=True)
class TenantAudit:
    transfers: list[StoredTransfer]
    # Transfers whose source account's slot this shard does not own (G5: must be none).
    foreign_slot_transfers: int


def tenant_audit(admin_dsn: str, shard: str, tenant: str) -> TenantAudit:
    with psycopg.connect(admin_dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            with conn.cursor(row_factory=class_row(_Row)) as cur:
                rows = cur.execute(
                    "SELECT id, reference, source, destination, amount, status"
                    " FROM txr.transfers WHERE tenant = %s ORDER BY created_at LIMIT %s",
                    (tenant, TRANSFERS_MAX),
                ).fetchall()
            foreign = conn.execute(
                "SELECT count(*) FROM txr.transfers t WHERE t.tenant = %s AND NOT EXISTS"
                " (SELECT 1 FROM txr.owned_slots s WHERE s.slot = txr.slot_of(t.source))",
                (tenant,),
            ).fetchone()
    out = [
        StoredTransfer(
            id=ids.format_transfer_id(ids.account_slot(r.source), r.id),
            reference=r.reference,
            source=ids.format_account_id(r.source),
            destination=ids.format_account_id(r.destination),
            amount=int(r.amount),
            status=STATUS_OF[r.status],
            shard=shard,
        )
        for r in rows
    ]
    return TenantAudit(out, int(foreign[0]) if foreign else 0)
