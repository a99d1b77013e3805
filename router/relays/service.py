"""One region's relays as a unit: what ``python -m router.relays`` runs, and what tests start.

For every shard whose *current* primary is in the region of its ``RouterConfig``: the shard's
change feed (``router.relays.feed``: its decoder, fanned out to every region's Redis, with the
heartbeats the routers' freshness guard reads) and its outbox relay (``router.relays.outbox``).
The service follows the topology (etcd watch), so after a failover or switchover, made by an
operator or by a controller, the new primary's region starts both and the old one stops them;
nobody has to tell the relays. The routers run none of this: a relay process can be killed and
restarted alone, and its CPU is not taken from the request path's event loop.

Its metrics (feed lag per target region in seconds and bytes, batch sizes, restarts, resets,
outbox deliveries) are served on ``RouterConfig.relay_metrics_port`` at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from aiohttp import web
from psycopg.conninfo import make_conninfo

from consistency.etcd import EtcdClient
from consistency.topology import Shard, TopologyWatcher
from router.config import RouterConfig
from router.events.jetstream import JetStreamPublisher
from router.events.publisher import EventSink, Publisher
from router.feedsink import RegionSink
from router.limits import TOPOLOGY_INITIAL_TIMEOUT_S
from router.metrics import Metrics
from router.relays.feed import ShardFeed
from router.relays.outbox import OutboxRelay
from router.resolver import Resolver, StoreRegistry

log = logging.getLogger(__name__)

# The supervisor wakes on every topology change (etcd watch); this long timeout is only a
# safety net in case a change notification was missed (a watch that reconnected), and costs one
# in-memory comparison per shard.
SUPERVISE_SAFETY_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5
# TCP keepalives on the replication connection: a primary that vanished (region down) is
# noticed in about 10 s, not at the kernel's two hours.
KEEPALIVES_IDLE_S: Final = 5
KEEPALIVES_INTERVAL_S: Final = 2
KEEPALIVES_COUNT: Final = 3


@dataclass
class _Running:
    feed: ShardFeed | None
    feed_task: asyncio.Task[None] | None
    outbox_task: asyncio.Task[None]
    outbox_stop: asyncio.Event
    primary: str
    epoch: int


class RelayService:
    """Start with ``async with RelayService(config):``; everything stops on exit."""

    def __init__(self, config: RouterConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.region)
        self.feeds: dict[str, ShardFeed] = {}
        self._etcd: EtcdClient | None = None
        self._watcher: TopologyWatcher | None = None
        self._stores: StoreRegistry | None = None
        self._resolver: Resolver | None = None
        self._outbox_relays: dict[str, OutboxRelay] = {}
        self._sinks: dict[str, RegionSink] = {}
        self._running: dict[str, _Running] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._repl_password: str | None = None
        # Set when a shard's feed or outbox task ends: the supervisor restarts or retires it.
        self._kick = asyncio.Event()
        # Ledger events: one publisher (one NATS connection) for every shard decoder here.
        self.publisher: Publisher | None = None
        self._webhooks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self.config
        self._etcd = EtcdClient(config.etcd_endpoints)
        self._watcher = TopologyWatcher(self._etcd)
        await self._watcher.start(initial_timeout_s=TOPOLOGY_INITIAL_TIMEOUT_S)
        # The relays' own role (leg 2, settle, the outbox queue; and the application role's
        # reads, of which it is a member). Without its password file (a config written before
        # it existed) the application role, which the saga steps now refuse.
        if config.relay_password_file is not None:
            self._stores = StoreRegistry(
                config, config.relay_password_file.read_text().strip(), user=config.relay_user
            )
        else:
            log.error("no relay credentials: the saga steps will be refused")
            self._stores = StoreRegistry(config, config.db_password_file.read_text().strip())
        # The router's resolver (topology + pools) serves the outbox relays as it serves the
        # router's inline deliveries.
        self._resolver = Resolver(self._watcher, self._stores, self.metrics, config.region)
        await self._stores.warm(self._watcher.current)
        if config.repl_password_file is not None:
            self._repl_password = config.repl_password_file.read_text().strip()
            urls = dict(config.feed_redis) or {config.region: config.redis_url}
            urls.setdefault(config.region, config.redis_url)
            self._sinks = {region: RegionSink(region, url) for region, url in urls.items()}
        else:
            log.warning("no replication credentials: change feed off, reads use primaries")
        if config.nats_urls:
            self.publisher = JetStreamPublisher(
                config.nats_urls, name=f"txr-events-{config.region}"
            )
            # Imported here: the delivery worker's HTTP client is only needed with NATS.
            from router.events.webhooks import DeliveryWorker

            worker = DeliveryWorker(config, self.metrics)
            self._webhooks = asyncio.create_task(worker.run(), name="webhooks")
        if config.relay_metrics_port is not None:
            await self._serve_metrics(config.relay_metrics_port)
        self._supervise_once()
        self._supervisor = asyncio.create_task(self._supervise(), name="relays-supervisor")

    async def _serve_metrics(self, port: int) -> None:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.exposition(), content_type="text/plain", charset="utf-8"
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        await web.TCPSite(self._metrics_runner, self.config.host, port).start()

    def conninfo(self, shard: Shard) -> str:
        """The shard's current primary for the replication role, through the dial mapping."""
        config = self.config
        assert self._repl_password is not None
        host, port = config.dial_address(shard.primary.host, shard.primary.port)
        return make_conninfo(
            host=host,
            port=port,
            dbname=config.db_name,
            user=config.repl_user,
            password=self._repl_password,
            application_name=f"txr-feed-{config.region}",
            connect_timeout=CONNECT_TIMEOUT_S,
            keepalives=1,
            keepalives_idle=KEEPALIVES_IDLE_S,
            keepalives_interval=KEEPALIVES_INTERVAL_S,
            keepalives_count=KEEPALIVES_COUNT,
        )

    async def _supervise(self) -> None:
        assert self._watcher is not None
        while True:
            changed = asyncio.ensure_future(self._watcher.wait_changed(SUPERVISE_SAFETY_S))
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({changed, kicked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                kicked.cancel()
            self._kick.clear()
            self._supervise_once()

    def _supervise_once(self) -> None:
        """Run the feed and the outbox relay of exactly the shards whose primary is here."""
        assert self._watcher is not None
        assert self._resolver is not None
        topo = self._watcher.current
        mine = {s.name: s for s in topo.shards.values() if s.primary.region == self.config.region}
        for name, run in list(self._running.items()):
            shard = mine.get(name)
            feed_done = run.feed_task is not None and run.feed_task.done()
            if (
                shard is None
                or shard.primary.name != run.primary
                or shard.epoch != run.epoch
                or feed_done
                or run.outbox_task.done()
            ):
                self._stop_shard(name)
        for name, shard in mine.items():
            if name in self._running:
                continue
            feed: ShardFeed | None = None
            feed_task: asyncio.Task[None] | None = None
            if self._sinks:
                feed = ShardFeed(
                    name,
                    region=self.config.region,
                    topology=self._watcher,
                    sinks=self._sinks,
                    conninfo=self.conninfo,
                    store_for=self._resolver.store_for_shard,
                    metrics=self.metrics,
                    events=(
                        EventSink(
                            self.publisher,
                            shard=name,
                            region=self.config.region,
                            home_region=shard.home_region,
                            metrics=self.metrics,
                            store=functools.partial(self._resolver.store_for_shard, name),
                        )
                        if self.publisher is not None
                        else None
                    ),
                )
                feed_task = asyncio.create_task(feed.run(), name=f"feed-{name}")
                feed_task.add_done_callback(self._ended)
                self.feeds[name] = feed
            stop = asyncio.Event()
            outbox = asyncio.create_task(self._outbox_relay(name).run(stop), name=f"outbox-{name}")
            outbox.add_done_callback(self._ended)
            self._running[name] = _Running(
                feed, feed_task, outbox, stop, shard.primary.name, shard.epoch
            )
            log.info("relays of %s: running feed and outbox of %s", self.config.region, name)

    def _outbox_relay(self, shard: str) -> OutboxRelay:
        """One per source shard for the process's life (a restarted shard keeps its relay)."""
        relay = self._outbox_relays.get(shard)
        if relay is None:
            assert self._resolver is not None
            relay = OutboxRelay(
                shard, self._resolver, region=self.config.region, metrics=self.metrics
            )
            self._outbox_relays[shard] = relay
        return relay

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("relays: %s died", task.get_name(), exc_info=task.exception())
        self._kick.set()

    def _stop_shard(self, name: str) -> None:
        run = self._running.pop(name)
        self.feeds.pop(name, None)
        run.outbox_stop.set()
        if run.feed_task is not None:
            run.feed_task.cancel()
        log.info("relays of %s: stopped feed and outbox of %s", self.config.region, name)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        tasks: list[asyncio.Task[None]] = []
        for run in self._running.values():
            run.outbox_stop.set()
            if run.feed_task is not None:
                run.feed_task.cancel()
                tasks.append(run.feed_task)
            tasks.append(run.outbox_task)
        if self._webhooks is not None:
            self._webhooks.cancel()
            tasks.append(self._webhooks)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.publisher is not None:
            await self.publisher.close()
        self._running.clear()
        self.feeds.clear()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        for sink in self._sinks.values():
            await sink.close()
        if self._stores is not None:
            await self._stores.close()
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
