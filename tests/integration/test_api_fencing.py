"""A router holding an old topology is refused by the store (G5) and recovers by refreshing."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consistency.etcd import EtcdClient
from consistency.topology import SHARD_PREFIX, Shard
from regionstore import admin
from router.app import create_app
from router.config import RouterConfig
from router.resources import METRICS, TOPOLOGY
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

SHARD = "eu-west-1"


async def _bump_etcd_epoch(etcd: EtcdClient, shard: str) -> int:
    got = await etcd.get(SHARD_PREFIX + shard)
    assert got is not None
    record = Shard.from_json(orjson.loads(got[0]))
    bumped = dataclasses.replace(record, epoch=record.epoch + 1)
    await etcd.cas(
        SHARD_PREFIX + shard, got[1], {SHARD_PREFIX + shard: orjson.dumps(bumped.to_json())}
    )
    return bumped.epoch


@pytest.fixture
async def stale_router(local_cluster: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """An in-process us-east router whose topology watch is stopped: it misses every change."""
    config = RouterConfig.load(local_cluster.dir / "run" / "router-us-east.json")
    app = create_app(dataclasses.replace(config, port=0))
    async with TestClient(TestServer(app)) as client:
        await app[TOPOLOGY].stop()
        yield client


async def test_stale_router_is_refused_then_recovers(
    api: Api, local_cluster: Any, stale_router: TestClient[Any, Any]
) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 1_000)
    dst = await api.open_account(tenant, "eu-west")
    dsn = local_cluster.primary_admin_dsn[SHARD]
    etcd = EtcdClient(list(local_cluster.etcd.values()))
    headers = {"Authorization": f"Bearer {api.token(tenant)}"}
    body = {"source": src, "destination": dst, "amount": 5, "currency": "EUR"}
    try:
        current = await etcd.get(SHARD_PREFIX + SHARD)
        assert current is not None
        epoch = Shard.from_json(orjson.loads(current[0])).epoch

        # The store moves to a new epoch that etcd does not show yet: every router is refused,
        # refreshes, is refused again, and says so without writing anything.
        admin.set_fence(dsn, epoch=epoch + 1)
        r = await api.transfer(tenant, "us-east", src, dst, 5, key="fence-1")
        assert r.status == 503, r.body
        assert r.body["code"] == "region_unavailable"
        assert r.headers["Retry-After"]
        assert (await api.account(tenant, "eu-west", dst))["balance"] == 0

        # etcd catches up. The stale router still believes the old epoch: its first attempt is
        # refused by the database, it refreshes the topology and the retry succeeds.
        assert await _bump_etcd_epoch(etcd, SHARD) == epoch + 1
        resp = await stale_router.post(
            "/v1/transfers", json=body, headers={**headers, "Idempotency-Key": "fence-2"}
        )
        assert resp.status == 201, await resp.text()
        metrics = stale_router.server.app[METRICS]
        refused = metrics.fence_rejections.labels("us-east", SHARD, "stale_epoch")._value.get()
        assert refused == 1
        assert (await api.account(tenant, "eu-west", dst))["balance"] == 5
        # The retried write used the same transfer: exactly one posting.
        entries = await api.call("GET", "eu-west", f"/v1/accounts/{dst}/entries", tenant=tenant)
        assert len(entries.body["data"]) == 1
    finally:
        await etcd.close()
