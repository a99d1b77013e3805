"""One region's relays as a unit: what ``python -m router.relays`` runs, and what tests start.

For the region of its ``RouterConfig``: the invalidation relay (every shard of the topology ->
this region's Redis, publishing the heartbeats the routers' freshness guard reads) and one
outbox relay per shard homed in the region. The routers run none of this: a relay process can
be killed and restarted alone, and its CPU is not taken from the request path's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from consistency.etcd import EtcdClient
from consistency.topology import TopologyWatcher
from router.cache import RegionCache
from router.config import RouterConfig
from router.limits import TOPOLOGY_INITIAL_TIMEOUT_S
from router.metrics import Metrics
from router.relays.invalidation import InvalidationRelay
from router.routing import ShardRouter, StoreRegistry

log = logging.getLogger(__name__)


class RelayService:
    """Start with ``async with RelayService(config):``; everything stops on exit."""

    def __init__(self, config: RouterConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.region)
        self.invalidation: InvalidationRelay | None = None
        self._etcd: EtcdClient | None = None
        self._watcher: TopologyWatcher | None = None
        self._cache: RegionCache | None = None
        self._stores: StoreRegistry | None = None
        self._resolver: ShardRouter | None = None
        self._stop = asyncio.Event()
        self._outbox: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        config = self.config
        self._etcd = EtcdClient(config.etcd_endpoints)
        self._watcher = TopologyWatcher(self._etcd)
        await self._watcher.start(initial_timeout_s=TOPOLOGY_INITIAL_TIMEOUT_S)
        self._cache = RegionCache(config.redis_url, self.metrics)
        self._stores = StoreRegistry(config, config.db_password_file.read_text().strip())
        # The router's resolver (topology + pools) serves the outbox relays as it serves the
        # router's inline deliveries; this one never sees a request.
        self._resolver = ShardRouter(self._watcher, self._stores, self.metrics, config.region)
        await self._stores.warm(self._watcher.current)
        if config.repl_password_file is not None:
            self.invalidation = InvalidationRelay.from_config(
                config, self._watcher, self._cache, self.metrics
            )
            self.invalidation.start()
        else:
            log.warning("no replication credentials: invalidation relay off, reads use primaries")
        resolver = self._resolver
        self._outbox = [
            asyncio.create_task(
                resolver.relay_for(shard.name).run(self._stop), name=f"outbox-{shard.name}"
            )
            for shard in self._watcher.current.shards_homed_in(config.region)
        ]
        log.info(
            "relays of %s running: invalidation %s, outbox for %s",
            config.region,
            "on" if self.invalidation is not None else "off",
            [t.get_name() for t in self._outbox],
        )

    async def stop(self) -> None:
        self._stop.set()
        if self.invalidation is not None:
            await self.invalidation.stop()
        for task in self._outbox:
            task.cancel()
        await asyncio.gather(*self._outbox, return_exceptions=True)
        self._outbox.clear()
        if self._resolver is not None:
            await self._resolver.close()
        if self._stores is not None:
            await self._stores.close()
        if self._cache is not None:
            await self._cache.close()
        if self._watcher is not None:
            await self._watcher.stop()
        if self._etcd is not None:
            await self._etcd.close()

    async def __aenter__(self) -> RelayService:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
