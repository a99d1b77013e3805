"""``cluster.json``, the local cluster's state: its typed reading and its typed writing.

What this module owns: the file's format (its keys, the recorded port plan), the typed records
(:class:`Proc`, :class:`PgNode`, :class:`ShardRecord`) and every change written to it. The
launcher (``infra.local.cluster``) records each process as it starts and the cluster's status;
``infra.local.control`` records restarted pids; the failover operations (``infra.failover``)
record role changes. Every writer goes through :class:`State`'s recording methods and every
reader through its accessors, none through the raw dictionary. The file stays plain JSON with
the same keys, so a cluster started by an older checkout is still read (and ``txr local status
--json`` is unchanged); keys this checkout does not know are kept when it saves.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from infra.local.ports import PortPlan

STATE_FILE: Final = "cluster.json"
# Every service of a local cluster listens on loopback; the ports are in the state.
HOST: Final = "127.0.0.1"
STATE_VERSION: Final = 1


class ClusterError(RuntimeError):
    """The local cluster could not be started, described or stopped; the message says why."""


@dataclass(frozen=True, slots=True)
class Proc:
    """A process the launcher started (every kind but PostgreSQL, which is :class:`PgNode`)."""

    name: str
    kind: str
    region: str | None
    pid: int
    # What identifies the process as ours when its pid is checked (procs.is_alive).
    marker: str | None
    log: Path
    # Enough to start the same process again (infra.local.control.restart).
    argv: tuple[str, ...]
    python_env: bool

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Proc:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            region=d.get("region"),
            pid=int(d["pid"]),
            marker=d.get("marker"),
            log=Path(d["log"]),
            argv=tuple(d.get("argv") or ()),
            python_env=bool(d.get("python_env")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "region": self.region,
            "pid": self.pid,
            "marker": self.marker,
            "log": str(self.log),
            "argv": list(self.argv),
            "python_env": self.python_env,
        }


@dataclass(frozen=True, slots=True)
class PgNode:
    """A PostgreSQL server of the cluster and its role as last recorded."""

    node: str
    shard: str
    region: str
    role: str  # "primary", "standby" or "detached" (infra.failover)
    port: int
    datadir: Path
    log: Path
    pid: int | None  # None until started (the entry is recorded before the server exists)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PgNode:
        pid = d.get("pid")
        return cls(
            node=str(d["node"]),
            shard=str(d["shard"]),
            region=str(d["region"]),
            role=str(d["role"]),
            port=int(d["port"]),
            datadir=Path(d["datadir"]),
            log=Path(d["log"]),
            pid=int(pid) if pid else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "shard": self.shard,
            "region": self.region,
            "role": self.role,
            "port": self.port,
            "datadir": str(self.datadir),
            "log": str(self.log),
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A shard's placement as the state last recorded it (etcd holds the live one)."""

    home_region: str
    primary_region: str
    standby_region: str | None
    epoch: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        standby = d.get("standby_region")
        return cls(
            home_region=str(d["home_region"]),
            primary_region=str(d["primary_region"]),
            standby_region=str(standby) if standby else None,
            epoch=int(d["epoch"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "home_region": self.home_region,
            "primary_region": self.primary_region,
            "standby_region": self.standby_region,
            "epoch": self.epoch,
        }


def ports_json(plan: PortPlan) -> dict[str, Any]:
    """The port plan as the state records it (``ports``; read back by :attr:`State.ports`)."""
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


def now_iso() -> str:
    """A timestamp as the state records it (UTC, whole seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class State:
    """``cluster.json``: everything ``status`` and ``down`` need, saved after every change.

    ``data`` is the document as written; read it through the accessors below.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cluster_dir: Path) -> State | None:
        path = cluster_dir / STATE_FILE
        try:
            return cls(path, json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ClusterError(f"{path} is not valid JSON: {exc}") from exc

    def save(self) -> None:
        with self._lock:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
            tmp.replace(self.path)

    @classmethod
    def create(
        cls,
        cluster_dir: Path,
        *,
        plan: PortPlan,
        regions: Collection[str],
        wan: str,
        wan_latency_ms: Mapping[tuple[str, str], float],
        pg_root: Path,
    ) -> State:
        """A new cluster's state (status ``starting``, nothing started yet), saved."""
        state = cls(
            cluster_dir / STATE_FILE,
            {
                "version": STATE_VERSION,
                "status": "starting",
                "dir": str(cluster_dir),
                "base_port": plan.base,
                "regions": list(regions),
                "wan": wan,
                "wan_latency_ms": {f"{a}/{b}": ms for (a, b), ms in wan_latency_ms.items()},
                "pg_root": str(pg_root),
                "ports": ports_json(plan),
                "started_at": now_iso(),
                "procs": [],
                "pg": [],
                "shards": {},
            },
        )
        state.save()
        return state

    # -- typed writing: each change is saved at once ----------------------------------------

    def add_proc(self, proc: Proc) -> None:
        with self._lock:
            self.data.setdefault("procs", []).append(proc.to_json())
        self.save()

    def add_pg(self, node: PgNode) -> None:
        """Record a PostgreSQL node (before its server exists, so ``down`` finds its data)."""
        with self._lock:
            self.data.setdefault("pg", []).append(node.to_json())
        self.save()

    def set_proc_pid(self, name: str, pid: int) -> None:
        """A recorded process runs again under ``pid`` (infra.local.control.restart)."""
        self._update("procs", "name", name, pid=pid)

    def set_pg_pid(self, node: str, pid: int) -> None:
        """A PostgreSQL node runs (again) under ``pid``."""
        self._update("pg", "node", node, pid=pid)

    def set_pg_started(self, node: str, pid: int, role: str) -> None:
        """A PostgreSQL node runs under ``pid`` in ``role`` (a rejoined old primary)."""
        self._update("pg", "node", node, pid=pid, role=role)

    def _update(self, section: str, key: str, name: str, **fields: Any) -> None:
        with self._lock:
            for entry in self.data.get(section, []):
                if entry[key] == name:
                    entry.update(fields)
                    break
            else:
                raise ClusterError(f"no {key} {name} recorded in {self.path}")
        self.save()

    def record_shard(self, name: str, shard: ShardRecord) -> None:
        with self._lock:
            self.data.setdefault("shards", {})[name] = shard.to_json()
        self.save()

    def record_roles(
        self,
        shard: str,
        *,
        primary: str,
        standbys: Collection[str],
        primary_region: str,
        standby_region: str | None,
        epoch: int,
    ) -> None:
        """A shard's nodes changed roles (infra.failover): ``primary`` serves, ``standbys``
        follow it, any other node of the shard is ``detached`` (an old primary until ``txr
        rejoin``); the shard's record gets the new placement and epoch."""
        with self._lock:
            for e in self.data.get("pg", []):
                if e["shard"] != shard:
                    continue
                if e["node"] == primary:
                    e["role"] = "primary"
                elif e["node"] in standbys:
                    e["role"] = "standby"
                else:
                    e["role"] = "detached"
            rec = self.data.setdefault("shards", {}).setdefault(shard, {})
            rec.update(primary_region=primary_region, standby_region=standby_region, epoch=epoch)
        self.save()

    def set_wan_control(self, url: str) -> None:
        with self._lock:
            self.data["wan_control"] = url
        self.save()

    def mark_up(self, *, start_seconds: float, routers_started: bool) -> None:
        with self._lock:
            self.data.update(
                status="up", start_seconds=round(start_seconds, 2), routers_started=routers_started
            )
        self.save()

    def mark_stopped(self, *, failed: bool) -> None:
        with self._lock:
            self.data.update(status="stop-failed" if failed else "stopped", stopped_at=now_iso())
        self.save()

    # -- typed reading ----------------------------------------------------------------------

    @property
    def regions(self) -> list[str]:
        return list(self.data["regions"])

    @property
    def status(self) -> str | None:
        """``starting``, ``up``, ``stopped`` or ``stop-failed``."""
        status = self.data.get("status")
        return str(status) if status is not None else None

    @property
    def dir(self) -> str:
        return str(self.data["dir"])

    @property
    def started_at(self) -> str | None:
        return self.data.get("started_at")

    @property
    def start_seconds(self) -> float | None:
        return self.data.get("start_seconds")

    @property
    def base_port(self) -> int:
        return int(self.ports["base"])

    @property
    def wan_profile(self) -> str | None:
        return self.data.get("wan")

    @property
    def wan_latency_ms(self) -> dict[str, float] | None:
        """``"src/dst"`` -> one-way milliseconds, as recorded."""
        return self.data.get("wan_latency_ms")

    @property
    def shard_records(self) -> dict[str, ShardRecord]:
        return {n: ShardRecord.from_json(s) for n, s in self.data.get("shards", {}).items()}

    @property
    def procs(self) -> list[Proc]:
        return [Proc.from_json(p) for p in self.data.get("procs", [])]

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)

    @property
    def pg_nodes(self) -> list[PgNode]:
        return [PgNode.from_json(e) for e in self.data.get("pg", [])]

    def pg_node(self, node: str) -> PgNode | None:
        return next((e for e in self.pg_nodes if e.node == node), None)

    @property
    def shards(self) -> list[str]:
        """Every shard with a server in the cluster, sorted."""
        return sorted({e.shard for e in self.pg_nodes})

    @property
    def ports(self) -> dict[str, Any]:
        """The port plan as recorded (``regions`` -> region -> service -> port; ``wan``)."""
        ports: dict[str, Any] = self.data["ports"]
        return ports

    def region_ports(self, region: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.ports["regions"][region].items()}

    def etcd_url(self, region: str) -> str:
        return f"http://{HOST}:{self.region_ports(region)['etcd_client']}"

    @property
    def etcd_urls(self) -> list[str]:
        """Every region's etcd member, in region order."""
        return [self.etcd_url(r) for r in self.regions]

    def wan_port(self, src: str, dst: str, service: str) -> int | None:
        """The WAN emulator's listener that ``src`` dials to reach ``service`` in ``dst``."""
        for w in self.ports["wan"]:
            if w["src"] == src and w["dst"] == dst and w["service"] == service:
                return int(w["port"])
        return None

    def etcd_endpoints(self, via_region: str | None = None) -> list[str]:
        """``via_region``'s own member first, then the others as that region reaches them
        (through the WAN); None: every member directly (an operator's command)."""
        if via_region is None:
            return self.etcd_urls
        out = [self.etcd_url(via_region)]
        for r in self.regions:
            if r != via_region and (port := self.wan_port(via_region, r, "etcd")) is not None:
                out.append(f"http://{HOST}:{port}")
        return out

    @property
    def wan_control(self) -> str:
        return str(self.data["wan_control"])

    @property
    def wan_control_or_none(self) -> str | None:
        """The WAN emulator's control URL; None before it started."""
        url = self.data.get("wan_control")
        return str(url) if url is not None else None

    @property
    def pg_root(self) -> Path | None:
        root = self.data.get("pg_root")
        return Path(root) if root else None

    @property
    def routers_started(self) -> bool:
        return bool(self.data.get("routers_started"))


def load_state(cluster_dir: Path) -> State:
    state = State.load(cluster_dir.resolve())
    if state is None:
        raise ClusterError(f"no local cluster in {cluster_dir.resolve()} (no {STATE_FILE})")
    return state
