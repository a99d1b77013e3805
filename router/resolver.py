"""Where an account lives: account -> slot -> shard -> primary and its fencing tokens.

One :class:`Resolver` per process, shared by the write path (``router.writes``), the read
policy (``router.reads``), the inline saga step (``router.saga_step``) and the relay process's
outbox relays (it is their ``router.relays.outbox.ShardResolver``). It holds the topology view
(a ``TopologyWatcher``), one connection pool per PostgreSQL node (:class:`StoreRegistry`), a
circuit breaker per remote primary, and times store calls. It knows nothing of HTTP: what it
cannot do is a ``router.outcomes`` value.

The router's topology may be stale; the stores are the authority (G5). When a store answers
``stale_epoch`` or ``wrong_shard`` the caller reloads the topology (:meth:`refresh_after`) and
tries once more, within the request's :class:`Deadline`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from psycopg.conninfo import make_conninfo

from consistency import ids
from consistency.errors import EtcdError, TopologyError
from consistency.topology import Node, Shard, Topology, TopologyWatcher
from regionstore.errors import StoreOutcomeUnknown, StoreUnavailable
from regionstore.store import ShardStore
from router.breaker import CircuitBreaker
from router.config import RouterConfig
from router.limits import POOL_MAX, POOL_MIN, POOL_OPEN_TIMEOUT_S, RETRY_AFTER_S
from router.metrics import Metrics
from router.outcomes import NothingWritten
from router.tracing import child_span

log = logging.getLogger(__name__)

T = TypeVar("T")


class Deadline:
    """A point in monotonic time that every step of one request shares."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


class StoreRegistry:
    """One connection pool per PostgreSQL node this router has routed to, opened lazily."""

    def __init__(self, config: RouterConfig, password: str, *, user: str | None = None) -> None:
        self._config = config
        self._password = password
        self._user = config.db_user if user is None else user
        self._stores: dict[str, ShardStore] = {}
        self._lock = asyncio.Lock()

    def _conninfo(self, node: Node) -> str:
        host, port = self._config.dial_address(node.host, node.port)
        # Key/value conninfo keeps the password out of any URL that a library might log;
        # make_conninfo quotes every value as libpq needs.
        return make_conninfo(
            host=host,
            port=port,
            dbname=self._config.db_name,
            user=self._user,
            password=self._password,
            application_name=f"txr-router-{self._config.region}",
            connect_timeout=5,
        )

    async def for_node(self, node: Node) -> ShardStore:
        store = self._stores.get(node.name)
        if store is not None:
            return store
        async with self._lock:
            store = self._stores.get(node.name)
            if store is None:
                store = ShardStore(
                    self._conninfo(node), name=node.name, pool_min=POOL_MIN, pool_max=POOL_MAX
                )
                await store.open(timeout_s=POOL_OPEN_TIMEOUT_S)
                self._stores[node.name] = store
        return store

    async def warm(self, topology: Topology) -> None:
        """Open pools to every primary now, so the first request does not pay the handshakes."""
        for shard in topology.shards.values():
            try:
                await self.for_node(shard.primary)
            except StoreUnavailable as exc:
                log.warning("primary %s not reachable yet: %s", shard.primary.name, exc)

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()


class Resolver:
    def __init__(
        self, watcher: TopologyWatcher, stores: StoreRegistry, metrics: Metrics, region: str
    ) -> None:
        self.watcher = watcher
        self.stores = stores
        self.metrics = metrics
        self.region = region
        # One per remote primary node (router.breaker); local nodes have none.
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def topology(self) -> Topology:
        return self.watcher.current

    # -- ShardResolver, for the outbox relays (router.relays.outbox) --------------------------

    def route_account(self, account_id: int) -> tuple[str, int, int]:
        shard, slot_epoch = self.topology.route(ids.account_slot(account_id))
        return shard.name, shard.epoch, slot_epoch

    def shard_epoch(self, shard: str) -> int:
        return self.topology.shards[shard].epoch

    async def store_for_shard(self, shard: str) -> ShardStore:
        return await self.stores.for_node(self.topology.shards[shard].primary)

    async def refresh(self) -> None:
        await self.watcher.refresh(newer_than=self.topology.revision)

    # -- the request paths ------------------------------------------------------------------

    async def refresh_after(self, seen_revision: int) -> None:
        """Reload the topology past ``seen_revision`` (after a fence refusal)."""
        try:
            await self.watcher.refresh(newer_than=seen_revision)
        except (EtcdError, TopologyError) as exc:
            # Without etcd we cannot learn the new map; the client retries shortly.
            raise NothingWritten(
                "the shard is changing hands and the topology cannot be refreshed",
                retry_after_s=RETRY_AFTER_S,
            ) from exc

    async def timed(self, shard: str, op: str, call: Awaitable[T]) -> T:
        """Await a store call with its span, latency and error counts."""
        start = time.perf_counter()
        with child_span(f"store.{op}", {"txr.shard": shard}):
            try:
                return await call
            except StoreUnavailable:
                self.metrics.store_errors.labels(self.region, shard, "unavailable").inc()
                raise
            except StoreOutcomeUnknown:
                self.metrics.store_errors.labels(self.region, shard, "outcome_unknown").inc()
                raise
            finally:
                self.metrics.store_latency.labels(self.region, shard, op).observe(
                    time.perf_counter() - start
                )

    def store_error(self, shard: str, kind: str) -> None:
        self.metrics.store_errors.labels(self.region, shard, kind).inc()

    # -- circuit breakers (router.breaker) --------------------------------------------------

    def breaker(self, node: Node) -> CircuitBreaker | None:
        if node.region == self.region:
            return None  # the local failure modes have their own handling (failover buffer)
        breaker = self._breakers.get(node.name)
        if breaker is None:
            breaker = self._breakers[node.name] = CircuitBreaker()
        return breaker

    def circuit_open(self, shard: Shard, breaker: CircuitBreaker | None) -> NothingWritten | None:
        """The refusal to answer at once when ``shard``'s remote primary is behind an open
        breaker (nothing was sent), else None (and, half-open, this call is the probe)."""
        if breaker is None or breaker.allow():
            return None
        self.store_error(shard.name, "circuit_open")
        return NothingWritten(
            f"shard {shard.name}'s primary in {shard.primary.region} is not reachable from "
            f"{self.region}; nothing was sent",
            retry_after_s=breaker.retry_after_s(),
        )

    @staticmethod
    def record(
        breaker: CircuitBreaker | None, exc: BaseException | None, deadline: Deadline
    ) -> None:
        """An answer closes the breaker; failing to reach the node counts against it, unless
        the caller's own deadline ran out (a short Request-Timeout says nothing of the node)."""
        if breaker is None:
            return
        if exc is None:
            breaker.success()
        elif isinstance(exc, StoreUnavailable) and not deadline.expired():
            breaker.failure()
