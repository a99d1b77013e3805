"""Webhooks: the endpoint registry, signatures, the SSRF guard and the delivery worker.

Registry: NATS KV bucket ``TXR_WEBHOOKS`` (replicated like the stream), one key per endpoint
``<tenant key>.<id>`` (the tenant with ``.`` -> ``=``, not a tenant character: one-to-one). Each
endpoint has its own durable JetStream consumer (``wh_<id>``, filtered to its tenant's
subjects, from the events after its creation): its position survives every restart, its
backlog is the endpoint's queue depth, and one endpoint that fails never delays another.

Delivery (``DeliveryWorker``, in every region's relay process; the consumer shares the work):
``POST url`` with the event's JSON as body and headers ``Txr-Event-Id`` and ``Txr-Signature:
t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``; a 2xx acknowledges; anything else, a
timeout (``ATTEMPT_TIMEOUT_S``) or a refused address is retried with jittered exponential
back-off (``backoff_s``) by a delayed NAK, for ``RETRY_WINDOW_S`` from the event's storage; the
first failure past it marks the endpoint ``failing`` (GET shows it) and its deliveries stop.
At least once and not in order: a retried event may arrive after later ones, and an event may
arrive twice (an acknowledgement lost); receivers dedupe by ``Txr-Event-Id``.

SSRF: every connection resolves through ``GuardedResolver``: a name that resolves to any
private, loopback, link-local, multicast, reserved or unspecified address (cloud metadata
169.254.169.254 and fd00:ec2::254 included) is refused, at registration and at every
connection (no rebinding between check and connect: the connector dials what was checked).
Loopback is allowed only when the configuration says so (a local cluster). Redirects are not
followed (a 3xx is a failed attempt), and no proxy from the environment is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import socket
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import nats.errors
import nats.js.errors
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from router import render
from router.config import RouterConfig
from router.events import stream
from router.metrics import Metrics

log = logging.getLogger(__name__)

# One delivery attempt (connect, send, answer) at most this long.
ATTEMPT_TIMEOUT_S: Final = 10.0
# Retries go on this long after the event was stored (API.md: at least 24 h), then the
# endpoint is marked failing.
RETRY_WINDOW_S: Final = 24 * 3600.0
# Back-off between attempts: doubling from the min, capped, jittered over [b/2, b].
BACKOFF_S_MIN: Final = 1.0
BACKOFF_S_MAX: Final = 3600.0
# The consumer redelivers an unacknowledged message after this: how long the events a worker
# held when it died wait before another worker (or its restart) retries them. Short, so a
# crashed relay delays its endpoints' events by seconds, not by a whole attempt timeout; an
# attempt that runs longer keeps its message by telling the server it is still working.
ACK_WAIT_S: Final = 6.0
# That "still working" signal (+WPI) while an attempt runs, this often: a third of the ack
# wait, so two signals may be late before the server redelivers a message still in hand.
IN_PROGRESS_EVERY_S: Final = ACK_WAIT_S / 3
# Events in flight per endpoint (the consumer's max_ack_pending) and per fetch.
ENDPOINT_IN_FLIGHT_MAX: Final = 64
FETCH_BATCH_MAX: Final = 32
# A fetch waits at the server this long for events (a long poll, not a timer).
FETCH_WAIT_S: Final = 2.0
# After the first event of a round, the rest of the batch is taken from what arrives within this.
FETCH_MORE_S: Final = 0.02
# The worker follows the registry by a watch; after losing it, it tries again after this.
REGISTRY_RETRY_S: Final = 1.0
# The queue-depth gauges (consumer info per endpoint) are refreshed this often at most.
DEPTH_REFRESH_S: Final = 5.0
# Endpoints per tenant; URL length.
WEBHOOKS_PER_TENANT_MAX: Final = 16
URL_LEN_MAX: Final = 2048
SECRET_BYTES: Final = 32
# A name's resolution (at registration: in the request; at delivery: within the attempt).
RESOLVE_TIMEOUT_S: Final = 2.0
USER_AGENT: Final = "txrouter-webhooks/1"

_METADATA_ADDRESSES: Final = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class UrlRefused(ValueError):
    """The URL is not one the router may call (scheme, form, or the addresses it names)."""


def address_allowed(addr: str, *, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return False
    if ip.is_loopback:
        return allow_loopback
    return not (
        ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def check_url_form(url: object) -> urllib.parse.SplitResult:
    if not isinstance(url, str) or not 1 <= len(url) <= URL_LEN_MAX or not url.isascii():
        raise UrlRefused(f"url must be an absolute http(s) URL of at most {URL_LEN_MAX} chars")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("url must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("url must not carry credentials")
    try:
        _ = parts.port
    except ValueError:
        raise UrlRefused("url has an invalid port") from None
    return parts


class GuardedResolver(AbstractResolver):
    """Resolves, then refuses the whole name if any of its addresses is not allowed."""

    def __init__(self, *, allow_loopback: bool) -> None:
        self.allow_loopback = allow_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, family=socket.AF_UNSPEC
                )
        except (OSError, TimeoutError) as exc:
            raise OSError(f"cannot resolve {host}: {exc!r}") from exc
        out: list[ResolveResult] = []
        for fam, _, proto, _, sockaddr in infos:
            addr = str(sockaddr[0])
            if not address_allowed(addr, allow_loopback=self.allow_loopback):
                raise UrlRefused(f"{host} resolves to a refused address")
            out.append(
                {
                    "hostname": host,
                    "host": addr,
                    "port": int(sockaddr[1]),
                    "family": fam,
                    "proto": proto,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        if not out:
            raise OSError(f"{host} has no address")
        return out

    async def close(self) -> None:
        return None


async def check_url(url: object, *, allow_loopback: bool) -> str:
    """The URL if the router may call it (form and every address), else UrlRefused."""
    parts = check_url_form(url)
    assert isinstance(url, str)
    assert parts.hostname is not None
    try:
        await GuardedResolver(allow_loopback=allow_loopback).resolve(parts.hostname)
    except UrlRefused:
        raise
    except OSError:
        raise UrlRefused("url's host does not resolve") from None
    return url


def sign(secret: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (tests and the chaos receiver use it)."""
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    if "t" not in fields or "v1" not in fields or not fields["t"].isdigit():
        return False
    return hmac.compare_digest(sign(secret, body, int(fields["t"])), header)


def backoff_s(attempt: int, rng: random.Random) -> float:
    """The wait before attempt ``attempt + 1`` (attempt >= 1 failed)."""
    base = min(BACKOFF_S_MAX, BACKOFF_S_MIN * 2.0 ** min(attempt - 1, 62))
    return rng.uniform(base / 2, base)


# -- the registry ------------------------------------------------------------------------------


def tenant_key(tenant: str) -> str:
    return tenant.replace(".", "=")


def consumer_name(webhook_id: str) -> str:
    return f"wh_{webhook_id}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    tenant: str
    url: str
    events: tuple[str, ...]
    secret: str
    created_at: str
    status: str = "active"
    failing_since: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "url": self.url,
            "events": list(self.events),
            "secret": self.secret,
            "created_at": self.created_at,
            "status": self.status,
            "failing_since": self.failing_since,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Endpoint:
        return cls(
            id=str(d["id"]),
            tenant=str(d["tenant"]),
            url=str(d["url"]),
            events=tuple(str(e) for e in d["events"]),
            secret=str(d["secret"]),
            created_at=str(d["created_at"]),
            status=str(d.get("status", "active")),
            failing_since=d.get("failing_since"),
        )

    def public(self) -> dict[str, Any]:
        """The GET shape: everything but the secret (shown once, at creation)."""
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "status": self.status,
            "failing_since": self.failing_since,
            "created_at": self.created_at,
        }


class Registry:
    def __init__(self, js: JetStreamContext, bucket: str = stream.WEBHOOKS_BUCKET) -> None:
        self.js = js
        self.bucket = bucket

    async def _kv(self) -> Any:
        return await self.js.key_value(self.bucket)

    async def list(self, tenant: str | None = None) -> list[Endpoint]:
        """The endpoints (of ``tenant``, or all), oldest first.

        The keys come from the bucket's stream state (``STREAM.INFO`` with a subject filter:
        one request to the stream's leader, every subject that holds a message), not from the
        client's ``KeyValue.keys``: that one is a watcher, an ordered consumer that ends at its
        first "no more pending", and it came back empty for a key rewritten (the worker marks
        an endpoint failing) between the consumer's creation and its first delivery. A key
        whose last message is a delete is still a subject: ``get`` then finds it deleted."""
        kv = await self._kv()
        base = f"$KV.{self.bucket}."
        filt = base + (">" if tenant is None else tenant_key(tenant) + ".>")
        info = await self.js.stream_info(f"KV_{self.bucket}", subjects_filter=filt)
        out: list[Endpoint] = []
        for subject in sorted((info.state.subjects or {}).keys()):
            try:
                entry = await kv.get(subject[len(base) :])
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                ep = Endpoint.from_json(orjson.loads(entry.value))
                if tenant is None or ep.tenant == tenant:
                    out.append(ep)
        return sorted(out, key=lambda e: e.created_at)

    async def create(self, tenant: str, url: str, events: tuple[str, ...]) -> Endpoint:
        ep = Endpoint(
            id="wh_" + secrets.token_hex(12),
            tenant=tenant,
            url=url,
            events=events,
            secret="whsec_" + secrets.token_hex(SECRET_BYTES),
            created_at=render.timestamp(dt.datetime.now(dt.UTC)),
        )
        # The consumer first: an endpoint in the registry always has its position.
        await self.js.add_consumer(
            stream.STREAM,
            ConsumerConfig(
                durable_name=consumer_name(ep.id),
                filter_subject=stream.tenant_filter(tenant),
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                max_deliver=-1,
                max_ack_pending=ENDPOINT_IN_FLIGHT_MAX,
            ),
        )
        kv = await self._kv()
        await kv.put(f"{tenant_key(tenant)}.{ep.id}", orjson.dumps(ep.to_json()))
        return ep

    async def delete(self, tenant: str, webhook_id: str) -> bool:
        kv = await self._kv()
        key = f"{tenant_key(tenant)}.{webhook_id}"
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
        if not entry.value:
            return False
        await kv.delete(key)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(stream.STREAM, consumer_name(webhook_id))
        return True

    async def mark_failing(self, ep: Endpoint, when: float) -> None:
        kv = await self._kv()
        since = render.timestamp(dt.datetime.fromtimestamp(when, dt.UTC))
        updated = Endpoint(**{**_fields(ep), "status": "failing", "failing_since": since})
        await kv.put(f"{tenant_key(ep.tenant)}.{ep.id}", orjson.dumps(updated.to_json()))


def _fields(ep: Endpoint) -> dict[str, Any]:
    return {f: getattr(ep, f) for f in Endpoint.__slots__}


# -- delivery ----------------------------------------------------------------------------------


class DeliveryWorker:
    """Delivers every active endpoint's events (module docstring). ``clock`` is the wall clock
    the retry window is measured on (tests pass a fake one)."""

    def __init__(
        self,
        config: RouterConfig,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        backoff: Callable[[int, random.Random], float] = backoff_s,
        retry_window_s: float = RETRY_WINDOW_S,
        bucket: str = stream.WEBHOOKS_BUCKET,
    ) -> None:
        self.config = config
        self.bucket = bucket
        self.metrics = metrics
        self.clock = clock
        self.backoff = backoff
        self.retry_window_s = retry_window_s
        self.rng = random.Random()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.attempts = 0

    async def run(self) -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=GuardedResolver(allow_loopback=self.config.webhooks_allow_loopback),
                limit=ENDPOINT_IN_FLIGHT_MAX * 4,
            ),
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )
        nc = None
        try:
            while True:
                try:
                    if nc is None or nc.is_closed:
                        nc = await stream.connect(
                            self.config.nats_urls, name=f"txr-webhooks-{self.config.region}"
                        )
                    await self._follow(nc.jetstream(timeout=stream.JS_API_TIMEOUT_S), session)
                except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as e:
                    log.warning("webhooks: registry unavailable: %r", e)
                await asyncio.sleep(REGISTRY_RETRY_S)
        finally:
            for t in self._tasks.values():
                t.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await session.close()
            if nc is not None and not nc.is_closed:
                await nc.close()

    async def _follow(self, js: JetStreamContext, session: aiohttp.ClientSession) -> None:
        """Follow the registry (a KV watch: every endpoint now, then each change as it is
        made); between changes, refresh the queue-depth gauges every ``DEPTH_REFRESH_S``."""
        kv = await js.key_value(self.bucket)
        watcher = await kv.watchall()
        active: dict[str, Endpoint] = {}
        try:
            while True:
                try:
                    # nats-py leaves these two untyped.
                    entry = await watcher.updates(timeout=DEPTH_REFRESH_S)  # type: ignore[no-untyped-call]
                except TimeoutError:  # nats-py raises its own subclass or the builtin
                    self._restart_ended(js, session, active)
                    await self._depths(js, active)
                    continue
                if entry is None:
                    continue  # the end of the initial values
                wid = entry.key.rsplit(".", 1)[-1]
                ep = (
                    Endpoint.from_json(orjson.loads(entry.value))
                    if entry.value and entry.operation not in ("DEL", "PURGE")
                    else None
                )
                if ep is not None and ep.status == "active":
                    active[wid] = ep
                    if wid not in self._tasks:
                        self._start(js, session, ep)
                else:
                    active.pop(wid, None)
                    task = self._tasks.pop(wid, None)
                    if task is not None:
                        task.cancel()
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _start(self, js: JetStreamContext, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        self._tasks[ep.id] = asyncio.create_task(
            self._endpoint(js, session, ep), name=f"webhook-{ep.id}"
        )

    def _restart_ended(
        self, js: JetStreamContext, session: aiohttp.ClientSession, active: dict[str, Endpoint]
    ) -> None:
        for wid, task in list(self._tasks.items()):
            if not task.done():
                continue
            self._tasks.pop(wid)
            if not task.cancelled() and task.exception() is not None:
                # Started again while the endpoint is active: its position is durable.
                log.warning("webhooks: %s delivery stopped: %r", wid, task.exception())
            if wid in active:
                self._start(js, session, active[wid])

    async def _depths(self, js: JetStreamContext, active: dict[str, Endpoint]) -> None:
        if self.metrics is None:
            return
        for wid in active:
            try:
                info = await js.consumer_info(stream.STREAM, consumer_name(wid))
            except (nats.errors.Error, TimeoutError):
                continue
            depth = (info.num_pending or 0) + (info.num_ack_pending or 0)
            self.metrics.webhook_pending.labels(self.config.region, wid).set(depth)

    async def _endpoint(
        self, js: JetStreamContext, session: aiohttp.ClientSession, ep: Endpoint
    ) -> None:
        sub = await js.pull_subscribe_bind(durable=consumer_name(ep.id), stream=stream.STREAM)
        try:
            while True:
                # A long poll for the first event (it returns as soon as one is there), then
                # what else is ready within a short linger: a fetch of a whole batch would wait
                # for the batch to fill.
                try:
                    msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
                except TimeoutError:  # nats-py raises its own subclass or the builtin
                    continue
                except nats.js.errors.NotFoundError:
                    return  # deleted meanwhile
                with contextlib.suppress(TimeoutError):
                    msgs += await sub.fetch(FETCH_BATCH_MAX - 1, timeout=FETCH_MORE_S)
                results = await asyncio.gather(*(self._deliver(session, ep, m) for m in msgs))
                if any(r == "failing" for r in results):
                    await Registry(js, self.bucket).mark_failing(ep, self.clock())
                    log.warning("webhooks: endpoint %s marked failing", ep.id)
                    return
        finally:
            await sub.unsubscribe()

    async def _deliver(self, session: aiohttp.ClientSession, ep: Endpoint, msg: Msg) -> str:
        doc = orjson.loads(msg.data)
        if doc.get("type") not in ep.events:
            await msg.ack()
            return "skipped"
        t = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "Txr-Event-Id": str(doc.get("id")),
            "Txr-Signature": sign(ep.secret, msg.data, t),
        }
        self.attempts += 1
        ok = await _keeping(msg, _attempt(session, ep, msg.data, headers))
        if ok:
            await msg.ack()
            if self.metrics is not None:
                self.metrics.webhook_deliveries.labels(self.config.region, "ok").inc()
                created = doc.get("created_at")
                if isinstance(created, str):
                    at = dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
                    self.metrics.webhook_lag.labels(self.config.region).observe(
                        max(0.0, time.time() - at)
                    )
            return "ok"
        stored_at = msg.metadata.timestamp.timestamp()
        if self.clock() - stored_at >= self.retry_window_s:
            await msg.term()
            if self.metrics is not None:
                self.metrics.webhook_deliveries.labels(self.config.region, "failing_marked").inc()
            return "failing"
        attempt = int(msg.metadata.num_delivered or 1)
        await msg.nak(delay=self.backoff(attempt, self.rng))
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(self.config.region, "failed").inc()
        return "failed"


async def _attempt(
    session: aiohttp.ClientSession, ep: Endpoint, body: bytes, headers: dict[str, str]
) -> bool:
    """One delivery attempt: True when the endpoint answered 2xx."""
    try:
        async with session.post(ep.url, data=body, headers=headers, allow_redirects=False) as resp:
            # The status is the answer; the body is never read (an endpoint cannot make the
            # worker buffer it), and the connection is released on exit.
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError, UrlRefused) as exc:
        log.info("webhooks: %s attempt failed: %s", ep.id, type(exc).__name__)
        return False


async def _keeping(msg: Msg, attempt: Coroutine[Any, Any, bool]) -> bool:
    """Run ``attempt`` while telling the server every IN_PROGRESS_EVERY_S that ``msg`` is still
    being worked on, so a slow but live attempt is not redelivered past ACK_WAIT_S."""
    task = asyncio.ensure_future(attempt)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=IN_PROGRESS_EVERY_S)
            if done:
                return task.result()
            # A lost signal only risks a redelivery, which consumers dedupe by event id.
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.in_progress()
    finally:
        task.cancel()
