"""``cluster.json``, the local cluster's state, and its typed reading.

The launcher (``infra.local.cluster``) writes the document as it starts each process and the
failover operations (``infra.failover``) record role changes in it; everyone else reads it
through :class:`State`'s typed accessors (:class:`Proc`, :class:`PgNode`, the ports, the
regions) instead of re-deriving them from the raw dictionary. The file stays plain JSON with
the same keys, so a cluster started by an older checkout is still read (and ``txr local status
--json`` is unchanged).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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

    def add_proc(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.data.setdefault("procs", []).append(entry)
        self.save()

    def add_pg(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.data.setdefault("pg", []).append(entry)
        self.save()

    def set_proc_pid(self, name: str, pid: int) -> None:
        """A recorded process runs again under ``pid`` (infra.local.control.restart)."""
        self._set_pid("procs", "name", name, pid)

    def set_pg_pid(self, node: str, pid: int) -> None:
        """A PostgreSQL node runs again under ``pid``."""
        self._set_pid("pg", "node", node, pid)

    def _set_pid(self, section: str, key: str, name: str, pid: int) -> None:
        with self._lock:
            entry = next(e for e in self.data.get(section, []) if e[key] == name)
            entry["pid"] = pid
        self.save()

    # -- typed reading ----------------------------------------------------------------------

    @property
    def regions(self) -> list[str]:
        return list(self.data["regions"])

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
