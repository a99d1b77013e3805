"""The local cluster's Redis: one cache server per region.

What this module owns: each server's command line (a cache: nothing persisted), its start and
the readiness check. The launcher (``infra.local.cluster``) calls ``spawn`` early and
``wait_ready`` later, and records the processes (kind ``redis``) so ``txr local down`` stops
them. Routers of other regions never talk to it; the change feed reaches it through the WAN
emulator (``infra.local.ports``).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infra.local import procs
from infra.local.children import Children
from infra.local.ports import PortPlan

HOST: Final = "127.0.0.1"
# Redis binds at once; this only covers a slow exec on a loaded machine.
REDIS_READY_TIMEOUT_S: Final = 15.0
# Redis's server cron rate (see argv).
REDIS_HZ: Final = 1


def proc_name(region: str) -> str:
    return f"redis-{region}"


def argv(port: int, data_dir: Path) -> list[str]:
    """The command line of one server (the test fixture's too: tests/fixtures/redis.py)."""
    return [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        # A cache: nothing to persist, and a save must never stall the event loop.
        "--save",
        "",
        "--appendonly",
        "no",
        # Background tasks (active expiry, client timeouts, stats) this many times a second
        # instead of 10: an idle Redis then sleeps. Expiry stays exact (a key past its TTL is
        # never returned: lazy expiry on access); only the reclaiming of expired tombstones and
        # entries nobody reads again is slower, which costs memory, not correctness. No client
        # here uses blocking commands or idle timeouts, the two other things the cron paces.
        "--hz",
        str(REDIS_HZ),
        "--dynamic-hz",
        "no",
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


def spawn(plan: PortPlan, cluster_dir: Path, children: Children, *, regions: Sequence[str]) -> None:
    """Start every region's server; ``wait_ready`` then waits for them."""
    for r in regions:
        port = plan.region[r].redis
        data_dir = cluster_dir / "redis" / r
        data_dir.mkdir(parents=True, exist_ok=True)
        # redis-server rewrites its process title to "redis-server 127.0.0.1:PORT".
        children.spawn(proc_name(r), "redis", r, argv(port, data_dir), f"{HOST}:{port}")


def wait_ready(plan: PortPlan, children: Children, *, regions: Sequence[str]) -> None:
    """Wait until every server accepts connections."""
    for r in regions:
        check = functools.partial(procs.port_open, plan.region[r].redis)
        children.wait_ready(f"redis {r}", check, REDIS_READY_TIMEOUT_S, of=[proc_name(r)])
