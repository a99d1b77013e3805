"""The local cluster's launcher: ``up`` orchestrates the start of a three-region cluster,
``down`` and ``purge`` stop and remove it.

What this module owns: the start order, what runs side by side, and recording the cluster's
state as it goes; nothing here builds a command line or waits for a server itself. Each
service's start and readiness live in its own module (``wan_emulator``, ``etcd_server``,
``redis_server``, ``nats``, ``pg_servers`` over ``postgres``, ``relays``, ``routers``,
``controllers``), every child is spawned and waited for through ``children``, the secrets are
``credentials``, the shard layout and the topology ``layout``, the state file ``state``, and
``status`` and the operator DSNs ``describe``. The public names other code calls (``up``,
``down``, ``status``, ``token``, ``shard_name``, ``HOST``...) stay importable from here.

Start order: secrets -> WAN emulator -> etcd, Redis and NATS spawned (they need only the WAN)
-> PostgreSQL primaries (roles, database, migrations, shard init) -> standbys (cloned and
streaming through the WAN) -> synchronous standby named on every primary -> etcd, Redis and
NATS waited for (the event stream created) -> topology bootstrapped into etcd -> one router
config per region -> one relay process per region (same config) and the routers, each
answering ``/readyz`` -> every relay's heartbeat for every shard in its region's Redis -> the
failover controllers.

Every pid is written to ``cluster.json`` as soon as it exists, so ``down`` can clean up after an
``up`` that crashed half way. ``up`` tears down what it started when it fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from consistency.topology import SlotMap
from infra.local import (
    children,
    controllers,
    credentials,
    etcd_server,
    layout,
    nats,
    pg_servers,
    postgres,
    procs,
    redis_server,
    relays,
    routers,
    wan_emulator,
)

# The public names other code imports from here, now owned by the modules above.
from infra.local.credentials import DEV_TOKEN_TTL_S as DEV_TOKEN_TTL_S
from infra.local.credentials import JWT_ADMIN_AUDIENCE as JWT_ADMIN_AUDIENCE
from infra.local.credentials import JWT_AUDIENCE as JWT_AUDIENCE
from infra.local.credentials import JWT_ISSUER as JWT_ISSUER
from infra.local.credentials import admin_token as admin_token
from infra.local.credentials import dev_token as dev_token
from infra.local.credentials import key_ring as key_ring
from infra.local.credentials import pg_passwords as pg_passwords
from infra.local.credentials import token as token
from infra.local.describe import live_pids
from infra.local.describe import primary_admin_dsns as primary_admin_dsns
from infra.local.describe import status as status
from infra.local.layout import node_name as node_name
from infra.local.layout import run_async as run_async
from infra.local.layout import shard_name as shard_name
from infra.local.ports import plan_ports
from infra.local.postgres import DB_NAME as DB_NAME
from infra.local.procs import http_ok as http_ok
from infra.local.procs import python_env as python_env
from infra.local.routers import ROUTER_READY_TIMEOUT_S as ROUTER_READY_TIMEOUT_S
from infra.local.state import HOST as HOST
from infra.local.state import STATE_FILE as STATE_FILE
from infra.local.state import ClusterError as ClusterError
from infra.local.state import State as State
from infra.local.state import load_state as load_state
from infra.wan import profile_latencies

log = logging.getLogger("txr.local")

DEFAULT_REGIONS: Final = ("us-east", "eu-west", "ap-south")
DEFAULT_BASE_PORT: Final = 7400
DEFAULT_DIR: Final = Path(".txr/local")
# The foreground launcher checks its children this often to report one that died.
MONITOR_INTERVAL_S: Final = 1.0

# Process names (``status`` and the tests find the processes by them).
router_proc_name: Final = routers.proc_name
controller_proc_name: Final = controllers.proc_name


@dataclass(frozen=True)
class UpOptions:
    dir: Path = DEFAULT_DIR
    base_port: int = DEFAULT_BASE_PORT
    regions: tuple[str, ...] = DEFAULT_REGIONS
    wan: str = "none"
    # False stops after the topology and router configs are written (tests of the layers below
    # the router, and clusters for router development run by hand).
    start_routers: bool = True
    # False skips migrations and shard init (a bare replicated PostgreSQL, for infra tests).
    init_schema: bool = True
    # Router worker processes per region; None: the router's default (router.limits).
    workers: int | None = None
    # One failover controller per region (infra.controller), with the routers; off leaves
    # every failover to the operator.
    controllers: bool = True


def _log_progress(msg: str) -> None:
    log.info("%s", msg)


# -- the launcher -----------------------------------------------------------------------------


class Launcher:
    """Brings one cluster up, step by step, recording every process in the state file.

    ``up`` runs the steps in order; each step is public so a test can stop part way (a start
    that crashed half way) and ``down`` must still clean up.
    """

    def __init__(self, opts: UpOptions, progress: Callable[[str], None]) -> None:
        self.opts = opts
        self.dir = opts.dir.resolve()
        self.regions = opts.regions
        self.plan = plan_ports(opts.base_port, opts.regions)
        self.latency = profile_latencies(opts.wan, opts.regions)
        self.progress = progress
        self.logs = self.dir / "logs"
        self.run_dir = self.dir / "run"
        self.state: State
        self.children: children.Children
        self.pg_root: Path
        self.pg: pg_servers.PgServers

    def up(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.prepare()
        self.write_secrets()
        self.start_wan()
        # etcd, Redis and NATS only need the WAN emulator: they start while PostgreSQL is being
        # initialised (most of the start-up), and are waited for once it is up. NATS's cluster
        # forms and elects its JetStream leader meanwhile.
        self.spawn_etcd()
        self.spawn_redis()
        self.progress(f"NATS JetStream x{len(self.regions)}")
        nats.spawn(self.plan, self.dir, self.children, regions=self.regions)
        self.progress("PostgreSQL primaries")
        slotmap = SlotMap.even([shard_name(r) for r in self.regions])
        self._parallel(lambda r: self.start_primary(r, slotmap))
        self.progress("PostgreSQL standbys (cloned across the WAN)")
        self._parallel(self.pg.start_standby)
        self.progress("synchronous replication")
        self._parallel(self.pg.sync_standby)
        etcd_server.wait_ready(self.plan, self.children, regions=self.regions)
        redis_server.wait_ready(self.plan, self.children, regions=self.regions)
        nats.wait_ready(self.plan, self.children, regions=self.regions)
        self.progress("topology -> etcd")
        layout.bootstrap(self.plan, self.regions)
        configs = routers.write_configs(
            self.plan, self.regions, self.dir, self.run_dir, workers=self.opts.workers
        )
        if self.opts.start_routers:
            self.progress("relays")
            relays.spawn(self.children, configs)
            self.progress("routers")
            routers.start(self.plan, self.children, configs)
            shards = [shard_name(r) for r in self.regions]
            relays.wait_ready(self.plan, self.children, regions=self.regions, shards=shards)
            if self.opts.controllers:
                self.progress("failover controllers")
                controllers.spawn(self.children, self.dir, regions=self.regions)
        self.state.mark_up(
            start_seconds=time.monotonic() - t0, routers_started=self.opts.start_routers
        )
        return self.state.data

    def prepare(self) -> None:
        """Check nothing runs here or on the ports, clear a previous run, record the state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        old = State.load(self.dir)
        if old is not None and live_pids(old):
            raise ClusterError(
                f"a cluster is already running from {self.dir} (pids {live_pids(old)}); "
                "stop it with `txr local down`"
            )
        busy = [p for p in self.plan.all_ports() if not procs.port_free(p)]
        if busy:
            raise ClusterError(
                f"ports in use: {busy[:10]}{'...' if len(busy) > 10 else ''}; choose another "
                "--base-port or stop what listens there"
            )
        # A fresh cluster every time: leftovers of a previous run (its etcd member ids, its
        # PostgreSQL system identifiers) would not match the new secrets and topology.
        old_pg_root = old.pg_root if old is not None else None
        for sub in ("etcd", "redis", "run", credentials.SECRETS_DIR):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        if old_pg_root:
            shutil.rmtree(old_pg_root, ignore_errors=True)
        for d in (self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pg_root = postgres.state_root(self.dir)
        for child in self.pg_root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.state = State.create(
            self.dir,
            plan=self.plan,
            regions=self.regions,
            wan=self.opts.wan,
            wan_latency_ms=self.latency,
            pg_root=self.pg_root,
        )
        self.children = children.Children(self.state, self.logs, self.dir)

    def write_secrets(self) -> None:
        creds = credentials.create(self.dir)
        passfile = postgres.write_passfile(self.pg_root, creds)
        self.pg = pg_servers.PgServers(
            self.state, self.plan, self.regions, self.pg_root, self.logs, creds, passfile
        )

    def start_wan(self) -> None:
        self.progress(f"WAN emulator ({self.opts.wan})")
        url = wan_emulator.start(self.plan, self.latency, self.run_dir, self.children)
        self.state.set_wan_control(url)

    def spawn_etcd(self) -> None:
        heartbeat, election = etcd_server.timing_ms(self.latency)
        self.progress(
            f"etcd x{len(self.regions)} (heartbeat {heartbeat} ms, election {election} ms)"
        )
        etcd_server.spawn(
            self.plan,
            self.dir,
            self.children,
            regions=self.regions,
            heartbeat_ms=heartbeat,
            election_ms=election,
        )

    def spawn_redis(self) -> None:
        self.progress("Redis")
        redis_server.spawn(self.plan, self.dir, self.children, regions=self.regions)

    def start_primary(self, region: str, slotmap: SlotMap) -> None:
        self.pg.start_primary(region, slotmap, init_schema=self.opts.init_schema)

    def _parallel(self, fn: Callable[[str], None]) -> None:
        """``fn`` for every region side by side; the first failure is raised."""
        with concurrent.futures.ThreadPoolExecutor(len(self.regions)) as pool:
            for fut in [pool.submit(fn, r) for r in self.regions]:
                fut.result()


def up(opts: UpOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start a cluster and return its state; on failure stop what was started and raise."""
    report = progress or _log_progress
    launcher = Launcher(opts, report)
    try:
        return launcher.up()
    except BaseException as exc:
        # Also on KeyboardInterrupt: a half-started cluster must not outlive the command.
        if hasattr(launcher, "state"):
            with contextlib.suppress(Exception):
                report("start failed; stopping what was started")
                down(launcher.dir, progress=report)
        if isinstance(exc, ClusterError | procs.ProcessError | postgres.PostgresError):
            raise ClusterError(str(exc)) from exc
        raise


# -- down -------------------------------------------------------------------------------------

# Controllers first: a cluster being stopped must not look to them like one losing primaries.
_STOP_ORDER: Final = ("controller", "router", "relays", "nats", "wan", "redis")


def down(cluster_dir: Path, progress: Callable[[str], None] | None = None) -> bool:
    """Stop every process of the cluster at ``cluster_dir``. False when there was none."""
    report = progress or _log_progress
    state = State.load(cluster_dir.resolve())
    if state is None:
        return False
    entries = state.procs
    pg_nodes = state.pg_nodes
    errors: list[str] = []

    def stop_kind(kind: str) -> None:
        # One kind at a time, in _STOP_ORDER, but all processes of a kind at once.
        try:
            procs.terminate_all([(p.pid, p.marker) for p in entries if p.kind == kind])
        except procs.ProcessError as exc:
            errors.append(f"{kind}: {exc}")

    for kind in _STOP_ORDER:
        if any(p.kind == kind for p in entries):
            report(f"stopping {kind}")
            stop_kind(kind)
    if pg_nodes:
        report("stopping PostgreSQL")
        errors += pg_servers.stop_all(pg_nodes)
    if any(p.kind == "etcd" for p in entries):
        report("stopping etcd")
        stop_kind("etcd")
    left = live_pids(state)
    if left:
        errors.append(f"still running: pids {left}")
    state.mark_stopped(failed=bool(errors))
    if errors:
        raise ClusterError("; ".join(errors))
    return True


def purge(cluster_dir: Path) -> None:
    """Delete a stopped cluster's data, including a PostgreSQL state root outside the directory.

    ``down`` keeps data for inspection; tests call this so that clusters under temporary
    directories do not leave their PostgreSQL data in /var/tmp.
    """
    state = State.load(cluster_dir.resolve())
    if state is None:
        return
    if live_pids(state):
        raise ClusterError(f"cluster in {cluster_dir} still runs; stop it before purging")
    pg_root = state.pg_root
    if pg_root is not None:
        shutil.rmtree(pg_root, ignore_errors=True)
    for sub in ("etcd", "redis", "pg"):
        shutil.rmtree(cluster_dir / sub, ignore_errors=True)
