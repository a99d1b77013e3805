"""Describing a local cluster: ``txr local status`` and the DSNs operator commands act on.

What this module owns: the cluster description of API.md (``status``: every region's
endpoints and live pids, each node's role, each shard's primary region and epoch, read live
from etcd when it answers and from ``cluster.json`` when it does not), the processes of a
cluster still running (``live_pids``), and the admin DSN of each shard's current primary. It
reads; it starts and stops nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.local import (
    controllers,
    credentials,
    etcd_server,
    layout,
    nats,
    postgres,
    procs,
    redis_server,
    relays,
    routers,
)
from infra.local.state import HOST, STATE_FILE, State, load_state


def live_pids(state: State) -> list[int]:
    """The pids of the cluster's processes and PostgreSQL servers that still run."""
    live = [p.pid for p in state.procs if procs.is_alive(p.pid, p.marker)]
    for pg in state.pg_nodes:
        if pg.pid and procs.is_alive(pg.pid, str(pg.datadir)):
            live.append(pg.pid)
    return live


def status(cluster_dir: Path) -> dict[str, Any]:
    """The cluster description of API.md (``txr local status --json``)."""
    state = load_state(cluster_dir)
    ports = state.ports["regions"]
    pw = credentials.pg_passwords(cluster_dir)
    all_procs = state.procs
    procs_by_name = {p.name: p for p in all_procs}
    topo = None
    if state.status == "up":
        topo = layout.live_topology(state.etcd_urls)

    def pid_of(name: str) -> int | None:
        p = procs_by_name.get(name)
        return p.pid if p and procs.is_alive(p.pid, p.marker) else None

    regions: dict[str, Any] = {}
    for r in state.regions:
        nodes = []
        for e in state.pg_nodes:
            if e.region != r:
                continue
            role = e.role
            if topo is not None and e.shard in topo.shards:
                role = "primary" if topo.shards[e.shard].primary.name == e.node else "standby"
            alive = e.pid is not None and procs.is_alive(e.pid, str(e.datadir))
            app_dsn = postgres.dsn(
                HOST, e.port, postgres.APP_ROLE, pw["app_password"], postgres.DB_NAME
            )
            nodes.append(
                {
                    "shard": e.shard,
                    "node": e.node,
                    "role": role,
                    "dsn": postgres.redact(app_dsn),
                    "pid": e.pid if alive else None,
                }
            )
        rp = ports[r]
        regions[r] = {
            "router": f"http://{HOST}:{rp['router']}",
            # GET /metrics (the admin listener); absent for clusters started before it existed.
            "router_admin": (
                f"http://{HOST}:{rp['router_admin']}" if "router_admin" in rp else None
            ),
            "router_pid": pid_of(routers.proc_name(r, 0)),
            "router_pids": [
                pid
                for p in all_procs
                if p.kind == "router" and p.region == r
                if (pid := pid_of(p.name)) is not None
            ],
            "relays_pid": pid_of(relays.proc_name(r)),
            "controller_pid": pid_of(controllers.proc_name(r)),
            # The relay process's /metrics (change feed lag per target region, resets, ...);
            # absent for a cluster started before it existed.
            "relays_metrics": (
                f"http://{HOST}:{rp['relay_metrics']}/metrics" if "relay_metrics" in rp else None
            ),
            "redis": f"redis://{HOST}:{rp['redis']}",
            "redis_pid": pid_of(redis_server.proc_name(r)),
            "etcd": state.etcd_url(r),
            "etcd_pid": pid_of(etcd_server.proc_name(r)),
            "nats": f"nats://{HOST}:{rp['nats_client']}" if "nats_client" in rp else None,
            "nats_pid": pid_of(nats.proc_name(r)),
            "nodes": nodes,
        }
    shards: dict[str, Any] = {}
    for name, s in state.shard_records.items():
        entry: dict[str, Any] = {
            "home_region": s.home_region,
            "primary_region": s.primary_region,
            "epoch": s.epoch,
        }
        if topo is not None and name in topo.shards:
            live = topo.shards[name]
            entry.update(primary_region=live.primary.region, epoch=live.epoch)
        shards[name] = entry
    return {
        "dir": state.dir,
        "status": state.status,
        "started_at": state.started_at,
        "start_seconds": state.start_seconds,
        "wan": {
            "profile": state.wan_profile,
            "control": state.wan_control_or_none,
            "latency_ms": state.wan_latency_ms,
            "pid": pid_of("wan"),
        },
        "topology_source": "etcd" if topo is not None else STATE_FILE,
        "regions": regions,
        "shards": shards,
    }


def primary_admin_dsns(cluster_dir: Path) -> dict[str, str]:
    """Shard -> admin DSN (database txr) of its *current* primary: etcd first, else the state.

    Operator commands (reconcile, failover) must act on the primary etcd names, not on the one
    the cluster started with.
    """
    state = load_state(cluster_dir)
    pw = credentials.pg_passwords(cluster_dir)
    topo = layout.live_topology(state.etcd_urls)

    def admin(host: str, port: int) -> str:
        return postgres.dsn(host, port, postgres.ADMIN_ROLE, pw["admin_password"], postgres.DB_NAME)

    if topo is not None:
        return {name: admin(s.primary.host, s.primary.port) for name, s in topo.shards.items()}
    return {e.shard: admin(HOST, e.port) for e in state.pg_nodes if e.role == "primary"}
