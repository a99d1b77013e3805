"""Unauthenticated operational endpoints: health, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

import math

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.handlers.common import SERVED_BY_KEY, authorize, json_response
from router.resources import CACHE, CONFIG, METRICS, OPENAPI, RELAY_LAG, RTT, TOPOLOGY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "region": request.app[CONFIG].region})


async def readyz(request: web.Request) -> web.Response:
    """Ready when this router can route (topology loaded) and reach its region's Redis."""
    watcher = request.app[TOPOLOGY]
    cache_ok = await request.app[CACHE].ping()
    ready = watcher.loaded and cache_ok
    body = {
        "ready": ready,
        "region": request.app[CONFIG].region,
        "topology_revision": watcher.current.revision if watcher.loaded else None,
        "etcd_reachable": watcher.etcd_reachable,
        "cache_reachable": cache_ok,
    }
    return web.Response(
        status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json"
    )


async def metrics_response(app: web.Application) -> web.Response:
    """The Prometheus exposition of ``app`` (served on the admin listener, router.adminsite)."""
    m = app[METRICS]
    watcher = app[TOPOLOGY]
    if watcher.loaded:
        m.topology_revision.labels(m.region).set(watcher.current.revision)
        relay_lag = app[RELAY_LAG]
        for shard in watcher.current.shards.values():
            # The relay process's heartbeat as this router's read path sees it (NaN: unknown).
            lag = await relay_lag.lag(shard)
            m.invalidation_lag_seconds.labels(m.region, shard.name).set(
                math.nan if lag is None else lag
            )
    m.etcd_reachable.labels(m.region).set(1 if watcher.etcd_reachable else 0)
    resp = web.Response(body=m.exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


# The served document names the cluster's regions (home_region's enum): rendered once per
# topology revision, so the endpoint stays as cheap as the static bytes.
_rendered: dict[int, bytes] = {}


def _openapi_for(static: bytes, regions: list[str], revision: int) -> bytes:
    body = _rendered.get(revision)
    if body is None:
        doc = orjson.loads(static)
        create = doc["components"]["schemas"]["AccountCreate"]["properties"]
        create["home_region"] = {**create["home_region"], "enum": sorted(regions)}
        body = orjson.dumps(doc)
        _rendered.clear()  # only the current revision is ever asked for
        _rendered[revision] = body
    return body


async def openapi(request: web.Request) -> web.Response:
    request[SERVED_BY_KEY] = f"{request.app[CONFIG].region}/router"
    watcher = request.app[TOPOLOGY]
    body = request.app[OPENAPI]
    if watcher.loaded and watcher.current.regions:
        topo = watcher.current
        body = _openapi_for(body, list(topo.regions), topo.revision)
    return web.Response(body=body, content_type="application/json")


async def admin_status(request: web.Request) -> web.Response:
    """What this router sees (scope admin): topology, invalidation lag per shard, RTTs."""
    authorize(request, "admin")
    watcher = request.app[TOPOLOGY]
    relay_lag = request.app[RELAY_LAG]
    shards = watcher.current.shards if watcher.loaded else {}
    lag = {
        name: {"seconds": await relay_lag.lag(shards[name]), "bytes": relay_lag.lag_bytes(name)}
        for name in sorted(shards)
    }
    body = {
        "region": request.app[CONFIG].region,
        "topology_revision": watcher.current.revision if watcher.loaded else None,
        "etcd_reachable": watcher.etcd_reachable,
        "invalidation_lag": lag,
        "rtt": request.app[RTT].snapshot(),
    }
    return json_response(request, body, served_by="router")
