"""Fault handles on a running local cluster: signal, kill, pause and restart its processes.

The chaos nemeses (chaos/nemesis.py) and operators' drills use these; nothing here decides what
to break, only how. Every process the launcher started is recorded in ``cluster.json`` with its
argv, so any of them can be killed and started again alone. PostgreSQL servers are not restarted
here: a lost primary comes back through ``txr failover`` and ``txr rejoin`` (infra/failover.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Final

from infra.local import etcd_server, postgres, procs, redis_server, routers, wan_emulator
from infra.local.state import Proc, State, load_state

# Readiness after a restart, the start's own bounds where the check is the same: a router
# reloads its topology and reconnects its pools, an etcd member rejoins the raft group; Redis
# binds at once. Relays and controllers: alive is ready (see _ready_probe).
RESTART_READY_TIMEOUT_S: Final = {
    "router": routers.ROUTER_READY_TIMEOUT_S,
    "relays": 30.0,
    "etcd": etcd_server.ETCD_READY_TIMEOUT_S,
    "redis": redis_server.REDIS_READY_TIMEOUT_S,
    "wan": wan_emulator.WAN_READY_TIMEOUT_S,
    "controller": 15.0,
}
KILL_WAIT_S: Final = 10.0


class ControlError(RuntimeError):
    """The process to act on is not in the cluster, or did not do what was asked."""


def procs_of(cluster_dir: Path, kind: str, region: str | None = None) -> list[Proc]:
    """The recorded processes of ``kind`` (in ``region`` when given), in launch order."""
    state = load_state(cluster_dir)
    return [p for p in state.procs if p.kind == kind and (region is None or p.region == region)]


def kill(cluster_dir: Path, kind: str, region: str | None) -> list[str]:
    """SIGKILL every process of ``kind`` in ``region``; wait until they are gone. Returns names."""
    found = procs_of(cluster_dir, kind, region)
    if not found:
        raise ControlError(f"no {kind} process recorded for region {region}")
    return _kill_entries(found)


def kill_named(cluster_dir: Path, name: str) -> None:
    """SIGKILL the recorded process ``name`` alone (one router worker, say) and wait for it."""
    found = load_state(cluster_dir).proc(name)
    if found is None:
        raise ControlError(f"no process named {name} in {cluster_dir}")
    _kill_entries([found])


def _kill_entries(found: list[Proc]) -> list[str]:
    for p in found:
        if procs.is_alive(p.pid, p.marker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in found:
        if not procs.wait_gone(p.pid, KILL_WAIT_S, p.marker):
            raise ControlError(f"{p.name} (pid {p.pid}) survived SIGKILL")
    return [p.name for p in found]


def _ready_probe(state: State, entry: Proc) -> Callable[[], bool]:
    ports = state.region_ports(entry.region) if entry.region else {}
    kind = entry.kind
    if kind == "router":
        return functools.partial(routers.ready, int(ports["router"]))
    if kind == "etcd":
        return functools.partial(etcd_server.health_ok, int(ports["etcd_client"]))
    if kind == "redis":
        return functools.partial(procs.port_open, int(ports["redis"]))
    if kind == "nats":
        return functools.partial(procs.port_open, int(ports["nats_client"]))
    # Relays, controllers and the WAN emulator: alive is ready (they retry their own connections).
    return lambda: True


def restart(cluster_dir: Path, name: str) -> int:
    """Start the recorded process ``name`` again from its argv (it must not be running) and wait
    until it is ready; the state file gets the new pid. Returns the pid."""
    state = load_state(cluster_dir)
    entry = state.proc(name)
    if entry is None:
        raise ControlError(f"no process named {name} in {cluster_dir}")
    if procs.is_alive(entry.pid, entry.marker):
        raise ControlError(f"{name} is still running (pid {entry.pid})")
    if not entry.argv:
        raise ControlError(f"{name} was recorded without its argv; restart the cluster")
    env = procs.python_env() if entry.python_env else None
    p = procs.spawn(list(entry.argv), entry.log, env=env, cwd=cluster_dir.resolve())
    state.set_proc_pid(name, p.pid)
    procs.wait_until(
        f"{name} after restart",
        _ready_probe(state, entry),
        RESTART_READY_TIMEOUT_S.get(entry.kind, 30.0),
        alive=lambda: p.poll() is None,
        log_path=entry.log,
    )
    return p.pid


def _running_pid(cluster_dir: Path, node: str) -> int:
    entry = load_state(cluster_dir).pg_node(node)
    if entry is None or entry.pid is None:
        raise ControlError(f"no running PostgreSQL node {node} recorded")
    return entry.pid


def _pg_tree(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, walsender, checkpointer...)."""
    return [postmaster, *procs.children_of(postmaster)]


def pg_tree(cluster_dir: Path, node: str) -> list[int]:
    """The pids of a running PostgreSQL node's server: the postmaster and its children."""
    return _pg_tree(_running_pid(cluster_dir, node))


def send(pids: list[int], sig: signal.Signals) -> None:
    """``sig`` to each of ``pids`` (gone ones skipped): with :func:`pg_tree` taken once, a
    pause's SIGSTOP and SIGCONT cost no /proc scan, so the pause lasts what the caller meant."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def pg_signal(cluster_dir: Path, node: str, sig: signal.Signals) -> list[int]:
    """Send ``sig`` to a PostgreSQL server and every process it forked: SIGSTOP freezes the
    whole server (a postmaster alone stopped would leave its backends answering), SIGKILL is a
    crash. Returns the pids signalled."""
    pids = _pg_tree(_running_pid(cluster_dir, node))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def kill_region(cluster_dir: Path, region: str) -> tuple[list[str], list[str]]:
    """kill -9 every process of ``region``: its recorded processes (etcd, Redis, routers,
    relays, controller) and every PostgreSQL server there with all its children, as a region
    lost at once. Returns (process names, PostgreSQL nodes)."""
    state = load_state(cluster_dir)
    found = [p for p in state.procs if p.region == region]
    running = [
        e
        for e in state.pg_nodes
        if e.region == region and e.pid is not None and procs.is_alive(e.pid, str(e.datadir))
    ]
    nodes = [e.node for e in running]
    # The servers and the processes in one sweep, so nothing of the region outlives the rest.
    pids = [pid for e in running if e.pid is not None for pid in _pg_tree(e.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    names = _kill_entries(found)
    if procs.wait_all_gone(pids, KILL_WAIT_S):
        raise ControlError(f"PostgreSQL processes of {region} survived SIGKILL")
    return names, nodes


def restart_pg(cluster_dir: Path, node: str) -> int:
    """Start a stopped or crashed PostgreSQL node again as it was (a standby stays a standby
    of the primary it streamed from); the state file gets the new pid."""
    state = load_state(cluster_dir)
    entry = state.pg_node(node)
    if entry is None:
        raise ControlError(f"no PostgreSQL node {node} recorded")
    with contextlib.suppress(postgres.PostgresError):
        # A crash leaves postmaster.pid behind; stop() knows it and returns.
        postgres.stop(entry.datadir, "immediate")
    pid = postgres.start(entry.datadir, entry.log)
    state.set_pg_pid(node, pid)
    return pid


def pg_alive(cluster_dir: Path, node: str) -> bool:
    entry = load_state(cluster_dir).pg_node(node)
    return bool(entry and entry.pid and procs.is_alive(entry.pid, str(entry.datadir)))
