"""The local cluster's NATS: one JetStream server per region, clustered across the WAN emulator.

What this module owns: each server's configuration file, its start, the readiness check (every
route up, a JetStream meta leader elected) and the creation of the event stream and buckets
(``router.events.stream.ensure``: the same idempotent call the publisher makes). The launcher
(``infra.local.cluster``) calls ``spawn`` early, ``wait_ready`` once PostgreSQL is up, and
records the processes like its others (kind ``nats``), so ``txr local down`` stops them and
waits for their exit.

Ports come from the cluster's plan (``infra.local.ports``: client, route, monitor per region);
data sits under ``<dir>/nats/<region>``. Each server's routes name the WAN emulator's listener
for (this region, the other region, ``nats-route``), never the other server's own port, so
replication and the meta group's heartbeats pay the emulated latency and obey its partitions.
The system NATS that may listen on 4222 is never used: every port here is inside the plan.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infra.local import procs
from infra.local.children import Children
from infra.local.ports import PortPlan

HOST: Final = "127.0.0.1"
CLUSTER_NAME: Final = "txr"
# Routes and a meta leader across the WAN: a few election rounds at the largest RTT.
NATS_READY_TIMEOUT_S: Final = 60.0
# JetStream's own limits on this machine: the events stream is bounded itself
# (router.events.stream), these only keep a runaway from filling the disk or memory.
JS_MAX_MEMORY: Final = 64 << 20
JS_MAX_FILE: Final = 2 << 30
# The event stream's bootstrap call (the first R3 stream creation waits for a meta leader).
BOOTSTRAP_TIMEOUT_S: Final = 60.0


def proc_name(region: str) -> str:
    return f"nats-{region}"


def client_url(plan: PortPlan, region: str) -> str:
    return f"nats://{HOST}:{plan.region[region].nats_client}"


def config_text(plan: PortPlan, region: str, data_dir: Path) -> str:
    """The server's configuration (NATS's own format; JSON is a subset it accepts)."""
    ports = plan.region[region]
    routes = [
        f"nats-route://{HOST}:{plan.wan[(region, other, 'nats-route')]}"
        for other in plan.regions
        if other != region
    ]
    conf = {
        "server_name": region,
        "listen": f"{HOST}:{ports.nats_client}",
        "http": f"{HOST}:{ports.nats_monitor}",
        "jetstream": {
            "store_dir": str(data_dir),
            "max_memory_store": JS_MAX_MEMORY,
            "max_file_store": JS_MAX_FILE,
        },
        "cluster": {
            "name": CLUSTER_NAME,
            "listen": f"{HOST}:{ports.nats_route}",
            "routes": routes,
            # Clients of this cluster dial their own region's server only (the launcher gives
            # them one URL); gossiping the others' client ports would bypass the WAN.
            "no_advertise": True,
        },
    }
    return json.dumps(conf, indent=2)


def _monitor(plan: PortPlan, region: str, path: str) -> dict[str, object] | None:
    body = procs.http_get(f"http://{HOST}:{plan.region[region].nats_monitor}{path}")
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def ready(plan: PortPlan, region: str) -> bool:
    """Routes to every other server up and JetStream answering with a meta leader."""
    routez = _monitor(plan, region, "/routez")
    if routez is None or int(str(routez.get("num_routes", 0))) < len(plan.regions) - 1:
        return False
    jsz = _monitor(plan, region, "/jsz")
    if jsz is None:
        return False
    meta = jsz.get("meta_cluster")
    return isinstance(meta, dict) and bool(meta.get("leader"))


def spawn(plan: PortPlan, cluster_dir: Path, children: Children, *, regions: Sequence[str]) -> None:
    """Start every region's server; ``wait_ready`` then waits for the cluster."""
    binary = shutil.which("nats-server") or "nats-server"
    for r in regions:
        data_dir = cluster_dir / "nats" / r
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = cluster_dir / "run" / f"nats-{r}.conf"
        conf.write_text(config_text(plan, r, data_dir))
        children.spawn(proc_name(r), "nats", r, [binary, "--config", str(conf)], str(conf))


def wait_ready(plan: PortPlan, children: Children, *, regions: Sequence[str]) -> dict[str, str]:
    """Wait until the spawned servers form a cluster with a JetStream leader, then create the
    stream and buckets. Returns region -> client URL."""
    for r in regions:
        check = functools.partial(ready, plan, r)
        children.wait_ready(f"nats {r}", check, NATS_READY_TIMEOUT_S, of=[proc_name(r)])
    urls = {r: client_url(plan, r) for r in regions}
    asyncio.run(_bootstrap(urls[regions[0]], len(regions)))
    return urls


async def _bootstrap(url: str, replicas: int) -> None:
    # Imported here: the launcher's other paths (status, down) need no NATS client.
    from router.events import stream

    async with asyncio.timeout(BOOTSTRAP_TIMEOUT_S):
        while True:
            try:
                nc = await stream.connect([url], name="txr-bootstrap")
                try:
                    await stream.ensure(nc.jetstream(), replicas=replicas)
                finally:
                    await nc.close()
                return
            except stream.StreamUnavailable:
                await asyncio.sleep(0.5)
