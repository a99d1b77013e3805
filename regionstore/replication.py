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
from typing import Final

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


def standbys(admin_dsn: str) -> list[StandbyStatus]:
    """The primary's view of its standbys (pg_stat_replication)."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        rows = conn.execute(
            "SELECT application_name, state, sync_state,"
            " extract(epoch FROM replay_lag)::float8"
            " FROM pg_stat_replication ORDER BY application_name"
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
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
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
