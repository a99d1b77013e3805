"""Deadlines, fair queuing and shedding in the network path (API.md "Deadlines, limits and
overload", issue 16), against the real cluster.

The queue tests hold a row lock on the primary (as admin) so that the shard's batches stay in
flight, and talk to an in-process router built from the cluster's own router config: one
process means one batcher per shard, so what is queued behind what is deterministic (the
cluster's routers run two SO_REUSEPORT workers, and the kernel picks one per connection).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consistency import ids
from infra.local import cluster as lc
from router.app import create_app
from router.config import RouterConfig
from router.limits import (
    BATCH_QUEUE_DELAY_MAX_S,
    BATCH_QUEUE_ITEMS_MAX,
    BATCH_QUEUE_TENANT_SHARE,
    BREAKER_FAILURES_MAX,
    READ_DEADLINE_S,
    WRITE_DEADLINE_S,
)
from tests.fixtures.api import FUNDING_OVERDRAFT, Api, new_tenant

pytestmark = pytest.mark.integration

REGION = "eu-west"
# What a write or read that honours a short Request-Timeout may take at most on a loaded
# machine; far below the router's own bounds, which it would take without the header.
SHORT_MS = 300
PROMPT_S = 1.5
assert min(WRITE_DEADLINE_S, READ_DEADLINE_S) > PROMPT_S


@pytest.fixture
async def router(local_cluster: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """An in-process eu-west router on the cluster's stores, etcd and Redis."""
    config = RouterConfig.load(local_cluster.dir / "run" / f"router-{REGION}.json")
    app = create_app(dataclasses.replace(config, port=0))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _same_shard_accounts(api: Api, tenant: str, n: int) -> tuple[str, list[str]]:
    """``n`` funded-by-overdraft accounts of ``tenant`` on one eu-west shard, and that shard."""
    by_shard: dict[str, list[str]] = {}
    for _ in range(4 * n):
        acc = await api.open_account(tenant, REGION, overdraft=FUNDING_OVERDRAFT)
        shard = (await api.account(tenant, REGION, acc))["shard"]
        by_shard.setdefault(shard, []).append(acc)
        if len(by_shard[shard]) == n:
            return shard, by_shard[shard]
    raise AssertionError(f"no {n} accounts on one shard: {by_shard}")


async def _more_on(api: Api, tenant: str, shard: str) -> str:
    for _ in range(20):
        acc = await api.open_account(tenant, REGION, overdraft=FUNDING_OVERDRAFT)
        if (await api.account(tenant, REGION, acc))["shard"] == shard:
            return acc
    raise AssertionError(f"no account of {tenant} landed on {shard}")


@asynccontextmanager
async def _held(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> AsyncIterator[None]:
    """Run ``sql`` (a lock) in an open transaction on the primary until the block ends."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute(sql, params)
        yield


def _row_lock(local_cluster: Any, shard: str, account: str) -> Any:
    account_id = ids.parse_account_id(account)
    return _held(
        local_cluster.primary_admin_dsn[shard],
        "SELECT 1 FROM txr.accounts WHERE id = %s FOR UPDATE",
        (account_id,),
    )


def _auth(api: Api, tenant: str, key: str | None = None, timeout_ms: int | None = None) -> Any:
    headers = {"Authorization": f"Bearer {api.token(tenant)}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if timeout_ms is not None:
        headers["Request-Timeout"] = str(timeout_ms)
    return headers


def _transfer(src: str, dst: str, amount: int) -> dict[str, Any]:
    return {"source": src, "destination": dst, "amount": amount, "currency": "EUR"}


async def _post(
    client: TestClient[Any, Any], api: Api, tenant: str, body: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, Any], dict[str, str], float]:
    key = kw.pop("key", None) or uuid.uuid4().hex
    t0 = time.monotonic()
    resp = await client.post("/v1/transfers", json=body, headers=_auth(api, tenant, key, **kw))
    doc = await resp.json()
    return resp.status, doc, dict(resp.headers), time.monotonic() - t0


async def _balance(api: Api, tenant: str, acc: str) -> int:
    balance: int = (await api.account(tenant, REGION, acc))["balance"]
    return balance


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "1e3", "\u0663", "9" * 30, ""])
async def test_an_invalid_request_timeout_is_422_and_changes_nothing(api: Api, value: str) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, REGION, 100)
    dst = await api.open_account(tenant, REGION)
    headers = {"Request-Timeout": value}
    r = await api.call(
        "POST",
        REGION,
        "/v1/transfers",
        tenant=tenant,
        key=uuid.uuid4().hex,
        json=_transfer(src, dst, 5),
        headers=headers,
    )
    assert r.status == 422, r.body
    assert r.body["code"] == "invalid_request"
    read = await api.call("GET", REGION, f"/v1/accounts/{src}", tenant=tenant, headers=headers)
    assert read.status == 422, read.body
    assert read.body["code"] == "invalid_request"
    assert await _balance(api, tenant, dst) == 0


async def test_a_write_runs_within_its_request_timeout_down_to_the_statement(
    api: Api, local_cluster: Any
) -> None:
    """Blocked on a row lock, a write with a short Request-Timeout answers outcome_unknown
    at that deadline (not the router's own), and its statement is cancelled on the server."""
    tenant = new_tenant()
    shard, (src, dst) = await _same_shard_accounts(api, tenant, 2)
    key = uuid.uuid4().hex
    async with _row_lock(local_cluster, shard, src):
        t0 = time.monotonic()
        r = await api.call(
            "POST",
            REGION,
            "/v1/transfers",
            tenant=tenant,
            key=key,
            json=_transfer(src, dst, 5),
            headers={"Request-Timeout": str(SHORT_MS)},
        )
        elapsed = time.monotonic() - t0
        assert r.status == 504, r.body
        assert r.body["code"] == "outcome_unknown"
        assert SHORT_MS / 1000 <= elapsed < PROMPT_S, elapsed
        # Still holding the lock: the cancelled statement must be gone from the server.
        await asyncio.sleep(0.5)
    assert await _balance(api, tenant, dst) == 0, "the cancelled statement committed"
    again = await api.transfer(tenant, REGION, src, dst, 5, key=key)
    assert again.status == 201, again.body
    assert "Idempotent-Replayed" not in again.headers
    assert await _balance(api, tenant, dst) == 5


async def test_a_read_runs_within_its_request_timeout(api: Api, local_cluster: Any) -> None:
    tenant = new_tenant()
    acc = await api.funded(tenant, REGION, 10)
    shard = (await api.account(tenant, REGION, acc))["shard"]
    async with _held(
        local_cluster.primary_admin_dsn[shard], "LOCK TABLE txr.accounts IN ACCESS EXCLUSIVE MODE"
    ):
        t0 = time.monotonic()
        r = await api.call(
            "GET",
            REGION,
            f"/v1/accounts/{acc}?consistency=strong",
            tenant=tenant,
            headers={"Request-Timeout": str(SHORT_MS)},
        )
        elapsed = time.monotonic() - t0
    assert r.status == 503, r.body
    assert r.body["code"] == "region_unavailable"
    assert r.headers["Retry-After"]
    assert elapsed < PROMPT_S, elapsed


async def _hold_batches(
    client: TestClient[Any, Any], api: Api, tenant: str, src: str, dst: str, n: int
) -> list[asyncio.Task[tuple[int, dict[str, Any], dict[str, str], float]]]:
    """``n`` writes from the locked ``src``: two batches in flight (BATCH_INFLIGHT_MAX), the
    rest queued behind them. One at a time, so that none joins another's batch."""
    tasks = []
    for _ in range(n):
        body = _transfer(src, dst, 1)
        tasks.append(asyncio.create_task(_post(client, api, tenant, body, timeout_ms=8000)))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    return tasks


async def test_a_write_whose_deadline_passes_in_the_queue_is_503_and_not_applied(
    api: Api, local_cluster: Any, router: TestClient[Any, Any]
) -> None:
    tenant = new_tenant()
    shard, (hot, dst, other) = await _same_shard_accounts(api, tenant, 3)
    key = uuid.uuid4().hex
    async with _row_lock(local_cluster, shard, hot):
        held = await _hold_batches(router, api, tenant, hot, dst, 3)
        status, doc, headers, elapsed = await _post(
            router, api, tenant, _transfer(other, dst, 50), key=key, timeout_ms=SHORT_MS
        )
        # Never sent, so surely not applied: 503 with Retry-After, never outcome_unknown.
        assert status == 503, doc
        assert doc["code"] == "region_unavailable"
        assert headers["Retry-After"]
        assert elapsed < PROMPT_S, elapsed
    assert [t[0] for t in await asyncio.gather(*held)] == [201] * 3
    assert await _balance(api, tenant, dst) == 3
    status, doc, headers, _ = await _post(router, api, tenant, _transfer(other, dst, 50), key=key)
    assert status == 201, doc
    assert "Idempotent-Replayed" not in headers, "the first attempt was never applied"
    assert await _balance(api, tenant, dst) == 53


async def test_past_saturation_new_writes_are_shed_at_once(
    api: Api, local_cluster: Any, router: TestClient[Any, Any]
) -> None:
    """A standing queue (its oldest item older than BATCH_QUEUE_DELAY_MAX_S): new writes for
    the shard are refused at once with 503 and Retry-After instead of queueing."""
    tenant, other_tenant = new_tenant(), new_tenant()
    shard, (hot, dst, other) = await _same_shard_accounts(api, tenant, 3)
    stranger = await _more_on(api, other_tenant, shard)
    stranger_dst = await _more_on(api, other_tenant, shard)
    async with _row_lock(local_cluster, shard, hot):
        held = await _hold_batches(router, api, tenant, hot, dst, 4)
        await asyncio.sleep(BATCH_QUEUE_DELAY_MAX_S + 0.2)
        for who, body in ((tenant, _transfer(other, dst, 50)), (other_tenant, None)):
            body = body or _transfer(stranger, stranger_dst, 50)
            status, doc, headers, elapsed = await _post(router, api, who, body)
            assert status == 503, doc
            assert doc["code"] == "region_unavailable"
            assert headers["Retry-After"]
            assert elapsed < 0.5, elapsed
    assert [t[0] for t in await asyncio.gather(*held)] == [201] * 4
    assert await _balance(api, tenant, dst) == 4
    assert await _balance(api, other_tenant, stranger_dst) == 0
    # Drained: the shard takes writes again.
    status, doc, _, _ = await _post(router, api, tenant, _transfer(other, dst, 50))
    assert status == 201, doc


async def test_one_tenant_cannot_fill_the_shard_queue(
    api: Api, local_cluster: Any, router: TestClient[Any, Any]
) -> None:
    """Past its share of the queue a tenant's items get 429 rate_limited; another tenant's
    write still gets in and is applied."""
    share = int(BATCH_QUEUE_ITEMS_MAX * BATCH_QUEUE_TENANT_SHARE)
    noisy, quiet = new_tenant(), new_tenant()
    shard, (hot, dst) = await _same_shard_accounts(api, noisy, 2)
    q_src = await _more_on(api, quiet, shard)
    q_dst = await _more_on(api, quiet, shard)
    items = 1000
    assert share < 2 * items

    async def batch() -> dict[str, Any]:
        doc = {
            "transfers": [
                {**_transfer(hot, dst, 1), "idempotency_key": uuid.uuid4().hex}
                for _ in range(items)
            ]
        }
        resp = await router.post("/v1/transfers/batch", json=doc, headers=_auth(api, noisy))
        assert resp.status == 200, await resp.text()
        out: dict[str, Any] = await resp.json()
        return out

    async with _row_lock(local_cluster, shard, hot):
        first = asyncio.create_task(batch())
        second = asyncio.create_task(batch())
        await asyncio.sleep(0.05)
        quiet_write = asyncio.create_task(_post(router, api, quiet, _transfer(q_src, q_dst, 7)))
        await asyncio.sleep(0.3)
    docs = await asyncio.gather(first, second)
    results = [r for doc in docs for r in doc["results"]]
    statuses = [r["status"] for r in results]
    limited = [r for r in results if r["status"] == 429]
    assert limited, "one tenant filled more than its share"
    assert {r["error"]["code"] for r in limited} == {"rate_limited"}
    # A request's items on one shard are queued or refused together (ShardBatcher.admit): the
    # first fits the tenant's share, the second would pass it and is refused whole.
    refused_whole = sorted(all(r["status"] == 429 for r in doc["results"]) for doc in docs)
    assert refused_whole == [False, True], [
        sorted({r["status"] for r in d["results"]}) for d in docs
    ]
    # Admitted items commit (201) or, on a loaded machine, run out of deadline once sent (504:
    # they all lock the same source row, so their batches commit one after another).
    assert set(statuses) <= {201, 429, 504}, sorted(set(statuses))
    admitted = statuses.count(201) + statuses.count(504)
    assert admitted == items <= share, admitted
    status, doc, _, _ = await quiet_write
    assert status == 201, doc
    assert await _balance(api, quiet, q_dst) == 7
    assert statuses.count(201) <= await _balance(api, noisy, dst) <= admitted


class _Link:
    """A TCP forwarder the test owns, between one router and one primary: ``cut`` closes its
    connections and refuses new ones (connection reset), ``heal`` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut_now(self) -> None:
        self.cut = True
        for w in list(self._writers):
            w.transport.abort()

    async def close(self) -> None:
        self.cut_now()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_remote_primary_that_cannot_be_reached_trips_the_breaker(
    api: Api, local_cluster: Any
) -> None:
    """Consecutive failures to reach a remote primary open its breaker: reads and writes then
    fail at once with 503 and Retry-After; once the link is back a probe closes it."""
    remote_region, remote_shard = "us-east", "us-east-1"
    info = psycopg.conninfo.conninfo_to_dict(lc.primary_admin_dsns(local_cluster.dir)[remote_shard])
    node_addr = f"{info['host']}:{info['port']}"
    config = RouterConfig.load(local_cluster.dir / "run" / f"router-{REGION}.json")
    mapped = config.dial.get(node_addr, node_addr)
    host, _, port = mapped.rpartition(":")
    link = _Link((host, int(port)))
    link_port = await link.start()
    dial = {**config.dial, node_addr: f"127.0.0.1:{link_port}"}
    tenant = new_tenant()
    acc = await api.funded(tenant, remote_region, 100)
    dst = await api.open_account(tenant, remote_region)
    assert (await api.account(tenant, remote_region, acc))["shard"] == remote_shard
    app = create_app(dataclasses.replace(config, port=0, dial=dial))
    try:
        async with TestClient(TestServer(app)) as client:
            path = f"/v1/accounts/{acc}?consistency=strong"

            async def read() -> tuple[int, dict[str, str], float]:
                t0 = time.monotonic()
                resp = await client.get(path, headers=_auth(api, tenant))
                await resp.read()
                return resp.status, dict(resp.headers), time.monotonic() - t0

            assert (await read())[0] == 200
            link.cut_now()
            failures = [await read() for _ in range(BREAKER_FAILURES_MAX)]
            assert all(status == 503 for status, _, _ in failures), failures
            # Open: refused at once, without a connection attempt.
            fast = [await read() for _ in range(5)]
            assert all(s == 503 and h.get("Retry-After") for s, h, _ in fast), fast
            assert sum(e for _, _, e in fast) < 0.5, fast
            status, doc, headers, elapsed = await _post(client, api, tenant, _transfer(acc, dst, 5))
            assert status == 503, doc
            assert doc["code"] == "region_unavailable"
            assert headers["Retry-After"]
            assert elapsed < 0.2, elapsed
            link.cut = False
            # Half-open probes every BREAKER_OPEN_S until the pool has reconnected.
            deadline = time.monotonic() + 30
            while (await read())[0] != 200:
                assert time.monotonic() < deadline, "the breaker never closed"
                await asyncio.sleep(0.2)
            assert [(await read())[0] for _ in range(3)] == [200] * 3
    finally:
        await link.close()
    assert await _balance(api, tenant, dst) == 0, "the refused write was not applied"
