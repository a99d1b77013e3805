"""Typed application resources (``web.AppKey``) shared by middleware and handlers."""

from __future__ import annotations

from aiohttp import web

from consistency.topology import TopologyWatcher
from router.auth import Verifier
from router.cache import RegionCache
from router.config import RouterConfig
from router.events.client import EventsClient
from router.freshness import RelayLag
from router.metrics import Metrics
from router.reads import ReadPolicy
from router.resolver import Resolver, StoreRegistry
from router.rtt import RttTable
from router.saga_step import InlineSettler
from router.writes import WritePath

CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", Metrics)
VERIFIER = web.AppKey("verifier", Verifier)
TOPOLOGY = web.AppKey("topology", TopologyWatcher)
STORES = web.AppKey("stores", StoreRegistry)
CACHE = web.AppKey("cache", RegionCache)
# The request paths: where accounts live, how reads are served, how writes are posted, and
# the saga's inline leg 2 (router.resolver, router.reads, router.writes, router.saga_step).
RESOLVER = web.AppKey("resolver", Resolver)
READS = web.AppKey("reads", ReadPolicy)
WRITES = web.AppKey("writes", WritePath)
SAGA = web.AppKey("saga", InlineSettler)
OPENAPI = web.AppKey("openapi", bytes)
RTT = web.AppKey("rtt", RttTable)
# The relay process's heartbeats as this router sees them (router.freshness).
RELAY_LAG = web.AppKey("relay_lag", RelayLag)
# Ledger events (router.events): this region's NATS client, connected on first use.
EVENTS = web.AppKey("events", EventsClient)
