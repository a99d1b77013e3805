"""``txr local up|status|down``: a cluster on this machine (``infra.local.cluster``)."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from infra.cli.common import EXIT_FAILED, EXIT_OK, Subparsers, add_dir, err, progress
from infra.local import cluster, procs


class _Stop(Exception):
    """SIGTERM or SIGINT reached the foreground launcher."""


def _regions(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("at least one region")
    return names


def _print_endpoints(state: dict[str, Any], cluster_dir: Path) -> None:
    desc = cluster.status(cluster_dir)
    print(
        f"txr local cluster up in {state.get('start_seconds')} s "
        f"(started {state.get('started_at')}, WAN {state.get('wan')})"
    )
    for region, r in desc["regions"].items():
        print(f"  {region:10s} router {r['router']}  redis {r['redis']}  etcd {r['etcd']}")
    print(f"  WAN control {desc['wan']['control']}")
    print(f"  logs        {cluster_dir.resolve() / 'logs'}")
    if state.get("routers_started"):
        tok = cluster.dev_token(cluster_dir)
        first = next(iter(desc["regions"].values()))["router"]
        print(f"\ndev token (tenant dev, every tenant scope, no admin, 24 h):\n{tok}\n")
        print(f"an operator (admin) token: .venv/bin/txr token --admin --dir {cluster_dir}")
        print("try:")
        print(
            f"  curl -s -X POST {first}/v1/accounts -H 'Authorization: Bearer {tok}' "
            "-H 'Content-Type: application/json' -d '{\"currency\": \"EUR\"}'"
        )


def _cmd_local_up(args: argparse.Namespace) -> int:
    opts = cluster.UpOptions(
        dir=args.dir,
        base_port=args.base_port,
        regions=args.regions,
        wan=args.wan,
        workers=args.workers,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    # SIGTERM during start-up behaves like Ctrl-C: stop what was started, then exit.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = cluster.up(opts, progress=progress)
    except cluster.ClusterError as exc:
        err(f"local up failed: {exc}")
        return EXIT_FAILED
    except _Stop as exc:
        err(f"interrupted by {exc} during start-up; stopped what was started")
        return EXIT_FAILED
    _print_endpoints(state, args.dir)
    if args.detach:
        return EXIT_OK
    print("running in the foreground; Ctrl-C stops the cluster", flush=True)
    reported: set[int] = set()
    try:
        while True:
            time.sleep(cluster.MONITOR_INTERVAL_S)
            for name, pid in _dead_children(args.dir):
                if pid not in reported:
                    reported.add(pid)
                    err(f"{name} (pid {pid}) exited; see {args.dir.resolve() / 'logs'}")
    except _Stop as exc:
        progress(f"{exc}: stopping the cluster")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        cluster.down(args.dir, progress=progress)
    except cluster.ClusterError as exc:
        err(f"local down failed: {exc}")
        return EXIT_FAILED
    return EXIT_OK


def _dead_children(cluster_dir: Path) -> list[tuple[str, int]]:
    state = cluster.load_state(cluster_dir)
    dead = [(p.name, p.pid) for p in state.procs if not procs.is_alive(p.pid, p.marker)]
    dead += [
        (f"postgres {e.node}", e.pid)
        for e in state.pg_nodes
        if e.pid is not None and not procs.is_alive(e.pid, str(e.datadir))
    ]
    return dead


def _cmd_local_status(args: argparse.Namespace) -> int:
    try:
        desc = cluster.status(args.dir)
    except cluster.ClusterError as exc:
        err(str(exc))
        return EXIT_FAILED
    if args.json:
        print(json.dumps(desc, indent=2))
        return EXIT_OK
    print(
        f"cluster {desc['dir']}: {desc['status']} (started {desc['started_at']}, "
        f"WAN {desc['wan']['profile']}, topology from {desc['topology_source']})"
    )
    for region, r in desc["regions"].items():
        print(f"\n{region}")
        print(f"  router {r['router']:28s} pid {r['router_pid']}")
        print(f"  relays {'':28s} pid {r.get('relays_pid')}")
        print(f"  failover controller {'':15s} pid {r.get('controller_pid')}")
        print(f"  redis  {r['redis']:28s} pid {r['redis_pid']}")
        print(f"  etcd   {r['etcd']:28s} pid {r['etcd_pid']}")
        for n in r["nodes"]:
            print(f"  pg     {n['shard']:12s} {n['role']:8s} {n['dsn']}  pid {n['pid']}")
    print("\nshard        home       primary    epoch")
    for name, s in desc["shards"].items():
        print(f"{name:12s} {s['home_region']:10s} {s['primary_region']:10s} {s['epoch']}")
    return EXIT_OK


def _cmd_local_down(args: argparse.Namespace) -> int:
    try:
        found = cluster.down(args.dir, progress=progress)
    except cluster.ClusterError as exc:
        err(f"local down failed: {exc}")
        return EXIT_FAILED
    if not found:
        progress(f"no cluster state in {args.dir.resolve()}; nothing to stop")
    return EXIT_OK


def register(sub: Subparsers) -> None:
    """``txr local``."""
    local = sub.add_parser("local", help="a cluster on this machine")
    local_sub = local.add_subparsers(dest="local_command", required=True, metavar="ACTION")

    p = local_sub.add_parser("up", help="start a local cluster")
    add_dir(p)
    p.add_argument("--base-port", type=int, default=cluster.DEFAULT_BASE_PORT)
    p.add_argument("--regions", type=_regions, default=cluster.DEFAULT_REGIONS)
    p.add_argument("--wan", choices=("none", "realistic"), default="none")
    p.add_argument("--detach", action="store_true", help="return once every router is ready")
    p.add_argument(
        "--workers", type=int, default=None, help="router processes per region (SO_REUSEPORT)"
    )
    p.set_defaults(handler=_cmd_local_up)

    p = local_sub.add_parser("status", help="describe a local cluster")
    add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_local_status)

    p = local_sub.add_parser("down", help="stop every process of a local cluster")
    add_dir(p)
    p.set_defaults(handler=_cmd_local_down)
