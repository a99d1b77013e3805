"""Typed application resources (``web.AppKey``) shared by middleware and handlers."""

from __future__ import annotations

from aiohttp import web

from consistency.topology import TopologyWatcher
from router.auth import Verifier
from router.cache import RegionCache
from router.config import RouterConfig
from router.metrics import Metrics
from router.relays.invalidation import InvalidationRelay
from router.routing import ShardRouter, StoreRegistry
from router.rtt import RttTable

CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", Metrics)
VERIFIER = web.AppKey("verifier", Verifier)
TOPOLOGY = web.AppKey("topology", TopologyWatcher)
STORES = web.AppKey("stores", StoreRegistry)
CACHE = web.AppKey("cache", RegionCache)
ROUTER = web.AppKey("router", ShardRouter)
OPENAPI = web.AppKey("openapi", bytes)
RTT = web.AppKey("rtt", RttTable)
# None when the router runs without replication credentials: cached reads then use the primary.
INVALIDATION: web.AppKey[InvalidationRelay | None] = web.AppKey("invalidation")
