"""The local cluster's etcd: one member per region, raft across the WAN emulator.

What this module owns: each member's command line (its timing from the emulated latency), its
start and the readiness check. The launcher (``infra.local.cluster``) calls ``spawn`` early and
``wait_ready`` once the slow steps are done, and records the processes (kind ``etcd``) so
``txr local down`` stops them.

Peers dial each member through its WAN front (``PortPlan.etcd_peer_front``), so raft pays the
emulated latency and obeys its partitions; clients use the member's own port on loopback.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infra.local import procs
from infra.local.children import Children
from infra.local.ports import PortPlan

HOST: Final = "127.0.0.1"
# A member is ready after an election: 2 s timeout under --wan realistic, plus a pre-vote round.
ETCD_READY_TIMEOUT_S: Final = 60.0
# etcd timing (its tuning guide): heartbeat about the largest member RTT, election about ten
# heartbeats. The floor is 200 ms (election 2 s), not etcd's 100 ms default: it is what
# --wan realistic already runs with (its largest RTT is 190 ms), so every failover and chaos
# test of that profile proves the floor, and each heartbeat is a message plus its answer through
# the WAN emulator per follower: at 100 ms they were a fifth of an idle cluster's CPU (etcd and
# WAN together). It bounds only how fast etcd replaces a dead *leader* (one election timeout),
# which the routers ride out on their last map; a lost shard primary is unaffected. The
# minimum lease TTL etcd grants is 1.5 election timeouts (3 s): VERDICT_LEASE_TTL_S meets it.
ETCD_HEARTBEAT_MS_MIN: Final = 200
ETCD_HEARTBEAT_STEP_MS: Final = 50
ETCD_ELECTION_FACTOR: Final = 10


def proc_name(region: str) -> str:
    return f"etcd-{region}"


def timing_ms(latency_ms: dict[tuple[str, str], float]) -> tuple[int, int]:
    """(heartbeat, election timeout) in ms for the largest round trip between members."""
    rtt = 2 * max(latency_ms.values(), default=0.0)
    step = ETCD_HEARTBEAT_STEP_MS
    heartbeat = max(ETCD_HEARTBEAT_MS_MIN, math.ceil(rtt / step) * step)
    return heartbeat, heartbeat * ETCD_ELECTION_FACTOR


def healthy(body: bytes) -> bool:
    """A member's /health answer says it is part of a healthy cluster."""
    try:
        return bool(json.loads(body).get("health") == "true")
    except ValueError:
        return False


def health_ok(port: int) -> bool:
    return procs.http_ok(f"http://{HOST}:{port}/health", healthy)


def spawn(
    plan: PortPlan,
    cluster_dir: Path,
    children: Children,
    *,
    regions: Sequence[str],
    heartbeat_ms: int,
    election_ms: int,
) -> None:
    """Start every region's member of a new cluster; ``wait_ready`` then waits for them."""
    initial = ",".join(f"{r}=http://{HOST}:{plan.etcd_peer_front[r]}" for r in regions)
    token = f"txr-{plan.base}-{secrets.token_hex(4)}"
    for r in regions:
        ports = plan.region[r]
        data_dir = cluster_dir / "etcd" / r
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("etcd") or "etcd",
            "--name",
            r,
            "--data-dir",
            str(data_dir),
            "--listen-client-urls",
            f"http://{HOST}:{ports.etcd_client}",
            "--advertise-client-urls",
            f"http://{HOST}:{ports.etcd_client}",
            "--listen-peer-urls",
            f"http://{HOST}:{ports.etcd_peer}",
            # Peers dial this member through its WAN front, so raft crosses the WAN.
            "--initial-advertise-peer-urls",
            f"http://{HOST}:{plan.etcd_peer_front[r]}",
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            token,
            "--heartbeat-interval",
            str(heartbeat_ms),
            "--election-timeout",
            str(election_ms),
            # A member cut off by a partition must not disrupt the majority when it returns.
            "--pre-vote=true",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        children.spawn(proc_name(r), "etcd", r, argv, str(data_dir))


def wait_ready(plan: PortPlan, children: Children, *, regions: Sequence[str]) -> None:
    """Wait until every member reports a healthy cluster (an elected leader)."""
    for r in regions:
        check = functools.partial(health_ok, plan.region[r].etcd_client)
        children.wait_ready(f"etcd {r}", check, ETCD_READY_TIMEOUT_S, of=[proc_name(r)])
