"""Every port of a local cluster, derived from one base port (a pure function, no I/O).

Layout (API.md promises at most 100 consecutive ports):

- ``P + 20*i + k`` for region ``i``: router (0), redis (1), etcd client (2), etcd peer, the real
  one the member listens on (3), PostgreSQL primary of the home shard (4), PostgreSQL standby of
  the next region's shard (5), the router's admin listener (/metrics, 6), the relay process's
  metrics (7). 20 per region leaves room for more services per region later.
- ``P + 60 ..``: the WAN emulator: the control port first, then one etcd peer front per member
  (the member's advertised peer URL), then one listener per (source region, remote service),
  then one per (source region, remote Redis): the change feed writes every region's Redis from
  the region of a shard's primary (added after the others so that their ports did not move);
  then one per (source region, remote NATS route port): the NATS cluster's routes cross the WAN
  like every other cross-region link (infra.local.nats).
- NATS per region: client (8), route (9), HTTP monitor (10), inside the region's block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

PORT_SPAN_MAX: Final = 100
REGION_STRIDE: Final = 20
WAN_OFFSET: Final = 60
# Three regions fill 0..59; the WAN block after them holds what is left of the 100.
REGION_COUNT_MAX: Final = WAN_OFFSET // REGION_STRIDE
REGION_COUNT_MIN: Final = 2

OFF_ROUTER: Final = 0
OFF_REDIS: Final = 1
OFF_ETCD_CLIENT: Final = 2
OFF_ETCD_PEER: Final = 3
OFF_PG_PRIMARY: Final = 4
OFF_PG_STANDBY: Final = 5
OFF_ROUTER_ADMIN: Final = 6
OFF_RELAY_METRICS: Final = 7
OFF_NATS_CLIENT: Final = 8
OFF_NATS_ROUTE: Final = 9
OFF_NATS_MONITOR: Final = 10

# Remote services a region reaches through its side of the WAN: the two PostgreSQL servers of
# every other region (its primary and the standby it hosts), its etcd member and its router.
REMOTE_SERVICES: Final = ("pg-primary", "pg-standby", "etcd", "router")
# Remote services only the relay process dials: every other region's Redis (the change feed).
FEED_SERVICES: Final = ("redis",)
# Remote services only the NATS servers dial: every other region's route port.
NATS_SERVICES: Final = ("nats-route",)


@dataclass(frozen=True)
class RegionPorts:
    router: int
    redis: int
    etcd_client: int
    etcd_peer: int
    pg_primary: int
    pg_standby: int
    router_admin: int
    relay_metrics: int
    nats_client: int
    nats_route: int
    nats_monitor: int

    def service(self, name: str) -> int:
        return {
            "pg-primary": self.pg_primary,
            "pg-standby": self.pg_standby,
            "etcd": self.etcd_client,
            "router": self.router,
            "redis": self.redis,
            "nats-route": self.nats_route,
        }[name]


@dataclass(frozen=True)
class PortPlan:
    base: int
    regions: tuple[str, ...]
    region: dict[str, RegionPorts]
    wan_control: int
    # region -> the WAN front that is this member's advertised etcd peer URL.
    etcd_peer_front: dict[str, int]
    # (source region, destination region, service) -> WAN listener port.
    wan: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def all_ports(self) -> list[int]:
        ports: list[int] = []
        for rp in self.region.values():
            ports += [
                rp.router,
                rp.redis,
                rp.etcd_client,
                rp.etcd_peer,
                rp.pg_primary,
                rp.pg_standby,
                rp.router_admin,
                rp.relay_metrics,
                rp.nats_client,
                rp.nats_route,
                rp.nats_monitor,
            ]
        ports.append(self.wan_control)
        ports += self.etcd_peer_front.values()
        ports += self.wan.values()
        return ports


def plan_ports(base: int, regions: tuple[str, ...] | list[str]) -> PortPlan:
    """The port plan of a cluster of ``regions`` starting at ``base``."""
    names = tuple(regions)
    if not REGION_COUNT_MIN <= len(names) <= REGION_COUNT_MAX:
        raise ValueError(
            f"a local cluster has {REGION_COUNT_MIN} to {REGION_COUNT_MAX} regions, "
            f"got {len(names)}"
        )
    if len(set(names)) != len(names):
        raise ValueError("region names must be distinct")
    if not 1024 <= base <= 65535 - PORT_SPAN_MAX:
        raise ValueError(f"base port must be between 1024 and {65535 - PORT_SPAN_MAX}")
    region: dict[str, RegionPorts] = {}
    for i, name in enumerate(names):
        b = base + REGION_STRIDE * i
        region[name] = RegionPorts(
            router=b + OFF_ROUTER,
            redis=b + OFF_REDIS,
            etcd_client=b + OFF_ETCD_CLIENT,
            etcd_peer=b + OFF_ETCD_PEER,
            pg_primary=b + OFF_PG_PRIMARY,
            pg_standby=b + OFF_PG_STANDBY,
            router_admin=b + OFF_ROUTER_ADMIN,
            relay_metrics=b + OFF_RELAY_METRICS,
            nats_client=b + OFF_NATS_CLIENT,
            nats_route=b + OFF_NATS_ROUTE,
            nats_monitor=b + OFF_NATS_MONITOR,
        )
    nxt = base + WAN_OFFSET
    wan_control = nxt
    nxt += 1
    fronts: dict[str, int] = {}
    for name in names:
        fronts[name] = nxt
        nxt += 1
    wan: dict[tuple[str, str, str], int] = {}
    for src in names:
        for dst in names:
            if src == dst:
                continue
            for svc in REMOTE_SERVICES:
                wan[(src, dst, svc)] = nxt
                nxt += 1
    for svc in (*FEED_SERVICES, *NATS_SERVICES):
        for src in names:
            for dst in names:
                if src != dst:
                    wan[(src, dst, svc)] = nxt
                    nxt += 1
    if nxt - base > PORT_SPAN_MAX:
        raise ValueError(f"{len(names)} regions need {nxt - base} ports, more than {PORT_SPAN_MAX}")
    return PortPlan(
        base=base,
        regions=names,
        region=region,
        wan_control=wan_control,
        etcd_peer_front=fronts,
        wan=wan,
    )
