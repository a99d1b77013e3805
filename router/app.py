"""The aiohttp application factory: resources in cleanup contexts, one error middleware.

``create_app(config)`` is what ``python -m router`` serves and what tests build. Every shared
resource is a typed ``web.AppKey`` (``router.resources``); startup and cleanup of each are paired
in one cleanup context, in dependency order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources as importlib_resources

import aiohttp
import orjson
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler

from consistency.etcd import EtcdClient
from consistency.topology import Node, TopologyWatcher
from router import adminsite, ratelimit, rtt
from router.auth import KeySetFile, Verifier
from router.cache import RegionCache
from router.config import RouterConfig
from router.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    RegionUnavailable,
    from_outcome,
    problem_response,
)
from router.events.client import EventsClient
from router.freshness import RelayLag
from router.handlers import accounts, events, ops, transfers
from router.handlers.common import SERVED_BY_KEY
from router.limits import (
    ACCESS_LOG_LINES_PER_S_MAX,
    ACCESS_LOG_SLOW_MS,
    BODY_BYTES_MAX,
    GC_GEN0_THRESHOLD,
    TOPOLOGY_INITIAL_TIMEOUT_S,
    TRANSFER_BATCH_BODY_BYTES_MAX,
)
from router.logs import request_id_var
from router.metrics import Metrics
from router.outcomes import RouteOutcome
from router.reads import ReadPolicy
from router.resolver import Resolver, StoreRegistry
from router.resources import (
    CACHE,
    CONFIG,
    EVENTS,
    METRICS,
    OPENAPI,
    READS,
    RELAY_LAG,
    RESOLVER,
    RTT,
    SAGA,
    STORES,
    TOPOLOGY,
    VERIFIER,
    WRITES,
)
from router.saga_step import InlineSettler
from router.tracing import request_span, setup_tracing, tracing_enabled
from router.writes import WritePath

log = logging.getLogger("router")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._\-]{1,64}")
# Request ids: a random per-process prefix and a counter (0.5 us; uuid4 was 4-6 us per request).
# Unique across workers and restarts by the prefix, never reused within a process.
_RID_PREFIX = uuid.uuid4().hex[:12]
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_RID_PREFIX}-{next(_rid_counter):x}"


_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def _map_http_exception(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return NotFound("no such route")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed on this route")
    if exc.status == 413:
        return PayloadTooLarge(f"request body exceeds {BODY_BYTES_MAX} bytes")
    return BadRequest("the request could not be processed")


class _LineBudget:
    """At most ``per_s`` lines per wall-clock second; counts the ones it refuses."""

    __slots__ = ("_count", "_per_s", "_second", "_skipped")

    def __init__(self, per_s: int) -> None:
        self._per_s = per_s
        self._second = 0
        self._count = 0
        self._skipped = 0

    def take(self) -> int | None:
        """None: skip this line. Else the number of lines skipped since the last one."""
        now = int(time.monotonic())
        if now != self._second:
            self._second = now
            self._count = 0
        if self._count >= self._per_s:
            self._skipped += 1
            return None
        self._count += 1
        skipped, self._skipped = self._skipped, 0
        return skipped


_ACCESS_BUDGET = _LineBudget(ACCESS_LOG_LINES_PER_S_MAX)


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, span, metrics, access log, and the mapping of every error to problem+json.

    No exception leaves as a 500: an unexpected failure during a write is reported as
    ``outcome_unknown`` (the router cannot prove nothing was written), during a read as
    ``region_unavailable``; either way it is logged with the request id for the operator.
    """
    rid_in = request.headers.get("X-Request-Id")
    rid = rid_in if rid_in and _REQUEST_ID_RE.fullmatch(rid_in) else new_request_id()
    token = request_id_var.set(rid)
    config = request.app[CONFIG]
    metrics = request.app[METRICS]
    route = _route_label(request)
    start = time.perf_counter()
    resp: web.StreamResponse
    # No span at all while nothing records spans (an unrecorded one still cost ~4.5 us).
    with (
        request_span(
            f"{request.method} {route}",
            {"http.method": request.method, "http.route": route, "txr.request_id": rid},
        )
        if tracing_enabled()
        else contextlib.nullcontext()
    ) as span:
        try:
            resp = await handler(request)
        except ApiError as err:
            resp = problem_response(err)
        except RouteOutcome as out:
            # Handlers map the paths' outcomes themselves (so the rate limiter's middleware
            # sees the status); one that slips through still gets its own status, not a 5xx.
            resp = problem_response(from_outcome(out))
        except web.HTTPException as exc:
            resp = problem_response(_map_http_exception(exc))
            if isinstance(exc, web.HTTPMethodNotAllowed):
                # RFC 9110 section 15.5.6: a 405 names the methods the resource supports.
                resp.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        except Exception:
            log.exception("unhandled error", extra={"fields": {"route": route}})
            unexpected: ApiError
            if request.method in _WRITE_METHODS:
                unexpected = OutcomeUnknown(
                    "the router failed while handling this write; retry with "
                    "the same Idempotency-Key to learn its outcome"
                )
            else:
                unexpected = RegionUnavailable("the router could not complete this read")
            resp = problem_response(unexpected)
        if span is not None:
            span.set_attribute("http.status_code", resp.status)
        elapsed = time.perf_counter() - start
        resp.headers["X-Request-Id"] = rid
        resp.headers["X-Served-By"] = request.get(SERVED_BY_KEY, f"{config.region}/router")
        count, latency = metrics.request_children(route, request.method, resp.status)
        count.inc()
        latency.observe(elapsed)
        # Every request is counted and timed above; the log line is for the ones an operator
        # must look at (refused, failed or slow): a line per success cost about 6% of the
        # router's CPU under load. Successes still log at DEBUG.
        ms = elapsed * 1000
        level = logging.INFO if resp.status >= 400 or ms >= ACCESS_LOG_SLOW_MS else logging.DEBUG
        if log.isEnabledFor(level) and (suppressed := _ACCESS_BUDGET.take()) is not None:
            fields: dict[str, object] = {
                "method": request.method,
                "route": route,
                "status": resp.status,
                "ms": round(ms, 3),
            }
            if suppressed:
                fields["suppressed"] = suppressed
            # Logged inside the span so the line carries the trace id.
            log.log(level, "request", extra={"fields": fields})
    request_id_var.reset(token)
    return resp


def _load_openapi() -> bytes:
    text = importlib_resources.files("router").joinpath("openapi.yaml").read_text()
    return orjson.dumps(yaml.safe_load(text))


async def _topology_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = EtcdClient(config.etcd_endpoints)
    watcher = TopologyWatcher(client)
    # confirm: the read path's epoch lease (ReadPolicy.require_confirmed).
    await watcher.start(initial_timeout_s=TOPOLOGY_INITIAL_TIMEOUT_S, confirm=True)
    app[TOPOLOGY] = watcher
    yield
    await watcher.stop()
    await client.close()


async def _stores_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    password = config.db_password_file.read_text().strip()
    stores = StoreRegistry(config, password)
    # Leg 2 of the inline delivery runs as the relays' role (the application role may not);
    # its pools open on first use.
    saga_stores = None
    if config.relay_password_file is not None:
        relay_password = config.relay_password_file.read_text().strip()
        saga_stores = StoreRegistry(config, relay_password, user=config.relay_user)
    app[STORES] = stores
    resolver = Resolver(app[TOPOLOGY], stores, app[METRICS], config.region)
    reads = ReadPolicy(resolver, app[CACHE], app[RELAY_LAG], app[RTT], config.region)
    app[RESOLVER] = resolver
    app[READS] = reads
    app[WRITES] = WritePath(resolver, reads, app[CACHE], app[METRICS])
    # The saga step resolves through the relays' pools (leg 2 and the settle run as that role).
    app[SAGA] = InlineSettler(
        Resolver(app[TOPOLOGY], saga_stores, app[METRICS], config.region)
        if saga_stores is not None
        else None,
        app[METRICS],
        config.region,
    )
    await stores.warm(app[TOPOLOGY].current)
    yield
    # Drain batches and inline deliveries before the pools they use close.
    await app[WRITES].close()
    await app[SAGA].close()
    await stores.close()
    if saga_stores is not None:
        await saga_stores.close()


async def _rtt_ctx(app: web.Application) -> AsyncIterator[None]:
    """Probe every store node and peer router (cost model of the read path; /metrics)."""
    config = app[CONFIG]
    stores = app[STORES]
    watcher = app[TOPOLOGY]
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=rtt.PROBE_TIMEOUT_S))

    def node_probe(node: Node) -> rtt.Probe:
        async def probe() -> float:
            store = await stores.for_node(node)
            return await store.ping(timeout_s=rtt.PROBE_TIMEOUT_S)

        return probe

    def router_probe(url: str) -> rtt.Probe:
        async def probe() -> float:
            return await rtt.probe_router(session, url)

        return probe

    def targets() -> dict[str, rtt.Probe]:
        out: dict[str, rtt.Probe] = {}
        for shard in watcher.current.shards.values():
            for node in (shard.primary, *shard.standbys):
                out[f"node:{node.name}"] = node_probe(node)
        for region, url in config.peer_routers.items():
            out[f"router:{region}"] = router_probe(url)
        return out

    stop = asyncio.Event()
    task = asyncio.create_task(rtt.run_prober(app[RTT], targets, stop), name="rtt-prober")
    yield
    stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await session.close()


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = RegionCache(app[CONFIG].redis_url, app[METRICS])
    app[CACHE] = cache
    watcher = app[TOPOLOGY]
    # The relays run in their own process (python -m router.relays); the router reads their
    # heartbeats from this region's Redis.
    app[RELAY_LAG] = RelayLag(cache, lambda: sorted(watcher.current.shards))
    yield
    await cache.close()


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = EventsClient(config.nats_urls, name=f"txr-router-{config.region}")
    app[EVENTS] = client
    yield
    await client.close()


async def _freeze_gc(app: web.Application) -> None:
    """After start-up: move everything alive now out of the collector's reach, and collect
    generation 0 far less often (router.limits.GC_GEN0_THRESHOLD says why)."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def create_app(config: RouterConfig, *, worker: int = 0) -> web.Application:
    setup_tracing(config.region)
    # aiohttp refuses larger bodies itself (413, mapped to problem+json by the middleware);
    # the bound is the batch route's, and every other route checks its own smaller one
    # (router.validation.read_body).
    app = web.Application(
        middlewares=[edge_middleware], client_max_size=TRANSFER_BATCH_BODY_BYTES_MAX
    )
    app[CONFIG] = config
    app[METRICS] = Metrics(config.region)
    # /metrics answers for the worker that took the connection; this says which one.
    app[METRICS].worker_info.labels(config.region, str(worker), str(os.getpid())).set(1)
    app[VERIFIER] = Verifier(
        KeySetFile(config.jwks_file),
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
        admin_audience=config.jwt_admin_audience,
    )
    app[OPENAPI] = _load_openapi()
    app[RTT] = rtt.RttTable(config.region, app[METRICS])
    app.cleanup_ctx.extend([_topology_ctx, _cache_ctx, _stores_ctx, _rtt_ctx, _events_ctx])
    ratelimit.install(app)  # per-tenant limits on the write routes (router.ratelimit)
    adminsite.install(app)  # GET /metrics on the admin port, not the public one
    # on_startup runs after the cleanup contexts' start halves: the pools and caches exist.
    app.on_startup.append(_freeze_gc)
    app.router.add_post("/v1/accounts", accounts.create_account)
    app.router.add_get("/v1/accounts/{id}", accounts.get_account, allow_head=False)
    app.router.add_get("/v1/accounts/{id}/entries", accounts.list_entries, allow_head=False)
    app.router.add_post("/v1/transfers", transfers.create_transfer)
    app.router.add_post("/v1/transfers/batch", transfers.create_transfer_batch)
    # Only a transfer-shaped id: /v1/transfers/batch then names one resource (POST), so its 405
    # answers say "Allow: POST" and not the GET of a transfer called "batch". Other ids are
    # a 404 either way.
    app.router.add_get("/v1/transfers/{id:tr_[^/]*}", transfers.get_transfer, allow_head=False)
    app.router.add_get("/v1/events", events.list_events, allow_head=False)
    app.router.add_post("/v1/webhooks", events.create_webhook)
    app.router.add_get("/v1/webhooks", events.list_webhooks, allow_head=False)
    app.router.add_delete("/v1/webhooks/{id}", events.delete_webhook)
    app.router.add_get("/healthz", ops.healthz, allow_head=False)
    app.router.add_get("/readyz", ops.readyz, allow_head=False)
    app.router.add_get("/openapi.json", ops.openapi, allow_head=False)
    app.router.add_get("/v1/admin/status", ops.admin_status, allow_head=False)
    return app
