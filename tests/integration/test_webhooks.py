"""Webhooks on the test cluster: signed deliveries to a real HTTP receiver, retries with
back-off (no redirect followed), the failing mark after the retry window (a fake clock), the
registry's tenant isolation and the SSRF refusals."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import nats
import orjson
import pytest
from aiohttp import web
from nats.js.api import KeyValueConfig

from router.config import RouterConfig
from router.events import model, webhooks
from tests.fixtures import PORT_OFFSET
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

# Outside the cluster's 100 ports (7600 + offset ...), below the ephemeral range.
RECEIVER_PORT_BASE: Final = 7600 + PORT_OFFSET + 150
DELIVERY_WAIT_S: Final = 60.0
# Listings taken while the keys are rewritten (each one a few JetStream round trips).
LISTINGS_UNDER_REWRITE: Final = 60


@dataclass
class Receiver:
    url: str
    answers: list[int]
    hits: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    other_hits: int = 0

    def received(self, event_id: str) -> list[tuple[float, dict[str, str], bytes]]:
        return [h for h in self.hits if h[1].get("Txr-Event-Id") == event_id]


@contextlib.asynccontextmanager
async def receiver(
    port: int, answers: list[int], delays: list[float] | None = None
) -> AsyncIterator[Receiver]:
    """Answers each delivery with the next status of ``answers`` (then 200), after the next
    delay of ``delays`` (then none); a 302 points to /other, which must never be called."""
    rec = Receiver(f"http://127.0.0.1:{port}/hook", list(answers))
    pauses = list(delays or [])

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        rec.hits.append((time.monotonic(), dict(request.headers), body))
        if pauses:
            await asyncio.sleep(pauses.pop(0))
        status = rec.answers.pop(0) if rec.answers else 200
        if status == 302:
            raise web.HTTPFound(f"http://127.0.0.1:{port}/other")
        return web.Response(status=status)

    async def other(_: web.Request) -> web.Response:
        rec.other_hits += 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/other", other)
    app.router.add_get("/other", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield rec
    finally:
        await runner.cleanup()


async def wait_until(what: str, check: Callable[[], Any]) -> None:
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"{what} within {DELIVERY_WAIT_S}s"
        await asyncio.sleep(0.2)


async def register(api: Api, tenant: str, url: str, events: list[str]) -> dict[str, Any]:
    r = await api.call(
        "POST", "us-east", "/v1/webhooks", tenant=tenant, json={"url": url, "events": events}
    )
    assert r.status == 201, r.body
    return dict(r.body)


async def test_delivery_is_signed_filtered_and_the_registry_is_per_tenant(api: Api) -> None:
    tenant = new_tenant()
    async with receiver(RECEIVER_PORT_BASE, []) as rec:
        wh = await register(api, tenant, rec.url, ["transfer.settled"])
        assert wh["secret"].startswith("whsec_")
        assert wh["status"] == "active"
        src = await api.funded(tenant, "us-east", 500)
        dst = await api.open_account(tenant, "eu-west")
        t = await api.transfer(tenant, "eu-west", src, dst, 7)
        assert t.status == 201, t.body
        eid = model.event_id("transfer.settled", t.body["id"])

        async def delivered() -> bool:
            return bool(rec.received(eid))

        await wait_until("the settled event delivered", delivered)
        _, headers, body = rec.received(eid)[0]
        assert webhooks.verify(wh["secret"], body, headers["Txr-Signature"])
        assert not webhooks.verify("whsec_other", body, headers["Txr-Signature"])
        ts = int(headers["Txr-Signature"].split(",")[0].removeprefix("t="))
        assert abs(ts - time.time()) < 600
        doc = orjson.loads(body)
        assert doc["id"] == eid
        assert doc["type"] == "transfer.settled"
        assert doc["data"]["amount"] == 7
        # Only the subscribed type: account.created and the pending leg are not sent.
        assert {orjson.loads(h[2])["type"] for h in rec.hits} == {"transfer.settled"}
        # The pull API holds the same event, byte for byte the same JSON.
        page = await api.call("GET", "us-east", "/v1/events?limit=500", tenant=tenant)
        assert doc in page.body["data"]

    listed = await api.call("GET", "ap-south", "/v1/webhooks", tenant=tenant)
    assert listed.status == 200
    assert [w["id"] for w in listed.body["data"]] == [wh["id"]]
    assert "secret" not in listed.body["data"][0]
    other = new_tenant()
    assert (await api.call("GET", "us-east", "/v1/webhooks", tenant=other)).body["data"] == []
    r = await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=other)
    assert r.status == 404
    assert r.body["code"] == "not_found"
    r = await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=tenant)
    assert r.status == 204
    r = await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=tenant)
    assert r.status == 404
    r = await api.call("DELETE", "us-east", "/v1/webhooks/../../x", tenant=tenant)
    assert r.status == 404


async def test_failed_attempts_are_retried_with_backoff_and_redirects_not_followed(
    api: Api,
) -> None:
    tenant = new_tenant()
    async with receiver(RECEIVER_PORT_BASE + 1, [302, 500]) as rec:
        wh = await register(api, tenant, rec.url, ["account.created"])
        acc = await api.open_account(tenant, "ap-south")
        eid = model.event_id("account.created", acc)

        async def third() -> bool:
            return len(rec.received(eid)) >= 3

        await wait_until("three attempts", third)
        await asyncio.sleep(2 * webhooks.BACKOFF_S_MIN)
        hits = rec.received(eid)
        # Acknowledged on the 200: no fourth attempt; the redirect's target was never called.
        assert len(hits) == 3
        assert rec.other_hits == 0
        # Each retry waited at least half its back-off (jitter spans [b/2, b]).
        assert hits[1][0] - hits[0][0] >= webhooks.BACKOFF_S_MIN / 2
        assert hits[2][0] - hits[1][0] >= webhooks.BACKOFF_S_MIN
        await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=tenant)


async def test_a_slow_live_attempt_keeps_its_event_past_the_ack_wait(api: Api) -> None:
    """An endpoint that answers after longer than the consumer's ack wait (still within the
    attempt timeout) gets the event once: the attempt tells the server it is still working, so
    the short ack wait (which lets a dead worker's events be retried within seconds) does not
    also double a live delivery."""
    slow_s = webhooks.ACK_WAIT_S + 3
    assert slow_s < webhooks.ATTEMPT_TIMEOUT_S
    tenant = new_tenant()
    async with receiver(RECEIVER_PORT_BASE + 3, [], delays=[slow_s]) as rec:
        wh = await register(api, tenant, rec.url, ["account.created"])
        acc = await api.open_account(tenant, "eu-west")
        eid = model.event_id("account.created", acc)

        async def first() -> bool:
            return bool(rec.received(eid))

        await wait_until("the first attempt", first)
        # The answer comes at slow_s; a redelivery would have arrived from ACK_WAIT_S on.
        await asyncio.sleep(slow_s + webhooks.IN_PROGRESS_EVERY_S)
        assert len(rec.received(eid)) == 1
        await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=tenant)


async def test_endpoint_marked_failing_after_the_retry_window(api: Api, local_cluster: Any) -> None:
    """A worker whose clock is 25 h ahead marks an endpoint failing at its first failed
    attempt. It follows a registry of its own (the relays' workers, on the real clock, would
    otherwise share the endpoint's deliveries and only retry); the endpoint's consumer is on
    the real stream."""
    tenant = new_tenant()
    dead = f"http://127.0.0.1:{RECEIVER_PORT_BASE + 9}/nobody-listens"
    bucket = "TXR_WEBHOOKS_TEST_" + uuid.uuid4().hex[:8].upper()
    nc = await nats.connect(local_cluster.refresh_status()["regions"]["us-east"]["nats"])
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=1))
    registry = webhooks.Registry(js, bucket)
    ep = await registry.create(tenant, dead, ("account.created",))
    config = RouterConfig.load(local_cluster.dir / "run" / "router-us-east.json")
    worker = webhooks.DeliveryWorker(
        config, clock=lambda: time.time() + webhooks.RETRY_WINDOW_S + 3600, bucket=bucket
    )
    task = asyncio.create_task(worker.run())
    try:
        await api.open_account(tenant, "us-east")

        seen: list[webhooks.Endpoint] = []

        async def failing() -> bool:
            seen[:] = await registry.list(tenant)
            return len(seen) == 1 and seen[0].status == "failing"

        await wait_until("the endpoint marked failing", failing)
        (now,) = seen
        assert now.failing_since is not None
        assert worker.attempts == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await registry.delete(tenant, ep.id)
        await js.delete_key_value(bucket)
        await nc.close()


async def test_a_listing_never_misses_an_endpoint_being_rewritten(local_cluster: Any) -> None:
    """Registry.list while another client rewrites the same keys as fast as it can (the worker
    marking endpoints failing does that): every listing holds every endpoint, of this tenant
    only. nats-py's KeyValue.keys (a watcher) returned an empty listing in this race, which
    also let a tenant past WEBHOOKS_PER_TENANT_MAX."""
    tenant, other = new_tenant(), new_tenant()
    bucket = "TXR_WEBHOOKS_TEST_" + uuid.uuid4().hex[:8].upper()
    nc = await nats.connect(local_cluster.refresh_status()["regions"]["us-east"]["nats"])
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=3))
    registry = webhooks.Registry(js, bucket)
    eps = [
        await registry.create(tenant, f"https://example.com/hook/{i}", ("account.created",))
        for i in range(3)
    ]
    await registry.create(other, "https://example.com/other", ("account.created",))
    stop = asyncio.Event()

    async def rewrite() -> int:
        n = 0
        while not stop.is_set():
            for ep in eps:
                await registry.mark_failing(ep, time.time())
                n += 1
        return n

    writer = asyncio.create_task(rewrite())
    try:
        for _ in range(LISTINGS_UNDER_REWRITE):
            listed = await registry.list(tenant)
            assert sorted(e.id for e in listed) == sorted(e.id for e in eps)
        stop.set()
        assert await writer > LISTINGS_UNDER_REWRITE
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await js.delete_key_value(bucket)
        await nc.close()


async def test_a_failing_endpoint_shows_on_get_and_gets_nothing(api: Api) -> None:
    tenant = new_tenant()
    async with receiver(RECEIVER_PORT_BASE + 2, []) as rec:
        wh = await register(api, tenant, rec.url, ["account.created"])
        nc = await nats.connect(api.cluster.refresh_status()["regions"]["eu-west"]["nats"])
        try:
            registry = webhooks.Registry(nc.jetstream())
            (ep,) = await registry.list(tenant)
            await registry.mark_failing(ep, time.time())
        finally:
            await nc.close()
        r = await api.call("GET", "eu-west", "/v1/webhooks", tenant=tenant)
        assert r.body["data"][0]["status"] == "failing"
        assert r.body["data"][0]["failing_since"] is not None
        # The workers follow the registry: once they stopped, nothing more is delivered.
        await asyncio.sleep(2.0)
        await api.open_account(tenant, "us-east")
        await asyncio.sleep(5.0)
        assert rec.hits == []
        await api.call("DELETE", "us-east", f"/v1/webhooks/{wh['id']}", tenant=tenant)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/hook",
        "http://[fd00:ec2::254]/hook",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "ftp://127.0.0.1/hook",
        "http://user:pw@127.0.0.1/hook",
        "http:///nohost",
        "not a url",
        "http://127.0.0.1:99999/hook",
        "http://does-not-resolve.invalid/hook",
    ],
)
async def test_ssrf_and_malformed_urls_are_refused(api: Api, url: str) -> None:
    tenant = new_tenant()
    r = await api.call(
        "POST",
        "us-east",
        "/v1/webhooks",
        tenant=tenant,
        json={"url": url, "events": ["transfer.settled"]},
    )
    assert r.status == 422, r.body
    assert r.body["code"] == "url_not_allowed"
    assert (await api.call("GET", "us-east", "/v1/webhooks", tenant=tenant)).body["data"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"url": "http://127.0.0.1:1/x"},
        {"url": "http://127.0.0.1:1/x", "events": []},
        {"url": "http://127.0.0.1:1/x", "events": ["transfer.exploded"]},
        {"url": "http://127.0.0.1:1/x", "events": ["transfer.settled", "transfer.settled"]},
        {"url": "http://127.0.0.1:1/x", "events": "transfer.settled"},
        {"url": "http://127.0.0.1:1/x", "events": ["transfer.settled"], "secret": "mine"},
    ],
)
async def test_bad_webhook_bodies_are_422(api: Api, body: dict[str, Any]) -> None:
    r = await api.call("POST", "us-east", "/v1/webhooks", tenant=new_tenant(), json=body)
    assert r.status == 422, r.body
    assert r.body["code"] == "invalid_request"
