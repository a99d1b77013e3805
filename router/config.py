"""The router's configuration: one JSON file per router process, written by the launcher.

Everything a router needs to find its region's stores and the control plane. Secrets (the DB
password) sit in files with mode 0600 and are never logged. The router holds no signing key: it
verifies tokens with the public key set at ``jwks_file`` (router.auth), re-read when it changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from router.limits import ROUTER_WORKERS, ROUTER_WORKERS_MAX


@dataclass(frozen=True)
class RouterConfig:
    region: str
    host: str
    port: int
    # etcd client URLs, this region's member first (the others are reached across the WAN).
    etcd_endpoints: tuple[str, ...]
    # Canonical "host:port" of a remote service (as stored in the topology) -> the "host:port"
    # this region dials to reach it. The local cluster routes cross-region traffic through its
    # WAN emulator this way; a real deployment leaves it empty.
    dial: Mapping[str, str]
    db_user: str
    db_password_file: Path
    db_name: str
    redis_url: str
    # The public JWT key set (JWKS); the private keys stay with the operator (infra.keys).
    jwks_file: Path
    jwt_issuer: str = "txr-local"
    jwt_audience: str = "txrouter"
    # Operator tokens: their own audience, so no tenant token ever passes an admin check.
    jwt_admin_audience: str = "txrouter-admin"
    # Per-region router URLs as dialled from this region (RTT probes, forwarding).
    peer_routers: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    # The change feed's role (REPLICATION: logical decoding). Optional so that configs
    # written before the relay still load; without a password file the relay does not run.
    repl_user: str = "txr_repl"
    repl_password_file: Path | None = None
    # Router worker processes of this region sharing ``port`` (SO_REUSEPORT), each started by
    # the launcher as ``python -m router --config FILE --worker I``; see limits.ROUTER_WORKERS.
    workers: int = ROUTER_WORKERS
    # The admin listener (GET /metrics) on its own port, for scrapers on the operator's
    # network; never on the public port. None: no admin listener.
    admin_port: int | None = None
    # The change feed writes every region's Redis: region -> Redis URL as dialled from this
    # region (a remote one through the WAN emulator locally). Empty: only this region's.
    feed_redis: Mapping[str, str] = field(default_factory=dict)
    # The relay process (python -m router.relays) serves its metrics here; None: not served.
    relay_metrics_port: int | None = None
    # The relays' DB role: the only one that may run leg 2 and the settle (sql/functions/
    # saga.sql). The relay process connects as it; a router uses it only for its inline leg 2
    # delivery (without the file it leaves every transfer to the relays).
    relay_user: str = "txr_relay"
    relay_password_file: Path | None = None
    # NATS servers (JetStream) of the ledger events, this region's first. Empty: no events
    # (the decoder then holds no publisher position, the events API answers 503).
    nats_urls: tuple[str, ...] = ()
    # Webhook URLs may resolve to loopback addresses: a local cluster only (API.md).
    webhooks_allow_loopback: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= ROUTER_WORKERS_MAX:
            raise ValueError(f"workers must be within 1..{ROUTER_WORKERS_MAX}")

    def dial_address(self, host: str, port: int) -> tuple[str, int]:
        mapped = self.dial.get(f"{host}:{port}")
        if mapped is None:
            return host, port
        h, _, p = mapped.rpartition(":")
        return h, int(p)

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "host": self.host,
            "port": self.port,
            "etcd_endpoints": list(self.etcd_endpoints),
            "dial": dict(self.dial),
            "db_user": self.db_user,
            "db_password_file": str(self.db_password_file),
            "db_name": self.db_name,
            "redis_url": self.redis_url,
            "jwks_file": str(self.jwks_file),
            "jwt_issuer": self.jwt_issuer,
            "jwt_audience": self.jwt_audience,
            "jwt_admin_audience": self.jwt_admin_audience,
            "peer_routers": dict(self.peer_routers),
            "log_level": self.log_level,
            "repl_user": self.repl_user,
            "repl_password_file": (
                str(self.repl_password_file) if self.repl_password_file is not None else None
            ),
            "workers": self.workers,
            "admin_port": self.admin_port,
            "feed_redis": dict(self.feed_redis),
            "relay_metrics_port": self.relay_metrics_port,
            "relay_user": self.relay_user,
            "relay_password_file": (
                str(self.relay_password_file) if self.relay_password_file is not None else None
            ),
            "nats_urls": list(self.nats_urls),
            "webhooks_allow_loopback": self.webhooks_allow_loopback,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RouterConfig:
        return cls(
            region=str(d["region"]),
            host=str(d["host"]),
            port=int(d["port"]),
            etcd_endpoints=tuple(str(e) for e in d["etcd_endpoints"]),
            dial={str(k): str(v) for k, v in d.get("dial", {}).items()},
            db_user=str(d["db_user"]),
            db_password_file=Path(d["db_password_file"]),
            db_name=str(d.get("db_name", "txr")),
            redis_url=str(d["redis_url"]),
            jwks_file=Path(d["jwks_file"]),
            jwt_issuer=str(d.get("jwt_issuer", "txr-local")),
            jwt_audience=str(d.get("jwt_audience", "txrouter")),
            jwt_admin_audience=str(d.get("jwt_admin_audience", "txrouter-admin")),
            peer_routers={str(k): str(v) for k, v in d.get("peer_routers", {}).items()},
            log_level=str(d.get("log_level", "INFO")),
            repl_user=str(d.get("repl_user", "txr_repl")),
            repl_password_file=(
                Path(d["repl_password_file"]) if d.get("repl_password_file") else None
            ),
            workers=int(d.get("workers", ROUTER_WORKERS)),
            admin_port=int(d["admin_port"]) if d.get("admin_port") is not None else None,
            feed_redis={str(k): str(v) for k, v in d.get("feed_redis", {}).items()},
            relay_metrics_port=(
                int(d["relay_metrics_port"]) if d.get("relay_metrics_port") is not None else None
            ),
            relay_user=str(d.get("relay_user", "txr_relay")),
            relay_password_file=(
                Path(d["relay_password_file"]) if d.get("relay_password_file") else None
            ),
            nats_urls=tuple(str(u) for u in d.get("nats_urls", ())),
            webhooks_allow_loopback=bool(d.get("webhooks_allow_loopback", False)),
        )

    @classmethod
    def load(cls, path: Path) -> RouterConfig:
        return cls.from_json(orjson.loads(path.read_bytes()))

    def save(self, path: Path) -> None:
        path.write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))
        path.chmod(0o600)
