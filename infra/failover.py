"""The real operations behind ``consistency.failover_plan`` and ``consistency.slot_moves`` for a
local cluster.

PostgreSQL through ``regionstore.admin`` / ``regionstore.replication`` and the server commands of
``infra.local.postgres``; etcd through ``consistency.etcd``; the launcher's ``cluster.json``
follows every role change, so ``txr local status``, ``down`` and the test fixtures keep finding
each node.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
from psycopg.conninfo import make_conninfo

from consistency import autofailover as af
from consistency import slot_moves
from consistency.errors import CasConflict, ConsistencyError
from consistency.etcd import EtcdClient
from consistency.failover_plan import (
    FailoverError,
    Progress,
    ShardRecord,
    StandbyLsn,
)
from consistency.limits import SLOT_COUNT
from consistency.topology import SHARD_PREFIX, SLOTMAP_KEY, Node, SlotMap
from infra.local import cluster, postgres
from infra.local.state import PgNode
from regionstore import admin, replication

# pg_rewind copies the changed blocks and the WAL since the fork; a few seconds locally.
REWIND_TIMEOUT_S: Final = 300
# A standby that does not answer within this is treated as unreachable for one LSN poll.
LSN_CONNECT_TIMEOUT_S: Final = 2.0
# `txr status` must answer quickly when a region is down.
STATUS_CONNECT_TIMEOUT_S: Final = 2.0
# The operator token `txr status` mints to ask each router for its view; a minute is plenty.
ROUTER_STATUS_TOKEN_TTL_S: Final = 60
ETCD_HEALTH_TIMEOUT_S: Final = 2.0


class LocalShardOps:
    """``consistency.failover_plan.ShardOps`` for the local cluster at ``cluster_dir``."""

    def __init__(self, cluster_dir: Path, *, via_region: str | None = None) -> None:
        """``via_region``: dial every server the way that region does (through the WAN
        emulator), as a region's failover controller must: a partition then hides a primary
        from it exactly as it does from the region's routers."""
        self.dir = cluster_dir.resolve()
        self.via_region = via_region
        self.state = cluster.load_state(self.dir)
        self.pw = cluster.pg_passwords(self.dir)
        self.etcd = self.state.etcd_endpoints()

    @property
    def regions(self) -> list[str]:
        return self.state.regions

    # -- nodes ----------------------------------------------------------------------------------

    def _entry(self, node_name: str) -> PgNode:
        entry = self.state.pg_node(node_name)
        if entry is None:
            raise FailoverError(f"node {node_name} is not part of the cluster in {self.dir}")
        return entry

    def admin_dsn(self, node: Node, db: str = cluster.DB_NAME) -> str:
        port = node.port if self.via_region is None else self._wan_port(self.via_region, node)
        return postgres.dsn(cluster.HOST, port, postgres.ADMIN_ROLE, self.pw["admin_password"], db)

    def node_in(self, shard: str, region: str) -> Node:
        for e in self.state.pg_nodes:
            if e.shard == shard and e.region == region:
                return Node(e.node, region, cluster.HOST, e.port)
        raise FailoverError(f"{shard} has no node in {region}")

    def _wan_port(self, src_region: str, to: Node) -> int:
        """The port ``src_region`` dials to reach ``to`` (through the WAN emulator)."""
        if src_region == to.region:
            return to.port
        primary_port = self.state.region_ports(to.region)["pg_primary"]
        svc = "pg-primary" if primary_port == to.port else "pg-standby"
        port = self.state.wan_port(src_region, to.region, svc)
        if port is not None:
            return port
        raise FailoverError(f"no WAN link {src_region} -> {to.region} ({svc})")

    # -- etcd -----------------------------------------------------------------------------------

    def load(self, shard: str) -> tuple[ShardRecord, int]:
        async def run() -> tuple[bytes, int] | None:
            async with EtcdClient(self.etcd) as client:
                return await client.get(SHARD_PREFIX + shard)

        got = cluster.run_async(run)
        if got is None:
            raise FailoverError(f"no shard {shard} in etcd")
        return ShardRecord.from_json(orjson.loads(got[0])), got[1]

    def cas(self, shard: str, expected_revision: int, record: ShardRecord) -> int:
        key = SHARD_PREFIX + shard

        async def run() -> int:
            async with EtcdClient(self.etcd) as client:
                return await client.cas(
                    key, expected_revision, {key: orjson.dumps(record.to_json())}
                )

        # The txn's header revision is the key's new mod_revision (one put, one revision);
        # CasConflict propagates to the procedure, which names it.
        return cluster.run_async(run)

    # -- PostgreSQL -----------------------------------------------------------------------------

    def fence_old(self, node: Node) -> int | None:
        try:
            return admin.fence_and_flush_lsn(self.admin_dsn(node))
        except psycopg.OperationalError:
            return None

    def standby_lsn(self, node: Node) -> StandbyLsn | None:
        try:
            got = replication.standby_progress(
                self.admin_dsn(node, "postgres"), connect_timeout_s=LSN_CONNECT_TIMEOUT_S
            )
        except psycopg.OperationalError:
            return None
        if not got.in_recovery:
            return None
        return StandbyLsn(got.receive, got.replay)

    def stop(self, node: Node) -> None:
        postgres.stop(self._entry(node.name).datadir, "fast")

    def promote(self, node: Node) -> None:
        postgres.promote(self._entry(node.name).datadir)

    def set_epoch_in_db(self, node: Node, epoch: int) -> None:
        admin.set_fence(self.admin_dsn(node), epoch=epoch)

    def await_sync_standby(self, primary: Node, standby: Node) -> None:
        try:
            replication.set_sync_standby(
                self.admin_dsn(primary, "postgres"), postgres.application_name(standby.name)
            )
        except (replication.ReplicationError, psycopg.OperationalError) as exc:
            raise FailoverError(str(exc)) from exc

    def clear_sync_standby(self, primary: Node) -> None:
        try:
            replication.set_sync_standby(self.admin_dsn(primary, "postgres"), None)
        except (replication.ReplicationError, psycopg.OperationalError) as exc:
            raise FailoverError(str(exc)) from exc

    def rejoin(self, node: Node, primary: Node) -> None:
        """Stop ``node``, ``pg_rewind`` it from ``primary`` and start it as a standby.

        pg_rewind runs as the server user (as root: ``runuser``); the source DSN names the
        password file the standbys use, so no password reaches a command line. A target that
        crashed is recovered by pg_rewind itself (single-user mode, PostgreSQL 13+).
        """
        entry = self._entry(node.name)
        datadir = entry.datadir
        try:
            postgres.stop(datadir, "fast")
        except postgres.PostgresError:
            postgres.stop(datadir, "immediate")
        # pg_rewind (PostgreSQL 15) reads the source's timeline from its control file, which a
        # promoted server updates only at its next checkpoint: right after a failover it still
        # says the old timeline, pg_rewind answers "no rewind required", and the node then
        # cannot follow the new timeline. A checkpoint first makes the fork visible.
        with psycopg.connect(
            self.admin_dsn(primary, "postgres"),
            autocommit=True,
            connect_timeout=math.ceil(LSN_CONNECT_TIMEOUT_S),
        ) as conn:
            conn.execute("CHECKPOINT")
        pg_root = self.state.pg_root
        assert pg_root is not None, "a cluster with PostgreSQL nodes has a pg_root"
        passfile = pg_root / "pgpass"
        app = postgres.application_name(node.name)
        src_port = self._wan_port(node.region, primary)
        source = make_conninfo(
            host=cluster.HOST,
            port=src_port,
            user=postgres.ADMIN_ROLE,
            dbname="postgres",
            passfile=str(passfile),
        )
        args = [str(postgres.bindir() / "pg_rewind"), "-D", str(datadir), "--source-server", source]
        if postgres.running_as_root():
            args = ["runuser", "-u", postgres.UNPRIVILEGED_USER, "--", *args]
        try:
            res = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=REWIND_TIMEOUT_S,
                check=False,
                cwd="/",
                env=dict(os.environ, PGCONNECT_TIMEOUT="10"),
            )
        except subprocess.TimeoutExpired as exc:
            raise FailoverError(f"pg_rewind of {node.name} timed out") from exc
        if res.returncode != 0:
            raise FailoverError(f"pg_rewind of {node.name} failed: {res.stderr[-2000:]}")
        # The slot first: the standby names it in primary_slot_name and refuses to stream
        # without it.
        replication.ensure_physical_slot(self.admin_dsn(primary, "postgres"), app)
        postgres.configure_as_standby(
            datadir,
            entry.port,
            primary_host=cluster.HOST,
            primary_port=src_port,
            passfile=passfile,
            app_name=app,
        )
        pid = postgres.start(datadir, entry.log)
        # Not serving until now (detached since the failover): a standby again.
        state = cluster.load_state(self.dir)
        state.set_pg_started(node.name, pid, "standby")
        self.state = state

    # -- the launcher's state -------------------------------------------------------------------

    def node_role_changed(self, shard: str, primary: Node, standbys: tuple[Node, ...]) -> None:
        state = cluster.load_state(self.dir)
        record, _ = self.load(shard)
        state.record_roles(
            shard,
            primary=primary.name,
            standbys={s.name for s in standbys},
            primary_region=primary.region,
            standby_region=standbys[0].region if standbys else None,
            epoch=record.shard.epoch,
        )
        self.state = state


# -- txr status ---------------------------------------------------------------------------------


def _etcd_health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=ETCD_HEALTH_TIMEOUT_S) as r:  # noqa: S310
            ok = json.loads(r.read()).get("health") == "true"
        return {"endpoint": url, "healthy": ok}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"endpoint": url, "healthy": False, "error": type(exc).__name__}


def cluster_status(cluster_dir: Path) -> dict[str, Any]:
    """Shards (primary, epoch, region survival, standbys with sync state and lag) and etcd."""
    ops = LocalShardOps(cluster_dir)
    members = [_etcd_health(u) for u in ops.etcd]
    shards: dict[str, Any] = {}
    names = ops.state.shards
    for name in names:
        try:
            rec, _rev = ops.load(name)
        except Exception as exc:  # noqa: BLE001 - etcd down: report it, keep going
            shards[name] = {"error": f"etcd: {type(exc).__name__}: {exc}"}
            continue
        sh = rec.shard
        entry: dict[str, Any] = {
            "home_region": sh.home_region,
            "primary": sh.primary.name,
            "primary_region": sh.primary.region,
            "epoch": sh.epoch,
            "region_survival": rec.region_survival,
            "standbys": [],
        }
        try:
            rows = {
                r.application_name: r
                for r in replication.replication_report(
                    ops.admin_dsn(sh.primary, "postgres"),
                    connect_timeout_s=STATUS_CONNECT_TIMEOUT_S,
                )
            }
            entry["primary_reachable"] = True
        except psycopg.Error as exc:
            rows = {}
            entry["primary_reachable"] = False
            entry["primary_error"] = type(exc).__name__
        sync_streaming = False
        for n in sh.standbys:
            r = rows.get(postgres.application_name(n.name))
            sb = {
                "node": n.name,
                "region": n.region,
                "state": r.state if r else "not connected",
                "sync_state": r.sync_state if r else None,
                "flush_lag_bytes": r.flush_lag_bytes if r else None,
                "replay_lag_bytes": r.replay_lag_bytes if r else None,
                "replay_lag_s": r.replay_lag_s if r else None,
            }
            sync_streaming |= bool(
                r
                and r.sync_state == "sync"
                and r.state == "streaming"
                and n.region != sh.primary.region
            )
            entry["standbys"].append(sb)
        # The record says what the operator set up; the primary says what holds right now.
        entry["region_survival_now"] = sync_streaming
        detached = [
            e.node
            for e in ops.state.pg_nodes
            if e.shard == name
            and e.node != sh.primary.name
            and e.node not in {n.name for n in sh.standbys}
        ]
        entry["detached"] = detached
        shards[name] = entry
    auto = autofailover_status(ops.etcd)
    for name, entry in shards.items():
        if "error" not in entry:
            entry["autofailover"] = auto["shards"].get(name, {"on": auto["mode"]["enabled"]})
    return {
        "etcd": members,
        "autofailover": auto,
        "shards": shards,
        "routers": _router_views(cluster_dir),
    }


def autofailover_status(endpoints: list[str]) -> dict[str, Any]:
    """The controllers' mode, last decision and last automatic failover per shard (etcd)."""

    async def run() -> dict[str, bytes]:
        async with EtcdClient(endpoints, timeout_s=STATUS_CONNECT_TIMEOUT_S) as client:
            _rev, kv = await client.get_prefix(af.CONTROL_PREFIX)
            return kv

    try:
        kv = cluster.run_async(run)
    except ConsistencyError as exc:
        return {"error": f"etcd: {type(exc).__name__}", "mode": af.Mode().to_json(), "shards": {}}
    raw_mode = kv.get(af.MODE_KEY)
    mode = af.Mode.from_json(orjson.loads(raw_mode) if raw_mode else None)
    shards: dict[str, Any] = {}
    now = time.time()
    for key, raw in kv.items():
        body = dict(orjson.loads(raw)) if not key.startswith(af.VERDICT_PREFIX) else {}
        if body:
            body["age_s"] = round(now - float(body.get("at", now)), 1)
        if key.startswith(af.DECISION_PREFIX):
            shard, _, region = key.removeprefix(af.DECISION_PREFIX).partition("/")
            entry = shards.setdefault(shard, {})
            entry.setdefault("decisions", {})[region] = body
            # The latest of the regions' decisions is "the" last decision.
            if float(body.get("at", 0)) >= float(entry.get("decision", {}).get("at", 0)):
                entry["decision"] = body
        elif key.startswith(af.LAST_FAILOVER_PREFIX):
            shards.setdefault(key.removeprefix(af.LAST_FAILOVER_PREFIX), {})["last_failover"] = body
    for name, entry in shards.items():
        entry["on"] = mode.on(name)
    regions = sorted(
        k.removeprefix(af.VERDICT_PREFIX) for k in kv if k.startswith(af.VERDICT_PREFIX)
    )
    return {"mode": mode.to_json(), "controllers_publishing": regions, "shards": shards}


def set_autofailover(cluster_dir: Path, on: bool, shard: str | None) -> af.Mode:
    """``txr autofailover on|off [--shard S]``: one CAS on the mode key (retried on a race)."""
    ops = LocalShardOps(cluster_dir)

    async def run() -> af.Mode:
        async with EtcdClient(ops.etcd) as client:
            while True:
                got = await client.get(af.MODE_KEY)
                mode = af.Mode.from_json(orjson.loads(got[0]) if got else None)
                if shard is None:
                    # Global: per-shard exceptions are dropped, so "off" really means all.
                    new = af.Mode(on, {})
                else:
                    new = af.Mode(mode.enabled, {**mode.shards, shard: on})
                try:
                    await client.cas(
                        af.MODE_KEY,
                        got[1] if got else 0,
                        {af.MODE_KEY: orjson.dumps(new.to_json())},
                    )
                except CasConflict:
                    continue
                return new

    return cluster.run_async(run)


def _router_views(cluster_dir: Path) -> dict[str, Any]:
    """Each region's router's own view: invalidation lag per shard and RTTs (admin scope)."""
    try:
        desc = cluster.status(cluster_dir)
        token = cluster.admin_token(cluster_dir, "operator", ROUTER_STATUS_TOKEN_TTL_S)
    except Exception as exc:  # noqa: BLE001 - the rest of the status is still worth printing
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {}
    for region, r in desc["regions"].items():
        req = urllib.request.Request(  # noqa: S310 - a loopback URL from our own state file
            r["router"] + "/v1/admin/status", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=STATUS_CONNECT_TIMEOUT_S) as resp:  # noqa: S310
                out[region] = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            out[region] = {"error": type(exc).__name__}
    return out


def _fmt_standby(b: dict[str, Any]) -> str:
    # .get throughout, as format_status: a document from another version (or one written by
    # hand) may lack a key, and the table is still worth printing.
    lag_bytes, lag_s = b.get("replay_lag_bytes"), b.get("replay_lag_s")
    lag = "-" if lag_bytes is None else f"{lag_bytes} B"
    if lag_s is not None:
        lag += f" {lag_s:.3f}s"
    return f"{b.get('node', '?')} ({b.get('sync_state') or b.get('state', 'unknown')}, {lag})"


def _fmt_auto(a: dict[str, Any] | None) -> list[str]:
    if not a:
        return []
    out = []
    dec = a.get("decision")
    mode = "on" if a.get("on", True) else "OFF"
    if dec:
        out.append(
            f"{'':12s} autofailover {mode}; last decision ({dec.get('by')}, {dec.get('age_s')}s "
            f"ago): {dec.get('action')}/{dec.get('reason')}: {dec.get('detail')}"
        )
    else:
        out.append(f"{'':12s} autofailover {mode}; no decision yet")
    last = a.get("last_failover")
    if last:
        out.append(
            f"{'':12s} last automatic failover {last.get('age_s')}s ago by {last.get('by')}: "
            f"{last.get('detail')}"
        )
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = ["etcd members:"]
    for m in st.get("etcd", []):
        lines.append(
            f"  {m.get('endpoint', '?'):28s} {'healthy' if m.get('healthy') else 'UNHEALTHY'}"
        )
    auto = st.get("autofailover") or {}
    if auto:
        mode = auto.get("mode") or {}
        off = sorted(k for k, v in (mode.get("shards") or {}).items() if not v)
        lines.append(
            f"automatic failover: {'on' if mode.get('enabled', True) else 'OFF'}"
            + (f" (off for {', '.join(off)})" if off else "")
            + (f"; {auto['error']}" if auto.get("error") else "")
        )
    lines.append("")
    lines.append(
        f"{'shard':12s} {'primary':24s} {'epoch':>5s}  {'survival':8s}  standbys (sync, lag)"
    )
    for name, s in st.get("shards", {}).items():
        if "error" in s:
            lines.append(f"{name:12s} {s['error']}")
            continue
        survival_now = bool(s.get("region_survival_now"))
        survival = "yes" if survival_now else "NO"
        prim = str(s.get("primary")) + ("" if s.get("primary_reachable") else " (DOWN)")
        sbs = ", ".join(_fmt_standby(b) for b in s.get("standbys", [])) or "none"
        lines.append(f"{name:12s} {prim:24s} {s.get('epoch', 0):5d}  {survival:8s}  {sbs}")
        # Per shard (these lines once sat after the loop and spoke of the last shard only).
        if s.get("detached"):
            lines.append(f"{'':12s} detached: {', '.join(s['detached'])} (txr rejoin)")
        if not survival_now:
            lines.append(f"{'':12s} WARNING: no synchronous standby in another region (G1 off)")
        lines.extend(_fmt_auto(s.get("autofailover")))
    routers = st.get("routers", {})
    if routers and "error" not in routers:
        lines.append("")
        lines.append("routers: invalidation lag per shard (s), RTT ewma/tail (ms)")
        for region, v in routers.items():
            if "error" in v:
                lines.append(f"  {region:10s} unreachable ({v['error']})")
                continue
            lags = ", ".join(
                f"{sh} {'-' if lg.get('seconds') is None else format(lg['seconds'], '.3f')}"
                for sh, lg in (v.get("invalidation_lag") or {}).items()
            )
            lines.append(f"  {region:10s} lag: {lags}")
            rtts = ", ".join(
                f"{t.split(':', 1)[-1]} {x['ewma_ms']:.1f}/{x['tail_ms']:.1f}"
                for t, x in (v.get("rtt") or {}).items()
                if x.get("ewma_ms") is not None and x.get("tail_ms") is not None
            )
            lines.append(f"  {'':10s} rtt: {rtts}")
    return "\n".join(lines)


class LocalRehomeOps:
    """``consistency.slot_moves.RehomeOps`` for the local cluster."""

    def __init__(self, cluster_dir: Path) -> None:
        self.ops = LocalShardOps(cluster_dir)

    def _primary_dsn(self, shard: str) -> str:
        rec, _ = self.ops.load(shard)
        return self.ops.admin_dsn(rec.shard.primary)

    def _slotmap(self) -> tuple[SlotMap, int]:
        async def run() -> tuple[bytes, int] | None:
            async with EtcdClient(self.ops.etcd) as client:
                return await client.get(SLOTMAP_KEY)

        got = cluster.run_async(run)
        if got is None:
            raise slot_moves.RehomeError("no slot map in etcd")
        return SlotMap.from_json(orjson.loads(got[0])), got[1]

    def slot_owner(self, slot: int) -> tuple[str, int, int]:
        slots, rev = self._slotmap()
        shard, epoch = slots.lookup(slot)
        return shard, epoch, rev

    def unown(self, shard: str, slot: int, epoch: int) -> None:
        admin.set_slot(self._primary_dsn(shard), slot, epoch=epoch, owned=False)

    def own(self, shard: str, slot: int, epoch: int) -> None:
        admin.set_slot(self._primary_dsn(shard), slot, epoch=epoch, owned=True)

    def pending_outbound(self, shard: str, slot: int, *, nudge: bool) -> int:
        return admin.slot_outbound_pending(self._primary_dsn(shard), slot, nudge=nudge)

    def incoming_move(self, shard: str, slot: int, epoch: int) -> str | None:
        return admin.incoming_move(self._primary_dsn(shard), slot, epoch)

    def shards(self) -> list[str]:
        return self.ops.state.shards

    def copy_in(
        self, source: str, target: str, slot: int, new_epoch: int, move_id: str
    ) -> dict[str, int]:
        return admin.copy_slot_in(
            self._primary_dsn(source),
            self._primary_dsn(target),
            slot,
            source_shard=source,
            target_shard=target,
            new_epoch=new_epoch,
            move_id=move_id,
        )

    def finish_out(
        self, source: str, target: str, slot: int, new_epoch: int, move_id: str
    ) -> dict[str, int]:
        return admin.finish_slot_out(
            self._primary_dsn(source),
            self._primary_dsn(target),
            slot,
            target_shard=target,
            new_epoch=new_epoch,
            move_id=move_id,
        )

    def cas_slot(self, slot: int, shard: str, epoch: int, expected_revision: int) -> None:
        slots, _ = self._slotmap()
        names, epochs = slots.table()
        names[slot], epochs[slot] = shard, epoch
        new = SlotMap.from_table(names, epochs)

        async def run() -> int:
            async with EtcdClient(self.ops.etcd) as client:
                return await client.cas(
                    SLOTMAP_KEY, expected_revision, {SLOTMAP_KEY: orjson.dumps(new.to_json())}
                )

        cluster.run_async(run)


def rehome(
    cluster_dir: Path,
    slot: int,
    to_shard: str,
    *,
    progress: Progress,
    drain_timeout_s: float = slot_moves.REHOME_DRAIN_TIMEOUT_S,
    ops: slot_moves.RehomeOps | None = None,
) -> dict[str, Any]:
    """``consistency.slot_moves.rehome`` on the local cluster; ``ops`` replaces the real
    operations (tests wrap them to stop a move part way)."""
    if not 0 <= slot < SLOT_COUNT:
        raise slot_moves.RehomeRefused(f"slot {slot} outside 0..{SLOT_COUNT - 1}")
    return slot_moves.rehome(
        ops or LocalRehomeOps(cluster_dir),
        slot,
        to_shard,
        progress=progress,
        drain_timeout_s=drain_timeout_s,
    )
