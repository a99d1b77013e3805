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
# The relay process's heartbeats as this router sees them (router.freshness).
RELAY_LAG = web.AppKey("relay_lag", RelayLag)
# Ledger events (router.events): this region's NATS client, connected on first use.
EVENTS = web.AppKey("events", EventsClient)
