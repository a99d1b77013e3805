"""The local cluster's relay processes: one ``python -m router.relays`` per region.

What this module owns: each region's relay command line (it reads its region's router config),
its start and the readiness check: the region's Redis holds the relay's heartbeat for every
shard, so it attached a logical slot on every primary (one WAN round trip each) and finished a
round. The launcher (``infra.local.cluster``) starts them beside the routers and records the
processes (kind ``relays``) so ``txr local down`` stops them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import redis

from consistency import coherence
from infra.local.children import Children
from infra.local.ports import PortPlan
from router.redisconn import REDIS_ERRORS

HOST: Final = "127.0.0.1"
RELAYS_READY_TIMEOUT_S: Final = 60.0
# One read of the heartbeats from a loopback Redis.
PROBE_TIMEOUT_S: Final = 2.0


def proc_name(region: str) -> str:
    return f"relays-{region}"


def heartbeats(redis_url: str, shards: Sequence[str]) -> bool:
    """True when the region's Redis holds a relay heartbeat with a claim for every shard."""
    client = redis.Redis.from_url(redis_url, socket_timeout=PROBE_TIMEOUT_S)
    try:
        return all(client.hget(coherence.heartbeat_key(s), "through") for s in shards)
    except REDIS_ERRORS:
        return False
    finally:
        client.close()


def spawn(children: Children, configs: dict[str, Path]) -> None:
    """Start one relay process per region (region -> its router config file)."""
    for r, cfg in configs.items():
        argv = [sys.executable, "-m", "router.relays", "--config", str(cfg)]
        children.spawn(proc_name(r), "relays", r, argv, " ".join(argv[2:]), python=True)


def wait_ready(
    plan: PortPlan, children: Children, *, regions: Sequence[str], shards: Sequence[str]
) -> None:
    """Wait until every region's relay published a heartbeat for every shard."""
    for r in regions:
        url = f"redis://{HOST}:{plan.region[r].redis}/0"
        check = functools.partial(heartbeats, url, shards)
        children.wait_ready(
            f"relays {r} heartbeats", check, RELAYS_READY_TIMEOUT_S, of=[proc_name(r)]
        )
