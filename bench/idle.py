"""The idle figure (issue 12): CPU cores a three-region local cluster spends doing nothing.

Every process of the cluster counts with its children (a PostgreSQL server is its postmaster and
every backend, walsender and background worker), read from /proc before and after a window in
which nobody sends a request; the goal is at most ``IDLE_CORES_GOAL`` in total. Components:
``etcd``, ``wan`` (the emulator), ``relays`` (change feed, outbox, events publisher),
``controllers`` (failover), ``routers``, ``pg_primaries``, ``pg_standbys``, ``redis``, ``nats``.
``txr bench`` measures it first (right after the cluster is up, before any load); ``txr bench
--idle`` measures only it, several windows in a row, and reports min/median/max per component.
CPU time is the figure to compare on a shared machine (the load average is reported beside it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from bench import cpu
from infra.local import cluster

# The goal: an idle three-region cluster, every process included, within a tenth of a core.
IDLE_CORES_GOAL: Final = 0.10
# After `up` returns: the routers' topology confirmations stop 10 s after the last read
# (consistency.limits.TOPOLOGY_CONFIRM_IDLE_S) and start-up work (slot creation, the first
# checkpoint, JetStream's stream set-up) settles; measuring earlier counts start-up, not idle.
SETTLE_S: Final = 15.0
# One window: a minute, so that once-a-minute work (autovacuum's naptime, the relays' retention
# prune) is counted about once, not zero or twice.
WINDOW_S: Final = 60.0
COMPONENTS: Final = (
    "etcd",
    "wan",
    "relays",
    "controllers",
    "routers",
    "pg_primaries",
    "pg_standbys",
    "redis",
    "nats",
)


def groups(status: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Root pids per component, from ``txr local status --json``."""
    roots: dict[str, list[int]] = {c: [] for c in COMPONENTS}
    for s in status["regions"].values():
        roots["routers"] += [int(p) for p in s.get("router_pids") or [] if p]
        for comp, key in (
            ("relays", "relays_pid"),
            ("controllers", "controller_pid"),
            ("redis", "redis_pid"),
            ("etcd", "etcd_pid"),
            ("nats", "nats_pid"),
        ):
            if s.get(key):
                roots[comp].append(int(s[key]))
        for n in s.get("nodes", []):
            if n.get("pid"):
                comp = "pg_primaries" if n["role"] == "primary" else "pg_standbys"
                roots[comp].append(int(n["pid"]))
    wan = (status.get("wan") or {}).get("pid")
    if wan:
        roots["wan"].append(int(wan))
    return {k: tuple(v) for k, v in roots.items()}


def _snapshot(g: Mapping[str, tuple[int, ...]]) -> dict[str, dict[int, float]]:
    kids = cpu.children()
    return {comp: {p: cpu.cpu_s(p) for p in cpu.tree(roots, kids)} for comp, roots in g.items()}


def measure(
    status: Mapping[str, Any],
    duration_s: float = WINDOW_S,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Cores per component over one window of ``duration_s`` (processes that appear during
    the window count from zero), their total, and whether the total meets the goal."""
    g = groups(status)
    before = _snapshot(g)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    sleep(duration_s)
    elapsed = time.monotonic() - t0
    after = _snapshot(g)
    cores: dict[str, float] = {}
    for comp in COMPONENTS:
        spent = sum(t - before[comp].get(p, 0.0) for p, t in after[comp].items())
        cores[comp] = max(spent, 0.0) / elapsed
    total = sum(cores.values())
    return {
        "duration_s": round(elapsed, 2),
        "cores": {k: round(v, 4) for k, v in cores.items()},
        "cores_total": round(total, 4),
        "goal_cores": IDLE_CORES_GOAL,
        "ok": total <= IDLE_CORES_GOAL,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }


def spread(windows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """min/median/max of every component's cores (and the total) over several windows."""
    keys = [*COMPONENTS, "total"]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        xs = [w["cores_total"] if k == "total" else w["cores"][k] for w in windows]
        out[k] = {
            "min": round(min(xs), 4),
            "median": round(statistics.median(xs), 4),
            "max": round(max(xs), 4),
        }
    return out


def run(
    *,
    base_port: int,
    windows: int,
    duration_s: float = WINDOW_S,
    settle_s: float = SETTLE_S,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """`txr bench --idle`: a private cluster (--wan none), ``windows`` windows, torn down."""
    tmp = Path(tempfile.mkdtemp(prefix="txr-idle-"))
    cluster_dir = tmp / "cluster"
    try:
        progress(f"starting a local cluster in {cluster_dir} (base port {base_port}, WAN none)")
        cluster.up(
            cluster.UpOptions(dir=cluster_dir, base_port=base_port, wan="none"), progress=progress
        )
        status = cluster.status(cluster_dir)
        progress(f"settling {settle_s:g} s")
        time.sleep(settle_s)
        got = []
        for i in range(windows):
            progress(f"idle window {i + 1}/{windows}: {duration_s:g} s")
            got.append(measure(status, duration_s))
    finally:
        stop_and_purge(cluster_dir, tmp, progress)
    sp = spread(got)
    return {
        "wan": "none",
        "windows": got,
        "spread": sp,
        "goal_cores": IDLE_CORES_GOAL,
        "ok": sp["total"]["median"] <= IDLE_CORES_GOAL,
        "cpus": os.cpu_count(),
    }


def stop_and_purge(cluster_dir: Path, tmp: Path, progress: Callable[[str], None]) -> None:
    """A bench's private cluster gone, with its temp directory, even when stopping fails
    (bench.suite ends the same way)."""
    progress("stopping and purging the cluster")
    try:
        cluster.down(cluster_dir, progress=progress)
    finally:
        cluster.purge(cluster_dir)
        shutil.rmtree(tmp, ignore_errors=True)


def summary(rep: Mapping[str, Any]) -> str:
    sp = rep["spread"]
    lines = [
        f"idle three-region cluster, WAN none, {len(rep['windows'])} windows of "
        f"{rep['windows'][0]['duration_s']:.0f} s (goal: at most {rep['goal_cores']:g} cores "
        f"in total): {'ok' if rep['ok'] else 'MISSED'}",
        f"  {'component':14s} {'min':>8s} {'median':>8s} {'max':>8s}  cores",
        *(
            f"  {k:14s} {v['min']:8.4f} {v['median']:8.4f} {v['max']:8.4f}"
            for k, v in sorted(sp.items(), key=lambda kv: -kv[1]["median"])
        ),
        "load average per window (before, after): "
        + ", ".join(
            f"{w['load_average']['before'][0]:.1f}/{w['load_average']['after'][0]:.1f}"
            for w in rep["windows"]
        )
        + f" ({rep['cpus']} CPUs)",
    ]
    return "\n".join(lines)


def summary_line(window: Mapping[str, Any]) -> str:
    """One window, for the full bench's report."""
    parts = ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(window["cores"].items(), key=lambda kv: -kv[1])
    )
    return (
        f"idle cluster          {window['cores_total']:10.3f} cores  (goal <= "
        f"{window['goal_cores']:g}: {'ok' if window['ok'] else 'MISSED'}; "
        f"{window['duration_s']:.0f} s before any load: {parts})"
    )
