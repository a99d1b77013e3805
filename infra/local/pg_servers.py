"""The local cluster's PostgreSQL servers as a whole: each shard's primary and standby.

What this module owns: bringing up a shard's primary (initdb, start, roles, the database, the
schema and the shard's identity), its standby (cloned and streaming through the WAN emulator),
naming the synchronous standby, and stopping every server of a cluster (``stop_all``, for
``txr local down``). One server's primitives (initdb, pg_ctl, configuration) are
``infra.local.postgres``; the launcher (``infra.local.cluster``) decides the order and runs
the regions side by side. Each node is recorded in the state before its server exists, so
``down`` finds its data directory whatever happens next.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from consistency.topology import SlotMap
from infra.local import layout, postgres, procs
from infra.local.ports import PortPlan
from infra.local.state import HOST, ClusterError, PgNode, ShardRecord, State

log = logging.getLogger("txr.local")

# After pg_ctl stop: how long the servers' processes get to exit before SIGKILL.
PG_EXIT_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class PgServers:
    """The servers of one starting cluster, with what every start needs."""

    state: State
    plan: PortPlan
    regions: tuple[str, ...]
    root: Path  # the PostgreSQL state root (postgres.state_root)
    logs: Path
    creds: postgres.Credentials
    passfile: Path

    def admin_dsn(self, port: int, db: str = postgres.DB_NAME) -> str:
        return postgres.dsn(HOST, port, postgres.ADMIN_ROLE, self.creds.admin_password, db)

    def _node(self, shard: str, region: str, role: str, port: int) -> PgNode:
        """The node's entry (no pid yet), recorded, with its log in place."""
        node = layout.node_name(shard, region)
        app = postgres.application_name(node)
        # The server user writes its own log; as root it may not be able to enter our
        # directory (it may sit under /root), so the log lives in the PostgreSQL state root and
        # a symlink in logs/ points at it.
        target = postgres.pg_owned_dir(self.root / "logs") / f"{app}.log"
        link = self.logs / f"pg-{node}.log"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        entry = PgNode(node, shard, region, role, port, self.root / app, target, None)
        self.state.add_pg(entry)
        return entry

    def start_primary(self, region: str, slotmap: SlotMap, *, init_schema: bool) -> None:
        """The primary of ``region``'s home shard, ready for the routers (``init_schema``
        False: roles and database only)."""
        shard = layout.shard_name(region)
        port = self.plan.region[region].pg_primary
        entry = self._node(shard, region, "primary", port)
        postgres.init_primary(entry.datadir, port, self.creds)
        self.state.set_pg_pid(entry.node, postgres.start(entry.datadir, entry.log))
        with psycopg.connect(self.admin_dsn(port, "postgres"), autocommit=True) as conn:
            for stmt, params in postgres.create_roles_sql(self.creds):
                conn.execute(stmt.encode(), params)
            db = postgres.DB_NAME
            conn.execute(f"CREATE DATABASE {db} OWNER {postgres.ADMIN_ROLE}".encode())
        if init_schema:
            try:
                from regionstore.admin import init_shard, set_saga_identity
                from regionstore.migrate import apply_migrations
            except ImportError as exc:
                raise ClusterError(f"regionstore is not usable: {exc}") from exc
            dsn = self.admin_dsn(port)
            apply_migrations(dsn)
            init_shard(dsn, epoch=1, slots=slotmap.slots_of(shard), slot_epoch=1)
            key = bytes.fromhex(self.creds.saga_key)
            set_saga_identity(dsn, shard=shard, key_id=1, secret=key)
        standby = layout.standby_region(self.regions, region)
        self.state.record_shard(shard, ShardRecord(region, region, standby, 1))

    def start_standby(self, shard_region: str) -> None:
        """The standby of ``shard_region``'s shard, in the previous region."""
        shard = layout.shard_name(shard_region)
        region = layout.standby_region(self.regions, shard_region)
        entry = self._node(shard, region, "standby", self.plan.region[region].pg_standby)
        postgres.init_standby(
            entry.datadir,
            entry.port,
            primary_host=HOST,
            # The standby's region reaches the primary through its WAN listener, so both the
            # clone and the replication stream pay the link's latency.
            primary_port=self.plan.wan[(region, shard_region, "pg-primary")],
            passfile=self.passfile,
            app_name=postgres.application_name(entry.node),
        )
        self.state.set_pg_pid(entry.node, postgres.start(entry.datadir, entry.log))

    def sync_standby(self, shard_region: str) -> None:
        """Name the shard's standby as its primary's synchronous standby."""
        try:
            from regionstore.replication import set_sync_standby
        except ImportError as exc:
            raise ClusterError(f"regionstore.replication is not usable: {exc}") from exc
        node = layout.node_name(
            layout.shard_name(shard_region), layout.standby_region(self.regions, shard_region)
        )
        set_sync_standby(
            self.admin_dsn(self.plan.region[shard_region].pg_primary, "postgres"),
            postgres.application_name(node),
        )


def _stop_one(entry: PgNode) -> None:
    datadir = entry.datadir
    # pg_ctl knows the server even when up crashed before recording its pid.
    pid = entry.pid
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    for mode in ("fast", "immediate"):
        try:
            postgres.stop(datadir, mode)
            break
        except postgres.PostgresError as exc:
            log.warning("pg_ctl stop -m %s of %s failed: %s", mode, entry.node, exc)
    if pid and procs.is_alive(pid, str(datadir)):
        # The last resort: the postmaster's children exit when they notice it is gone.
        procs.terminate(pid, str(datadir), group=False)


def stop_all(nodes: Sequence[PgNode]) -> list[str]:
    """Stop every server of ``nodes`` side by side; returns what went wrong (nothing: all
    gone)."""
    errors: list[str] = []
    # Every process of every server, taken before the stop: pg_ctl returns when the pid file
    # is gone, and a postmaster killed alone leaves its backends behind; `down` returns only
    # once all of them have exited, so the next cluster can start at once.
    trees: list[int] = []
    for e in nodes:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pm = int((e.datadir / "postmaster.pid").read_text().splitlines()[0])
            if procs.is_alive(pm, str(e.datadir)):
                trees += [pm, *procs.children_of(pm)]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes))) as pool:
        futs = [pool.submit(_stop_one, e) for e in nodes]
        for f in futs:
            try:
                f.result()
            except (procs.ProcessError, OSError) as exc:
                errors.append(str(exc))
    stuck = procs.wait_all_gone(trees, PG_EXIT_TIMEOUT_S)
    if stuck:
        errors.append(f"PostgreSQL processes still running: {stuck}")
    return errors
