"""Synchronous replication administration of a shard primary (sync psycopg, for operators).

G1 (RPO 0) holds only while the primary names a synchronous standby and that standby streams:
with ``synchronous_commit = on`` every commit then waits until the standby has flushed it. A
primary is initialised *without* one (nothing could commit before a standby exists); the
launcher calls :func:`set_sync_standby` once the standby streams, before any router is told
about the shard.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

# A standby that streams is promoted to 'sync' within one status interval of the reload
# (wal_receiver_status_interval = 1 s locally); across a WAN allow a few round trips more.
SYNC_WAIT_TIMEOUT_S: Final = 30.0
_POLL_INTERVAL_S: Final = 0.05
CONNECT_TIMEOUT_S: Final = 10

# Standby names are application_name values we generate (infra.local.postgres.application_name).
_APP_NAME_RE: Final = re.compile(r"[a-z0-9_]{1,63}")


class ReplicationError(RuntimeError):
    """The standby did not reach the requested state in time."""


@dataclass(frozen=True, slots=True)
class StandbyStatus:
    application_name: str
    state: str  # 'streaming', 'catchup', ...
    sync_state: str  # 'sync', 'async', 'potential', 'quorum'
    replay_lag_s: float | None


def _connect(
    admin_dsn: str, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> psycopg.Connection[Any]:
    # Autocommit: ALTER SYSTEM refuses a transaction block, and the other calls are single
    # statements. libpq takes whole seconds, and 0 would mean no bound at all.
    return psycopg.connect(
        admin_dsn, autocommit=True, connect_timeout=int(max(1, connect_timeout_s))
    )


def standbys(admin_dsn: str) -> list[StandbyStatus]:
    """The primary's view of its standbys (pg_stat_replication)."""
    with _connect(admin_dsn) as conn:
        rows = conn.execute(
            "SELECT application_name, state, sync_state,"
            " extract(epoch FROM replay_lag)::float8"
            " FROM pg_stat_replication"
            # Every walsender is listed, the change feed's logical streams too
            # (regionstore.changefeed); a standby is the one not serving a logical slot.
            " WHERE pid NOT IN (SELECT active_pid FROM pg_replication_slots"
            "  WHERE slot_type = 'logical' AND active_pid IS NOT NULL)"
            " ORDER BY application_name"
        ).fetchall()
    return [StandbyStatus(r[0], r[1], r[2], r[3]) for r in rows]


def set_sync_standby(
    admin_dsn: str, app_name: str | None, *, timeout_s: float = SYNC_WAIT_TIMEOUT_S
) -> None:
    """Name ``app_name`` the primary's synchronous standby (``None``: no synchronous standby).

    Returns once ``pg_stat_replication`` shows that standby as ``sync`` (or, for ``None``, shows
    no synchronous standby); raises :class:`ReplicationError` after ``timeout_s``.
    """
    if app_name is not None and not _APP_NAME_RE.fullmatch(app_name):
        raise ValueError(f"not a standby application name: {app_name!r}")
    value = "" if app_name is None else f'FIRST 1 ("{app_name}")'
    with _connect(admin_dsn) as conn:
        # ALTER SYSTEM takes no bind parameters; the value is quoted as a literal.
        conn.execute(
            sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value))
        )
        conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout_s
        while True:
            if app_name is None:
                row = conn.execute(
                    "SELECT current_setting('synchronous_standby_names') = ''"
                    " AND NOT EXISTS (SELECT 1 FROM pg_stat_replication"
                    "                 WHERE sync_state IN ('sync', 'quorum'))"
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_replication"
                    " WHERE application_name = %s AND state = 'streaming'"
                    " AND sync_state = 'sync')",
                    (app_name,),
                ).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise ReplicationError(
                    f"standby {app_name!r} not reported sync after {timeout_s}s"
                    if app_name
                    else f"synchronous standby not cleared after {timeout_s}s"
                )
            time.sleep(_POLL_INTERVAL_S)


@dataclass(frozen=True, slots=True)
class ReplicaLsn:
    """A standby's own view of its progress, in WAL bytes."""

    in_recovery: bool
    receive: int
    replay: int


def standby_progress(admin_dsn: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> ReplicaLsn:
    """Receive and replay LSN of a standby (``in_recovery`` False: it is a primary)."""
    with _connect(admin_dsn, connect_timeout_s) as conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery(),"
            # After a restart the receive position is NULL until the first byte arrives; what
            # was replayed is then the most the standby certainly holds.
            " coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0'), 0)::bigint,"
            " coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0'), 0)::bigint"
        ).fetchone()
    assert row is not None
    in_recovery, receive, replay = bool(row[0]), int(row[1]), int(row[2])
    return ReplicaLsn(in_recovery, max(receive, replay), replay)


@dataclass(frozen=True, slots=True)
class ReplicationRow:
    """One standby as its primary sees it (pg_stat_replication), lags in bytes and seconds."""

    application_name: str
    state: str
    sync_state: str
    flush_lag_bytes: int | None
    replay_lag_bytes: int | None
    replay_lag_s: float | None


def replication_report(
    admin_dsn: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> list[ReplicationRow]:
    """The primary's standbys with their lag behind its current WAL position."""
    with _connect(admin_dsn, connect_timeout_s) as conn:
        rows = conn.execute(
            "SELECT application_name, state, sync_state,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
            " extract(epoch FROM replay_lag)::float8"
            " FROM pg_stat_replication"
            # Every walsender is listed, the change feed's logical streams too
            # (regionstore.changefeed); a standby is the one not serving a logical slot.
            " WHERE pid NOT IN (SELECT active_pid FROM pg_replication_slots"
            "  WHERE slot_type = 'logical' AND active_pid IS NOT NULL)"
            " ORDER BY application_name"
        ).fetchall()
    return [ReplicationRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


def ensure_physical_slot(admin_dsn: str, slot_name: str) -> None:
    """Create the physical replication slot ``slot_name`` (reserving WAL now) if missing.

    A rejoining standby streams through its slot, so the new primary keeps the WAL it still
    needs however long the standby takes to come up (bounded by max_slot_wal_keep_size).
    """
    if not _APP_NAME_RE.fullmatch(slot_name):
        raise ValueError(f"not a slot name: {slot_name!r}")
    with _connect(admin_dsn) as conn:
        conn.execute(
            "SELECT pg_create_physical_replication_slot(%s, true)"
            " WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (slot_name, slot_name),
        )
