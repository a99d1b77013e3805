"""The local cluster's routers: each region's config file and its worker processes.

What this module owns: a region's router configuration (its own services on loopback, every
other region's through the WAN emulator's listeners, the secrets' paths), one process per
worker (``python -m router --config FILE --worker i``, each recorded alone so any one can be
killed and restarted), and the readiness check (``/readyz``). The relays read the same config
file (``infra.local.relays``). The launcher (``infra.local.cluster``) writes the configs once
the topology is in etcd and starts the routers after the relays.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infra.local import credentials, nats, postgres, procs
from infra.local.children import Children
from infra.local.ports import PortPlan
from infra.local.state import HOST, ClusterError
from router.config import RouterConfig
from router.limits import ROUTER_WORKERS

# A router loads the topology and connects its pools across the WAN before it binds.
ROUTER_READY_TIMEOUT_S: Final = 60.0


def proc_name(region: str, worker: int) -> str:
    """``router-{region}`` for the first worker (API.md's ``router_pid``), then ``-{i}``."""
    return f"router-{region}" if worker == 0 else f"router-{region}-{worker}"


def config_path(run_dir: Path, region: str) -> Path:
    return run_dir / f"router-{region}.json"


def ready(port: int) -> bool:
    """The region's router answers ``/readyz`` (a worker binds only once it is ready)."""
    return procs.http_ok(f"http://{HOST}:{port}/readyz")


def feed_redis(plan: PortPlan, regions: Sequence[str], region: str) -> dict[str, str]:
    """Every region's Redis as the relay of ``region`` dials it (remote ones via the WAN)."""
    urls: dict[str, str] = {}
    for other in regions:
        port = plan.region[other].redis if other == region else plan.wan[(region, other, "redis")]
        urls[other] = f"redis://{HOST}:{port}/0"
    return urls


def config(
    plan: PortPlan,
    regions: Sequence[str],
    region: str,
    cluster_dir: Path,
    *,
    workers: int | None,
) -> RouterConfig:
    """``region``'s router config; ``workers`` None: the router's default (router.limits)."""
    dial: dict[str, str] = {}
    peer_routers: dict[str, str] = {}
    etcd = [f"http://{HOST}:{plan.region[region].etcd_client}"]
    for other in regions:
        op = plan.region[other]
        if other == region:
            peer_routers[other] = f"http://{HOST}:{op.router}"
            continue
        for svc in ("pg-primary", "pg-standby", "router"):
            dial[f"{HOST}:{op.service(svc)}"] = f"{HOST}:{plan.wan[(region, other, svc)]}"
        peer_routers[other] = f"http://{HOST}:{plan.wan[(region, other, 'router')]}"
        etcd.append(f"http://{HOST}:{plan.wan[(region, other, 'etcd')]}")
    secrets = credentials.secrets_dir(cluster_dir)
    return RouterConfig(
        region=region,
        host=HOST,
        port=plan.region[region].router,
        etcd_endpoints=tuple(etcd),
        dial=dial,
        db_user=postgres.APP_ROLE,
        db_password_file=secrets / credentials.APP_ROLE_FILE,
        db_name=postgres.DB_NAME,
        redis_url=f"redis://{HOST}:{plan.region[region].redis}/0",
        jwks_file=credentials.key_ring(cluster_dir).jwks_path,
        jwt_issuer=credentials.JWT_ISSUER,
        jwt_audience=credentials.JWT_AUDIENCE,
        jwt_admin_audience=credentials.JWT_ADMIN_AUDIENCE,
        peer_routers=peer_routers,
        repl_user=postgres.REPL_ROLE,
        repl_password_file=secrets / credentials.REPL_ROLE_FILE,
        relay_user=postgres.RELAY_ROLE,
        relay_password_file=secrets / credentials.RELAY_ROLE_FILE,
        workers=ROUTER_WORKERS if workers is None else workers,
        admin_port=plan.region[region].router_admin,
        feed_redis=feed_redis(plan, regions, region),
        relay_metrics_port=plan.region[region].relay_metrics,
        nats_urls=(nats.client_url(plan, region),),
        webhooks_allow_loopback=True,
    )


def write_configs(
    plan: PortPlan,
    regions: Sequence[str],
    cluster_dir: Path,
    run_dir: Path,
    *,
    workers: int | None,
) -> dict[str, Path]:
    """Every region's config file (the routers' and the relays'). Returns region -> path."""
    paths = {r: config_path(run_dir, r) for r in regions}
    for r, path in paths.items():
        config(plan, regions, r, cluster_dir, workers=workers).save(path)
    return paths


def start(plan: PortPlan, children: Children, configs: dict[str, Path]) -> None:
    """Start every worker of every region (region -> config file) and wait until each region
    answers ``/readyz`` with all its workers alive."""
    if importlib.util.find_spec("router.__main__") is None:
        raise ClusterError(
            "the router cannot be started yet: router/__main__.py does not exist "
            "(use start_routers=False to stop before this step)"
        )
    workers: dict[str, list[str]] = {}
    for r, cfg in configs.items():
        workers[r] = []
        for i in range(RouterConfig.load(cfg).workers):
            # Each worker is its own process, recorded with its own argv: any one can be
            # killed and restarted alone (the others keep serving the shared port).
            name = proc_name(r, i)
            argv = [sys.executable, "-m", "router", "--config", str(cfg), "--worker", str(i)]
            children.spawn(name, "router", r, argv, " ".join(argv[2:]), python=True)
            workers[r].append(name)
    for r in configs:
        # A worker takes connections only once it is ready (it binds after its start-up), so
        # one answer means the region serves; every worker must still be alive.
        check = functools.partial(ready, plan.region[r].router)
        children.wait_ready(f"router {r} /readyz", check, ROUTER_READY_TIMEOUT_S, of=workers[r])
