"""The database's work per acknowledged transfer on the loaded primary, read around a load run.

Statements come from ``pg_stat_statements`` with nested tracking on (so the statements inside
the batch procedure count one by one, not only the procedure's call), limited to the ``txr``
database: calls, rows and WAL per transfer, the heaviest statements first. WAL comes from
``pg_stat_wal`` (the whole server: records, full-page images, bytes, writes and syncs). These
say what a transfer costs the primary in work, which /proc's CPU figure cannot break down.

The local cluster preloads the extension (infra/local/postgres.py); :func:`enable` creates it
and turns nested tracking on, on the benchmark's own throwaway cluster only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

# The statements listed in the report, heaviest (by WAL bytes, then calls) first.
TOP_STATEMENTS: Final = 8
# Characters of each listed statement's text: enough to recognise it.
QUERY_TEXT_CHARS: Final = 120
CONNECT_TIMEOUT_S: Final = 5

_STATEMENTS_SQL: Final = """
SELECT queryid, query, calls, rows, wal_records, wal_fpi, wal_bytes, total_exec_time
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE %s
"""
# Our own snapshot queries are left out of what we count.
_OWN_MARK: Final = "%pg_stat_%"
_WAL_SQL: Final = "SELECT wal_records, wal_fpi, wal_bytes, wal_write, wal_sync FROM pg_stat_wal"


@dataclass(frozen=True, slots=True)
class Statement:
    query: str
    calls: int
    rows: int
    wal_records: int
    wal_fpi: int
    wal_bytes: int
    exec_ms: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    statements: dict[int, Statement]
    wal: tuple[int, int, int, int, int]


def enable(dsn: str) -> None:
    """Create the extension and count nested statements (superuser DSN of the primary)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        conn.execute("SELECT pg_reload_conf()")


def snapshot(dsn: str) -> Snapshot:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        rows = conn.execute(_STATEMENTS_SQL, (_OWN_MARK,)).fetchall()
        wal = conn.execute(_WAL_SQL).fetchone()
    assert wal is not None
    return Snapshot(
        {
            int(r[0]): Statement(
                str(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), float(r[7])
            )
            for r in rows
            if r[0] is not None
        },
        (int(wal[0]), int(wal[1]), int(wal[2]), int(wal[3]), int(wal[4])),
    )


def per_transfer(before: Snapshot, after: Snapshot, acked: int) -> dict[str, Any]:
    """What the primary did between the snapshots, divided by the acknowledged transfers."""
    n = max(acked, 1)
    empty = Statement("", 0, 0, 0, 0, 0, 0.0)
    deltas = []
    for qid, a in after.statements.items():
        b = before.statements.get(qid, empty)
        calls = a.calls - b.calls
        if calls <= 0:
            continue
        deltas.append(
            {
                "query": " ".join(a.query.split())[:QUERY_TEXT_CHARS],
                "calls_per_transfer": calls / n,
                "rows_per_transfer": (a.rows - b.rows) / n,
                "wal_bytes_per_transfer": (a.wal_bytes - b.wal_bytes) / n,
                "exec_us_per_transfer": (a.exec_ms - b.exec_ms) * 1000.0 / n,
            }
        )
    deltas.sort(key=lambda d: (d["wal_bytes_per_transfer"], d["calls_per_transfer"]), reverse=True)
    w = [x - y for x, y in zip(after.wal, before.wal, strict=True)]
    return {
        "acked": acked,
        "statements_per_transfer": sum(d["calls_per_transfer"] for d in deltas),
        "wal_records_per_transfer": w[0] / n,
        "wal_fpi_per_transfer": w[1] / n,
        "wal_bytes_per_transfer": w[2] / n,
        "wal_writes_per_transfer": w[3] / n,
        "wal_syncs_per_transfer": w[4] / n,
        "top_statements": deltas[:TOP_STATEMENTS],
    }
