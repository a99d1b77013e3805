"""The local cluster's WAN emulator process (``python -m infra.wan``), started first.

What this module owns: the emulator's configuration for a cluster (one etcd peer front per
member, one listener per (source region, remote service), the profile's latencies), its start
and the readiness check (its control endpoint answers). The emulator itself is ``infra.wan``;
the launcher (``infra.local.cluster``) calls ``start`` before anything that crosses a region,
and records the process (kind ``wan``) so ``txr local down`` stops it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from infra.local import procs
from infra.local.children import Children
from infra.local.ports import PortPlan
from infra.wan import ListenerSpec, WanConfig

HOST: Final = "127.0.0.1"
PROC_NAME: Final = "wan"
# The emulator binds every listener at start-up; this only covers a slow exec on a loaded
# machine.
WAN_READY_TIMEOUT_S: Final = 15.0


def config(plan: PortPlan, latency_ms: Mapping[tuple[str, str], float]) -> WanConfig:
    listeners: list[ListenerSpec] = []
    peer_urls: dict[str, str] = {}
    for region, front in plan.etcd_peer_front.items():
        listeners.append(
            ListenerSpec(front, region, HOST, plan.region[region].etcd_peer, None, "etcd-peer")
        )
        peer_urls[f"http://{HOST}:{front}"] = region
    for (src, dst, svc), port in plan.wan.items():
        listeners.append(ListenerSpec(port, dst, HOST, plan.region[dst].service(svc), src, svc))
    return WanConfig(HOST, plan.wan_control, dict(latency_ms), tuple(listeners), peer_urls)


def control_url(plan: PortPlan) -> str:
    return f"http://{HOST}:{plan.wan_control}"


def start(
    plan: PortPlan,
    latency_ms: Mapping[tuple[str, str], float],
    run_dir: Path,
    children: Children,
) -> str:
    """Write the configuration, start the emulator and wait until it answers. Returns its
    control URL."""
    path = run_dir / "wan.json"
    config(plan, latency_ms).save(path)
    argv = [sys.executable, "-m", "infra.wan", "--config", str(path)]
    children.spawn(PROC_NAME, "wan", None, argv, str(path), python=True)
    url = control_url(plan)
    check = functools.partial(procs.http_ok, f"{url}/links")
    children.wait_ready("WAN emulator", check, WAN_READY_TIMEOUT_S, of=[PROC_NAME])
    return url
