"""The local cluster: start, describe and stop every process of a three-region cluster.

Start order (each step needs the one before): secrets -> WAN emulator -> etcd (3 members,
peer traffic through the WAN peer fronts) -> PostgreSQL primaries (roles, database, migrations,
shard init) -> standbys (cloned and streaming through the WAN) -> synchronous standby named on
every primary -> Redis -> topology bootstrapped into etcd -> one router config per region ->
one relay process per region (``python -m router.relays``, same config) and the routers, each
answering ``/readyz`` -> every relay's heartbeat for every shard in its region's Redis.

Every pid is written to ``cluster.json`` as soon as it exists, so ``down`` can clean up after an
``up`` that crashed half way. ``up`` tears down what it started when it fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import importlib.util
import json
import logging
import math
import os
import secrets
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import psycopg
import redis

import infra
from consistency import coherence
from consistency.etcd import EtcdClient
from consistency.topology import (
    Node,
    Region,
    Shard,
    SlotMap,
    Topology,
    bootstrap_topology,
    load_topology,
)
from infra.keys import KeyRing, KeyRingError
from infra.local import nats, postgres, procs
from infra.local.ports import PortPlan, plan_ports

# The state file is its own module; these names stay importable from here.
from infra.local.state import HOST as HOST
from infra.local.state import STATE_FILE as STATE_FILE
from infra.local.state import STATE_VERSION, PgNode
from infra.local.state import ClusterError as ClusterError
from infra.local.state import State as State
from infra.local.state import load_state as load_state
from infra.wan import ListenerSpec, WanConfig, profile_latencies
from router.auth import TENANT_SCOPES
from router.cache import REDIS_ERRORS
from router.config import RouterConfig
from router.limits import ROUTER_WORKERS

log = logging.getLogger("txr.local")

DEFAULT_REGIONS: Final = ("us-east", "eu-west", "ap-south")
DEFAULT_BASE_PORT: Final = 7400
DEFAULT_DIR: Final = Path(".txr/local")
DB_NAME: Final = "txr"
JWT_ISSUER: Final = "txr-local"
JWT_AUDIENCE: Final = "txrouter"
JWT_ADMIN_AUDIENCE: Final = "txrouter-admin"
# The dev token `make run` prints: every tenant scope (not admin), for a working day.
DEV_TOKEN_TTL_S: Final = 86400
# The JWT key ring (infra.keys) under the cluster's secrets directory.
JWT_RING_DIR: Final = "jwt"
# 32 hex chars = 128 random bits per database password.
PG_PASSWORD_BYTES: Final = 16
# The saga key (leg 2's HMAC, regionstore/sql/functions/saga.sql): 256 bits, as SHA-256's block
# needs at most.
SAGA_KEY_BYTES: Final = 32

# Readiness bounds. The WAN and Redis bind at once; etcd needs an election (2 s timeout under
# --wan realistic, plus a pre-vote round); routers load the topology and connect their pools
# across the WAN.
WAN_READY_TIMEOUT_S: Final = 15.0
REDIS_READY_TIMEOUT_S: Final = 15.0
ETCD_READY_TIMEOUT_S: Final = 60.0
ROUTER_READY_TIMEOUT_S: Final = 60.0
# A region's relay process is ready once it published a heartbeat for every shard: it attached
# a logical slot on every primary (one WAN round trip each) and finished a round.
RELAYS_READY_TIMEOUT_S: Final = 60.0
# After pg_ctl stop: how long the servers' processes get to exit before SIGKILL.
PG_EXIT_TIMEOUT_S: Final = 30.0
# One HTTP probe of a loopback health endpoint.
PROBE_TIMEOUT_S: Final = 2.0
# `status` reads the live epochs from etcd, but must answer quickly when etcd is down.
STATUS_ETCD_TIMEOUT_S: Final = 2.0
# The foreground launcher checks its children this often to report one that died.
MONITOR_INTERVAL_S: Final = 1.0
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
# Redis's server cron rate (see _start_redis).
REDIS_HZ: Final = 1
ETCD_ELECTION_FACTOR: Final = 10

T = TypeVar("T")


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


# -- small helpers ----------------------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a worker thread.

    The launcher is synchronous and may be called from inside a running event loop (the pytest
    fixture); a thread keeps its loop entirely separate from the caller's.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised
            error.append(exc)

    th = threading.Thread(target=target, name="txr-local-async")
    th.start()
    th.join()
    if error:
        raise error[0]
    return result[0]


def http_ok(url: str, expect: Callable[[bytes], bool] | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as resp:  # noqa: S310
            body: bytes = resp.read()
            return bool(resp.status == 200 and (expect is None or expect(body)))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _relay_heartbeats(redis_url: str, shards: Sequence[str]) -> bool:
    """True when the region's Redis holds a relay heartbeat with a claim for every shard."""
    client = redis.Redis.from_url(redis_url, socket_timeout=PROBE_TIMEOUT_S)
    try:
        return all(client.hget(coherence.heartbeat_key(s), "through") for s in shards)
    except REDIS_ERRORS:
        return False
    finally:
        client.close()


def etcd_healthy(body: bytes) -> bool:
    try:
        return bool(json.loads(body).get("health") == "true")
    except ValueError:
        return False


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    path.chmod(0o600)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def router_proc_name(region: str, worker: int) -> str:
    """``router-{region}`` for the first worker (API.md's ``router_pid``), then ``-{i}``."""
    return f"router-{region}" if worker == 0 else f"router-{region}-{worker}"


def controller_proc_name(region: str) -> str:
    return f"controller-{region}"


def shard_name(region: str) -> str:
    return f"{region}-1"


def node_name(shard: str, region: str) -> str:
    return f"{shard}@{region}"


def etcd_timing_ms(latency_ms: dict[tuple[str, str], float]) -> tuple[int, int]:
    """(heartbeat, election timeout) in ms for the largest round trip between members."""
    rtt = 2 * max(latency_ms.values(), default=0.0)
    step = ETCD_HEARTBEAT_STEP_MS
    heartbeat = max(ETCD_HEARTBEAT_MS_MIN, math.ceil(rtt / step) * step)
    return heartbeat, heartbeat * ETCD_ELECTION_FACTOR


def _plan_json(plan: PortPlan) -> dict[str, Any]:
    return {
        "base": plan.base,
        "regions": {
            r: {
                "router": p.router,
                "redis": p.redis,
                "etcd_client": p.etcd_client,
                "etcd_peer": p.etcd_peer,
                "pg_primary": p.pg_primary,
                "pg_standby": p.pg_standby,
                "router_admin": p.router_admin,
                "relay_metrics": p.relay_metrics,
                "nats_client": p.nats_client,
                "nats_route": p.nats_route,
                "nats_monitor": p.nats_monitor,
            }
            for r, p in plan.region.items()
        },
        "wan_control": plan.wan_control,
        "etcd_peer_front": plan.etcd_peer_front,
        "wan": [
            {"src": s, "dst": d, "service": svc, "port": port}
            for (s, d, svc), port in plan.wan.items()
        ],
    }


def python_env() -> dict[str, str]:
    """The environment of a Python child: it imports our packages from this checkout, whether
    or not the checkout is installed."""
    root = str(Path(infra.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _log_progress(msg: str) -> None:
    log.info("%s", msg)


# -- the launcher -----------------------------------------------------------------------------


class Launcher:
    """Brings one cluster up, step by step, recording every process in the state file."""

    def __init__(self, opts: UpOptions, progress: Callable[[str], None]) -> None:
        self.opts = opts
        self.dir = opts.dir.resolve()
        self.regions = opts.regions
        self.plan = plan_ports(opts.base_port, opts.regions)
        self.latency = profile_latencies(opts.wan, opts.regions)
        self.progress = progress
        self.logs = self.dir / "logs"
        self.run_dir = self.dir / "run"
        self.secrets_dir = self.dir / "secrets"
        self.state: State
        self.pg_root: Path
        self.creds: postgres.Credentials
        self.passfile: Path
        self.popen: dict[str, Any] = {}

    # The servers of one region, as a shard and node layout: shard i's primary in region i and
    # its standby in region i-1 (so region i hosts the standby of shard i+1).
    def standby_region(self, shard_region: str) -> str:
        i = self.regions.index(shard_region)
        return self.regions[(i - 1) % len(self.regions)]

    def up(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._prepare()
        self._secrets()
        self._start_wan()
        self._start_etcd()
        self._start_primaries()
        self._start_standbys()
        self._sync_standbys()
        self._start_redis()
        self._start_nats()
        self._bootstrap_topology()
        self._write_router_configs()
        if self.opts.start_routers:
            self._start_relays()
            self._start_routers()
            self._wait_relays()
            if self.opts.controllers:
                self._start_controllers()
        elapsed = time.monotonic() - t0
        self.state.data["status"] = "up"
        self.state.data["start_seconds"] = round(elapsed, 2)
        self.state.data["routers_started"] = self.opts.start_routers
        self.state.save()
        return self.state.data

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        old = State.load(self.dir)
        if old is not None and _live_pids(old):
            raise ClusterError(
                f"a cluster is already running from {self.dir} (pids {_live_pids(old)}); "
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
        old_pg_root = old.data.get("pg_root") if old is not None else None
        for sub in ("etcd", "redis", "run", "secrets"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        if old_pg_root:
            shutil.rmtree(old_pg_root, ignore_errors=True)
        for d in (self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pg_root = postgres.state_root(self.dir)
        for child in self.pg_root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.state = State(
            self.dir / STATE_FILE,
            {
                "version": STATE_VERSION,
                "status": "starting",
                "dir": str(self.dir),
                "base_port": self.plan.base,
                "regions": list(self.regions),
                "wan": self.opts.wan,
                "wan_latency_ms": {f"{a}/{b}": ms for (a, b), ms in self.latency.items()},
                "pg_root": str(self.pg_root),
                "ports": _plan_json(self.plan),
                "started_at": _now_iso(),
                "procs": [],
                "pg": [],
                "shards": {},
            },
        )
        self.state.save()

    def _secrets(self) -> None:
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        KeyRing(self.secrets_dir / JWT_RING_DIR).create()
        self.creds = postgres.Credentials(
            admin_password=secrets.token_hex(PG_PASSWORD_BYTES),
            app_password=secrets.token_hex(PG_PASSWORD_BYTES),
            repl_password=secrets.token_hex(PG_PASSWORD_BYTES),
            relay_password=secrets.token_hex(PG_PASSWORD_BYTES),
            saga_key=secrets.token_hex(SAGA_KEY_BYTES),
        )
        _write_secret(
            self.secrets_dir / "pg.json",
            json.dumps(
                {
                    "admin_role": postgres.ADMIN_ROLE,
                    "admin_password": self.creds.admin_password,
                    "app_role": postgres.APP_ROLE,
                    "app_password": self.creds.app_password,
                    "repl_role": postgres.REPL_ROLE,
                    "repl_password": self.creds.repl_password,
                    "relay_role": postgres.RELAY_ROLE,
                    "relay_password": self.creds.relay_password,
                }
            ),
        )
        _write_secret(self.secrets_dir / "db_app.password", self.creds.app_password)
        # The relays' change feed decodes the commit log as the replication role.
        _write_secret(self.secrets_dir / "db_repl.password", self.creds.repl_password)
        _write_secret(self.secrets_dir / "db_relay.password", self.creds.relay_password)
        self.passfile = postgres.write_passfile(self.pg_root, self.creds)

    def _python_env(self) -> dict[str, str]:
        return python_env()

    def _spawn(
        self,
        name: str,
        kind: str,
        region: str | None,
        argv: list[str],
        marker: str,
        env: dict[str, str] | None = None,
    ) -> tuple[int, Path]:
        log_path = self.logs / f"{name}.log"
        p = procs.spawn(argv, log_path, env=env, cwd=self.dir)
        self.popen[name] = p
        self.state.add_proc(
            {
                "name": name,
                "kind": kind,
                "region": region,
                "pid": p.pid,
                "marker": marker,
                "log": str(log_path),
                # Enough to start the same process again (infra.local.control.restart).
                "argv": list(argv),
                "python_env": env is not None,
            }
        )
        return p.pid, log_path

    def _all_alive(self, names: Sequence[str]) -> bool:
        return all(self.popen[n].poll() is None for n in names)

    def _alive(self, name: str) -> Callable[[], bool]:
        p = self.popen[name]
        return lambda: p.poll() is None

    # -- WAN ----------------------------------------------------------------------------------

    def wan_config(self) -> WanConfig:
        listeners: list[ListenerSpec] = []
        peer_urls: dict[str, str] = {}
        for region, front in self.plan.etcd_peer_front.items():
            listeners.append(
                ListenerSpec(
                    front, region, HOST, self.plan.region[region].etcd_peer, None, "etcd-peer"
                )
            )
            peer_urls[f"http://{HOST}:{front}"] = region
        for (src, dst, svc), port in self.plan.wan.items():
            listeners.append(
                ListenerSpec(port, dst, HOST, self.plan.region[dst].service(svc), src, svc)
            )
        return WanConfig(
            HOST, self.plan.wan_control, dict(self.latency), tuple(listeners), peer_urls
        )

    def _start_wan(self) -> None:
        self.progress(f"WAN emulator ({self.opts.wan})")
        path = self.run_dir / "wan.json"
        self.wan_config().save(path)
        self._spawn(
            "wan",
            "wan",
            None,
            [sys.executable, "-m", "infra.wan", "--config", str(path)],
            str(path),
            env=self._python_env(),
        )
        url = f"http://{HOST}:{self.plan.wan_control}/links"
        procs.wait_until(
            "WAN emulator",
            lambda: http_ok(url),
            WAN_READY_TIMEOUT_S,
            alive=self._alive("wan"),
            log_path=self.logs / "wan.log",
        )
        self.state.data["wan_control"] = f"http://{HOST}:{self.plan.wan_control}"
        self.state.save()

    # -- etcd ---------------------------------------------------------------------------------

    def _start_etcd(self) -> None:
        heartbeat, election = etcd_timing_ms(self.latency)
        self.progress(
            f"etcd x{len(self.regions)} (heartbeat {heartbeat} ms, election {election} ms)"
        )
        initial = ",".join(
            f"{r}=http://{HOST}:{self.plan.etcd_peer_front[r]}" for r in self.regions
        )
        token = f"txr-{self.plan.base}-{secrets.token_hex(4)}"
        for r in self.regions:
            ports = self.plan.region[r]
            data_dir = self.dir / "etcd" / r
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
                f"http://{HOST}:{self.plan.etcd_peer_front[r]}",
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                token,
                "--heartbeat-interval",
                str(heartbeat),
                "--election-timeout",
                str(election),
                # A member cut off by a partition must not disrupt the majority when it returns.
                "--pre-vote=true",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]
            self._spawn(f"etcd-{r}", "etcd", r, argv, str(data_dir))
        for r in self.regions:
            url = f"http://{HOST}:{self.plan.region[r].etcd_client}/health"
            procs.wait_until(
                f"etcd {r}",
                functools.partial(http_ok, url, etcd_healthy),
                ETCD_READY_TIMEOUT_S,
                alive=self._alive(f"etcd-{r}"),
                log_path=self.logs / f"etcd-{r}.log",
            )

    # -- PostgreSQL ---------------------------------------------------------------------------

    def admin_dsn(self, port: int, db: str = DB_NAME) -> str:
        return postgres.dsn(HOST, port, postgres.ADMIN_ROLE, self.creds.admin_password, db)

    def _pg_log(self, node: str) -> Path:
        # The server user writes its own log; as root it may not be able to enter our directory
        # (it may sit under /root), so the log lives in the PostgreSQL state root and a symlink
        # in logs/ points at it.
        log_dir = postgres.pg_owned_dir(self.pg_root / "logs")
        target = log_dir / f"{postgres.application_name(node)}.log"
        link = self.logs / f"pg-{node}.log"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        return target

    def _parallel(self, fn: Callable[[str], None]) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.regions)) as pool:
            for fut in [pool.submit(fn, r) for r in self.regions]:
                fut.result()

    def _start_primaries(self) -> None:
        self.progress("PostgreSQL primaries")
        slotmap = SlotMap.even([shard_name(r) for r in self.regions])

        def one(region: str) -> None:
            self._start_primary(region, slotmap)

        self._parallel(one)

    def _start_primary(self, region: str, slotmap: SlotMap) -> None:
        shard = shard_name(region)
        node = node_name(shard, region)
        port = self.plan.region[region].pg_primary
        datadir = self.pg_root / postgres.application_name(node)
        logfile = self._pg_log(node)
        entry: dict[str, Any] = {
            "node": node,
            "shard": shard,
            "region": region,
            "role": "primary",
            "port": port,
            "datadir": str(datadir),
            "log": str(logfile),
            "pid": None,
        }
        # Recorded before the server exists, so `down` finds its data directory either way.
        self.state.add_pg(entry)
        postgres.init_primary(datadir, port, self.creds)
        entry["pid"] = postgres.start(datadir, logfile)
        self.state.save()
        with psycopg.connect(self.admin_dsn(port, "postgres"), autocommit=True) as conn:
            for stmt, params in postgres.create_roles_sql(self.creds):
                conn.execute(stmt.encode(), params)
            conn.execute(f"CREATE DATABASE {DB_NAME} OWNER {postgres.ADMIN_ROLE}".encode())
        if self.opts.init_schema:
            try:
                from regionstore.admin import init_shard, set_saga_identity
                from regionstore.migrate import apply_migrations
            except ImportError as exc:
                raise ClusterError(f"regionstore is not usable: {exc}") from exc
            apply_migrations(self.admin_dsn(port))
            init_shard(self.admin_dsn(port), epoch=1, slots=slotmap.slots_of(shard), slot_epoch=1)
            set_saga_identity(
                self.admin_dsn(port),
                shard=shard,
                key_id=1,
                secret=bytes.fromhex(self.creds.saga_key),
            )
        self.state.data["shards"][shard] = {
            "home_region": region,
            "primary_region": region,
            "standby_region": self.standby_region(region),
            "epoch": 1,
        }
        self.state.save()

    def _start_standbys(self) -> None:
        self.progress("PostgreSQL standbys (cloned across the WAN)")
        self._parallel(self._start_standby)

    def _start_standby(self, shard_region: str) -> None:
        shard = shard_name(shard_region)
        region = self.standby_region(shard_region)
        node = node_name(shard, region)
        port = self.plan.region[region].pg_standby
        datadir = self.pg_root / postgres.application_name(node)
        logfile = self._pg_log(node)
        entry: dict[str, Any] = {
            "node": node,
            "shard": shard,
            "region": region,
            "role": "standby",
            "port": port,
            "datadir": str(datadir),
            "log": str(logfile),
            "pid": None,
        }
        self.state.add_pg(entry)
        postgres.init_standby(
            datadir,
            port,
            primary_host=HOST,
            # The standby's region reaches the primary through its WAN listener, so both the
            # clone and the replication stream pay the link's latency.
            primary_port=self.plan.wan[(region, shard_region, "pg-primary")],
            passfile=self.passfile,
            app_name=postgres.application_name(node),
        )
        entry["pid"] = postgres.start(datadir, logfile)
        self.state.save()

    def _sync_standbys(self) -> None:
        self.progress("synchronous replication")
        try:
            from regionstore.replication import set_sync_standby
        except ImportError as exc:
            raise ClusterError(f"regionstore.replication is not usable: {exc}") from exc

        def one(shard_region: str) -> None:
            node = node_name(shard_name(shard_region), self.standby_region(shard_region))
            set_sync_standby(
                self.admin_dsn(self.plan.region[shard_region].pg_primary, "postgres"),
                postgres.application_name(node),
            )

        self._parallel(one)

    # -- Redis --------------------------------------------------------------------------------

    def _start_redis(self) -> None:
        self.progress("Redis")
        for r in self.regions:
            port = self.plan.region[r].redis
            data_dir = self.dir / "redis" / r
            data_dir.mkdir(parents=True, exist_ok=True)
            argv = [
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
                # Background tasks (active expiry, client timeouts, stats) this many times a
                # second instead of 10: an idle Redis then sleeps. Expiry stays exact (a key
                # past its TTL is never returned: lazy expiry on access); only the reclaiming
                # of expired tombstones and entries nobody reads again is slower, which costs
                # memory, not correctness. No client here uses blocking commands or idle
                # timeouts, the two other things the cron paces.
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
            # redis-server rewrites its process title to "redis-server 127.0.0.1:PORT".
            self._spawn(f"redis-{r}", "redis", r, argv, f"{HOST}:{port}")
        for r in self.regions:
            port = self.plan.region[r].redis
            procs.wait_until(
                f"redis {r}",
                functools.partial(procs.port_open, port),
                REDIS_READY_TIMEOUT_S,
                alive=self._alive(f"redis-{r}"),
                log_path=self.logs / f"redis-{r}.log",
            )

    def _start_nats(self) -> None:
        self.progress(f"NATS JetStream x{len(self.regions)}")
        nats.start(
            self.plan,
            self.dir,
            self.logs,
            lambda name, kind, region, argv, marker: self._spawn(name, kind, region, argv, marker),
            self._alive,
            regions=self.regions,
        )

    # -- topology and routers -----------------------------------------------------------------

    def topology(self) -> Topology:
        shards: dict[str, Shard] = {}
        for r in self.regions:
            shard = shard_name(r)
            sr = self.standby_region(r)
            shards[shard] = Shard(
                name=shard,
                home_region=r,
                primary=Node(node_name(shard, r), r, HOST, self.plan.region[r].pg_primary),
                standbys=(Node(node_name(shard, sr), sr, HOST, self.plan.region[sr].pg_standby),),
                epoch=1,
            )
        regions = {
            r: Region(r, f"http://{HOST}:{self.plan.region[r].router}") for r in self.regions
        }
        return Topology(0, regions, shards, SlotMap.even(list(shards)))

    def _bootstrap_topology(self) -> None:
        self.progress("topology -> etcd")
        endpoints = [f"http://{HOST}:{self.plan.region[r].etcd_client}" for r in self.regions]
        topo = self.topology()

        async def run() -> bool:
            async with EtcdClient(endpoints) as client:
                return await bootstrap_topology(client, topo)

        if not run_async(run):
            raise ClusterError("etcd already holds a topology; the cluster directory is stale")

    def router_config(self, region: str) -> RouterConfig:
        dial: dict[str, str] = {}
        peer_routers: dict[str, str] = {}
        etcd = [f"http://{HOST}:{self.plan.region[region].etcd_client}"]
        for other in self.regions:
            op = self.plan.region[other]
            if other == region:
                peer_routers[other] = f"http://{HOST}:{op.router}"
                continue
            for svc in ("pg-primary", "pg-standby", "router"):
                dial[f"{HOST}:{op.service(svc)}"] = f"{HOST}:{self.plan.wan[(region, other, svc)]}"
            peer_routers[other] = f"http://{HOST}:{self.plan.wan[(region, other, 'router')]}"
            etcd.append(f"http://{HOST}:{self.plan.wan[(region, other, 'etcd')]}")
        return RouterConfig(
            region=region,
            host=HOST,
            port=self.plan.region[region].router,
            etcd_endpoints=tuple(etcd),
            dial=dial,
            db_user=postgres.APP_ROLE,
            db_password_file=self.secrets_dir / "db_app.password",
            db_name=DB_NAME,
            redis_url=f"redis://{HOST}:{self.plan.region[region].redis}/0",
            jwks_file=key_ring(self.dir).jwks_path,
            jwt_issuer=JWT_ISSUER,
            jwt_audience=JWT_AUDIENCE,
            jwt_admin_audience=JWT_ADMIN_AUDIENCE,
            peer_routers=peer_routers,
            repl_user=postgres.REPL_ROLE,
            repl_password_file=self.secrets_dir / "db_repl.password",
            relay_user=postgres.RELAY_ROLE,
            relay_password_file=self.secrets_dir / "db_relay.password",
            workers=ROUTER_WORKERS if self.opts.workers is None else self.opts.workers,
            admin_port=self.plan.region[region].router_admin,
            feed_redis=self.feed_redis(region),
            relay_metrics_port=self.plan.region[region].relay_metrics,
            nats_urls=(nats.client_url(self.plan, region),),
            webhooks_allow_loopback=True,
        )

    def feed_redis(self, region: str) -> dict[str, str]:
        """Every region's Redis as the relay of ``region`` dials it (remote ones via the WAN)."""
        urls: dict[str, str] = {}
        for other in self.regions:
            port = (
                self.plan.region[other].redis
                if other == region
                else self.plan.wan[(region, other, "redis")]
            )
            urls[other] = f"redis://{HOST}:{port}/0"
        return urls

    def _write_router_configs(self) -> None:
        for r in self.regions:
            self.router_config(r).save(self.run_dir / f"router-{r}.json")

    def _start_relays(self) -> None:
        """One relay process per region (python -m router.relays), beside its routers."""
        self.progress("relays")
        for r in self.regions:
            cfg = self.run_dir / f"router-{r}.json"
            self._spawn(
                f"relays-{r}",
                "relays",
                r,
                [sys.executable, "-m", "router.relays", "--config", str(cfg)],
                f"router.relays --config {cfg}",
                env=self._python_env(),
            )

    def _wait_relays(self) -> None:
        shards = [shard_name(r) for r in self.regions]
        for r in self.regions:
            url = f"redis://{HOST}:{self.plan.region[r].redis}/0"
            procs.wait_until(
                f"relays {r} heartbeats",
                functools.partial(_relay_heartbeats, url, shards),
                RELAYS_READY_TIMEOUT_S,
                alive=self._alive(f"relays-{r}"),
                log_path=self.logs / f"relays-{r}.log",
            )

    def _start_controllers(self) -> None:
        """One failover controller per region (python -m infra.controller), started last: it
        must never see a cluster that is still coming up as one that lost its primaries."""
        self.progress("failover controllers")
        for r in self.regions:
            argv = [sys.executable, "-m", "infra.controller", "--dir", str(self.dir), "--region", r]
            self._spawn(
                controller_proc_name(r),
                "controller",
                r,
                argv,
                " ".join(argv[2:]),
                env=self._python_env(),
            )

    def _start_routers(self) -> None:
        self.progress("routers")
        if importlib.util.find_spec("router.__main__") is None:
            raise ClusterError(
                "the router cannot be started yet: router/__main__.py does not exist "
                "(use start_routers=False to stop before this step)"
            )
        workers: dict[str, list[str]] = {}
        for r in self.regions:
            cfg = self.run_dir / f"router-{r}.json"
            workers[r] = []
            for i in range(RouterConfig.load(cfg).workers):
                # Each worker is its own process, recorded with its own argv: any one can be
                # killed and restarted alone (the others keep serving the shared port).
                name = router_proc_name(r, i)
                argv = [sys.executable, "-m", "router", "--config", str(cfg), "--worker", str(i)]
                self._spawn(name, "router", r, argv, " ".join(argv[2:]), env=self._python_env())
                workers[r].append(name)
        for r in self.regions:
            url = f"http://{HOST}:{self.plan.region[r].router}/readyz"
            # A worker takes connections only once it is ready (it binds after its start-up),
            # so one answer means the region serves; every worker must still be alive.
            procs.wait_until(
                f"router {r} /readyz",
                functools.partial(http_ok, url),
                ROUTER_READY_TIMEOUT_S,
                alive=functools.partial(self._all_alive, workers[r]),
                log_path=self.logs / f"{workers[r][0]}.log",
            )


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


def _live_pids(state: State) -> list[int]:
    live = [p.pid for p in state.procs if procs.is_alive(p.pid, p.marker)]
    for pg in state.pg_nodes:
        if pg.pid and procs.is_alive(pg.pid, str(pg.datadir)):
            live.append(pg.pid)
    return live


def _stop_pg(entry: PgNode) -> None:
    datadir = entry.datadir
    # pg_ctl knows the server even when up crashed before recording its pid.
    pid = entry.pid
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    for mode in ("fast", "immediate"):
        try:
            postgres.stop(datadir, mode)
            break
        except postgres.PostgresError as exc:
            log.warning("pg_ctl stop -m %s of %s failed: %s", mode, entry.node, exc)
    if pid and procs.is_alive(pid, str(datadir)):
        # The last resort: the postmaster's children exit when they notice it is gone.
        procs.terminate(pid, str(datadir), group=False)


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
        for p in entries:
            if p.kind == kind:
                try:
                    procs.terminate(p.pid, p.marker)
                except procs.ProcessError as exc:
                    errors.append(f"{p.name}: {exc}")

    for kind in _STOP_ORDER:
        if any(p.kind == kind for p in entries):
            report(f"stopping {kind}")
            stop_kind(kind)
    if pg_nodes:
        report("stopping PostgreSQL")
        # Every process of every server, taken before the stop: pg_ctl returns when the pid
        # file is gone, and a postmaster killed alone leaves its backends behind; `down`
        # returns only once all of them have exited, so the next cluster can start at once.
        trees: list[int] = []
        for e in pg_nodes:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pm = int((e.datadir / "postmaster.pid").read_text().splitlines()[0])
                if procs.is_alive(pm, str(e.datadir)):
                    trees += [pm, *procs.children_of(pm)]
        with concurrent.futures.ThreadPoolExecutor(max(1, len(pg_nodes))) as pool:
            futs = [pool.submit(_stop_pg, e) for e in pg_nodes]
            for f in futs:
                try:
                    f.result()
                except (procs.ProcessError, OSError) as exc:
                    errors.append(str(exc))
        stuck = procs.wait_all_gone(trees, PG_EXIT_TIMEOUT_S)
        if stuck:
            errors.append(f"PostgreSQL processes still running: {stuck}")
    if any(p.kind == "etcd" for p in entries):
        report("stopping etcd")
        stop_kind("etcd")
    left = _live_pids(state)
    if left:
        errors.append(f"still running: pids {left}")
    state.data["status"] = "stopped" if not errors else "stop-failed"
    state.data["stopped_at"] = _now_iso()
    state.save()
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
    if _live_pids(state):
        raise ClusterError(f"cluster in {cluster_dir} still runs; stop it before purging")
    pg_root = state.pg_root
    if pg_root is not None:
        shutil.rmtree(pg_root, ignore_errors=True)
    for sub in ("etcd", "redis", "pg"):
        shutil.rmtree(cluster_dir / sub, ignore_errors=True)


# -- status -----------------------------------------------------------------------------------


def _live_topology(endpoints: Sequence[str]) -> Topology | None:
    async def run() -> Topology:
        async with EtcdClient(endpoints, timeout_s=STATUS_ETCD_TIMEOUT_S) as client:
            return await load_topology(client)

    try:
        return run_async(run)
    except Exception as exc:  # noqa: BLE001 - any failure means "fall back to the state file"
        log.info("etcd not readable for status (%s); using %s", exc, STATE_FILE)
        return None


def pg_passwords(cluster_dir: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((cluster_dir.resolve() / "secrets" / "pg.json").read_text())
    return data


def status(cluster_dir: Path) -> dict[str, Any]:
    """The cluster description of API.md (``txr local status --json``)."""
    state = load_state(cluster_dir)
    d = state.data
    ports = state.ports["regions"]
    pw = pg_passwords(cluster_dir)
    all_procs = state.procs
    procs_by_name = {p.name: p for p in all_procs}
    topo = None
    if d.get("status") == "up":
        topo = _live_topology(state.etcd_urls)

    def pid_of(name: str) -> int | None:
        p = procs_by_name.get(name)
        return p.pid if p and procs.is_alive(p.pid, p.marker) else None

    regions: dict[str, Any] = {}
    for r in state.regions:
        nodes = []
        for e in state.pg_nodes:
            if e.region != r:
                continue
            role = e.role
            if topo is not None and e.shard in topo.shards:
                role = "primary" if topo.shards[e.shard].primary.name == e.node else "standby"
            alive = e.pid is not None and procs.is_alive(e.pid, str(e.datadir))
            nodes.append(
                {
                    "shard": e.shard,
                    "node": e.node,
                    "role": role,
                    "dsn": postgres.redact(
                        postgres.dsn(HOST, e.port, postgres.APP_ROLE, pw["app_password"], DB_NAME)
                    ),
                    "pid": e.pid if alive else None,
                }
            )
        regions[r] = {
            "router": f"http://{HOST}:{ports[r]['router']}",
            # GET /metrics (the admin listener); absent for clusters started before it existed.
            "router_admin": (
                f"http://{HOST}:{ports[r]['router_admin']}" if "router_admin" in ports[r] else None
            ),
            "router_pid": pid_of(router_proc_name(r, 0)),
            "router_pids": [
                pid
                for p in all_procs
                if p.kind == "router" and p.region == r
                if (pid := pid_of(p.name)) is not None
            ],
            "relays_pid": pid_of(f"relays-{r}"),
            "controller_pid": pid_of(controller_proc_name(r)),
            # The relay process's /metrics (change feed lag per target region, resets, ...);
            # absent for a cluster started before it existed.
            "relays_metrics": (
                f"http://{HOST}:{ports[r]['relay_metrics']}/metrics"
                if "relay_metrics" in ports[r]
                else None
            ),
            "redis": f"redis://{HOST}:{ports[r]['redis']}",
            "redis_pid": pid_of(f"redis-{r}"),
            "etcd": state.etcd_url(r),
            "etcd_pid": pid_of(f"etcd-{r}"),
            "nats": (
                f"nats://{HOST}:{ports[r]['nats_client']}" if "nats_client" in ports[r] else None
            ),
            "nats_pid": pid_of(nats.proc_name(r)),
            "nodes": nodes,
        }
    shards: dict[str, Any] = {}
    for name, s in d.get("shards", {}).items():
        entry = {
            "home_region": s["home_region"],
            "primary_region": s["primary_region"],
            "epoch": s["epoch"],
        }
        if topo is not None and name in topo.shards:
            live = topo.shards[name]
            entry.update(primary_region=live.primary.region, epoch=live.epoch)
        shards[name] = entry
    return {
        "dir": d["dir"],
        "status": d.get("status"),
        "started_at": d.get("started_at"),
        "start_seconds": d.get("start_seconds"),
        "wan": {
            "profile": d.get("wan"),
            "control": d.get("wan_control"),
            "latency_ms": d.get("wan_latency_ms"),
            "pid": pid_of("wan"),
        },
        "topology_source": "etcd" if topo is not None else STATE_FILE,
        "regions": regions,
        "shards": shards,
    }


# -- tokens -----------------------------------------------------------------------------------


def key_ring(cluster_dir: Path) -> KeyRing:
    """The cluster's JWT key ring (``txr keys``); routers read its public ``jwks.json``."""
    return KeyRing(cluster_dir.resolve() / "secrets" / JWT_RING_DIR)


def token(cluster_dir: Path, tenant: str, scopes: Sequence[str], ttl_s: int) -> str:
    """A tenant token (tenant scopes only; router.auth.TOKEN_TTL_S_MAX at most)."""
    try:
        return key_ring(cluster_dir).mint(
            tenant, list(scopes), ttl_s, issuer=JWT_ISSUER, audience=JWT_AUDIENCE
        )
    except KeyRingError as exc:
        raise ClusterError(str(exc)) from None


def admin_token(cluster_dir: Path, operator: str, ttl_s: int) -> str:
    """An operator token: scope ``admin`` in the admin audience (ADMIN_TOKEN_TTL_S_MAX at most)."""
    try:
        return key_ring(cluster_dir).mint(
            operator, [], ttl_s, issuer=JWT_ISSUER, audience=JWT_ADMIN_AUDIENCE, admin=True
        )
    except KeyRingError as exc:
        raise ClusterError(str(exc)) from None


def dev_token(cluster_dir: Path) -> str:
    return token(cluster_dir, "dev", sorted(TENANT_SCOPES), DEV_TOKEN_TTL_S)


def primary_admin_dsns(cluster_dir: Path) -> dict[str, str]:
    """Shard -> admin DSN (database txr) of its *current* primary: etcd first, else the state.

    Operator commands (reconcile, failover) must act on the primary etcd names, not on the one
    the cluster started with.
    """
    state = load_state(cluster_dir)
    pw = pg_passwords(cluster_dir)
    topo = _live_topology(state.etcd_urls)
    out: dict[str, str] = {}
    if topo is not None:
        for name, shard in topo.shards.items():
            out[name] = postgres.dsn(
                shard.primary.host,
                shard.primary.port,
                postgres.ADMIN_ROLE,
                pw["admin_password"],
                DB_NAME,
            )
        return out
    for e in state.pg_nodes:
        if e.role == "primary":
            out[e.shard] = postgres.dsn(
                HOST, e.port, postgres.ADMIN_ROLE, pw["admin_password"], DB_NAME
            )
    return out
