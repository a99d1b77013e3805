"""Ledger events on the test cluster: the real change feed, NATS JetStream cluster and routers.

Events from committed data only (a refused transfer has none), per-transfer order, the pull
API's paging (exactly once, tenant isolation, bad input), the publisher resuming after it was
killed and after its NATS server was, and de-duplication by event id.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Final

import aiohttp
import nats
import orjson
import psycopg
import pytest

from infra import cli
from regionstore.changefeed import repl_slot_prefix
from router.events import model, stream
from router.events.pull import encode_cursor
from tests.fixtures.api import Api, new_tenant
from tests.fixtures.cluster import kill_process, respawn
from txclient import Client, errors

pytestmark = pytest.mark.integration

# The publisher follows the commits within a heartbeat or two; on a loaded two-core machine
# (and after a relay restart) give it far more.
EVENTS_WAIT_S: Final = 60.0
SLOT_RELEASE_WAIT_S: Final = 20.0


class Unavailable(Exception):
    """The events API answered 503 (its region's NATS server is not reachable yet)."""


async def all_events(api: Api, tenant: str, region: str = "us-east", limit: int = 500) -> list[Any]:
    out: list[Any] = []
    after: str | None = None
    for _ in range(10_000):
        path = f"/v1/events?limit={limit}" + (f"&after={after}" if after else "")
        r = await api.call("GET", region, path, tenant=tenant)
        if r.status == 503:
            raise Unavailable(r.body)
        assert r.status == 200, r.body
        out += r.body["data"]
        after = r.body["next_cursor"]
        if not r.body["has_more"]:
            return out
    raise AssertionError("the cursor never ended")


async def wait_events(
    api: Api, tenant: str, want: set[tuple[str, str]], region: str = "us-east"
) -> list[Any]:
    """Until every (type, object id) of ``want`` is in the tenant's events."""
    deadline = time.monotonic() + EVENTS_WAIT_S
    while True:
        try:
            evs = await all_events(api, tenant, region)
        except Unavailable:
            # The region's NATS client reconnects after its server restarted: 503 meanwhile.
            assert time.monotonic() < deadline, "the events API stayed unavailable"
            await asyncio.sleep(0.3)
            continue
        have = {(e["type"], e["data"]["id"]) for e in evs}
        if want <= have or time.monotonic() > deadline:
            missing = want - have
            assert not missing, f"events missing after {EVENTS_WAIT_S}s: {sorted(missing)}"
            return evs
        await asyncio.sleep(0.3)


def _ids(evs: list[Any]) -> list[str]:
    return [e["id"] for e in evs]


async def test_events_come_from_commits_in_order_and_once(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    local = await api.open_account(tenant, "us-east")
    remote = await api.open_account(tenant, "ap-south")
    same = await api.transfer(tenant, "us-east", src, local, 100)
    assert same.status == 201, same.body
    cross = await api.transfer(tenant, "us-east", src, remote, 200)
    assert cross.status == 201, cross.body
    refused = await api.transfer(tenant, "us-east", local, src, 10**6)
    assert refused.status == 422, refused.body
    want = {
        ("account.created", src),
        ("account.created", local),
        ("account.created", remote),
        ("transfer.settled", same.body["id"]),
        ("transfer.pending", cross.body["id"]),
        ("transfer.settled", cross.body["id"]),
    }
    evs = await wait_events(api, tenant, want)
    assert len(_ids(evs)) == len(set(_ids(evs))), "an event id repeated in the stream"
    by_obj: dict[str, list[str]] = {}
    for e in evs:
        assert set(e) == {"id", "type", "created_at", "data"}
        assert e["id"] == model.event_id(e["type"], e["data"]["id"])
        by_obj.setdefault(e["data"]["id"], []).append(e["type"])
    # A same-shard transfer emits transfer.settled only; a cross-shard one pending, then settled.
    assert by_obj[same.body["id"]] == ["transfer.settled"]
    assert by_obj[cross.body["id"]] == ["transfer.pending", "transfer.settled"]
    settled = next(
        e for e in evs if e["type"] == "transfer.settled" and e["data"]["id"] == same.body["id"]
    )
    assert settled["data"]["amount"] == 100
    assert settled["data"]["status"] == "settled"
    created = next(e for e in evs if e["data"]["id"] == remote)
    assert created["data"]["home_region"] == "ap-south"
    assert created["data"]["shard"] == "ap-south-1"
    # The refused transfer wrote nothing, so nothing else is there: every event is one we made
    # (three accounts plus the funding account, the funding transfer, the two above).
    assert len(evs) == 4 + 1 + 3
    # Page size does not matter: one page per event returns the same events, each once.
    one_by_one = await all_events(api, tenant, "eu-west", limit=1)
    assert _ids(one_by_one) == _ids(evs)


async def test_pull_api_never_shows_another_tenant(api: Api) -> None:
    a = "iso" + uuid.uuid4().hex[:10]
    # A tenant whose name extends another's by a dot: its subject must not fall under the
    # shorter one's filter.
    b = a + ".x"
    acc_a = await api.open_account(a, "us-east")
    acc_b = await api.open_account(b, "eu-west")
    evs_a = await wait_events(api, a, {("account.created", acc_a)})
    evs_b = await wait_events(api, b, {("account.created", acc_b)})
    assert {e["data"]["id"] for e in evs_a} == {acc_a}
    assert {e["data"]["id"] for e in evs_b} == {acc_b}
    # A cursor is only a position: another tenant's cursor reads one's own events, never theirs.
    r = await api.call("GET", "us-east", f"/v1/events?after={encode_cursor(0)}", tenant=b)
    assert {e["data"]["id"] for e in r.body["data"]} == {acc_b}


@pytest.mark.parametrize(
    "query",
    [
        "after=nope",
        "after=" + "A" * 200,
        "after=ZTE4NDQ2NzQ0MDczNzA5NTUxNjE2",  # e18446744073709551616: past int64
        "after=czE",  # an entries cursor, not an events one
        "limit=0",
        "limit=501",
        "limit=ten",
        "limit=%D9%A3",  # an Arabic-Indic digit: isdigit() is true, the API says no
    ],
)
async def test_pull_api_bad_input_is_422(api: Api, query: str) -> None:
    r = await api.call("GET", "us-east", f"/v1/events?{query}", tenant=new_tenant())
    assert r.status == 422, r.body
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.body["code"] == "invalid_request"


async def test_events_need_their_scope(api: Api) -> None:
    tenant = new_tenant()
    token = api.token(tenant, ("accounts:read",))
    r = await api.call("GET", "us-east", "/v1/events", token=token)
    assert r.status == 403
    assert r.body["code"] == "forbidden"
    r = await api.call("GET", "us-east", "/v1/webhooks", token=token)
    assert r.status == 403
    assert r.body["code"] == "forbidden"
    r = await api.call("GET", "us-east", "/v1/events")
    assert r.status == 401


async def _nats(local_cluster: Any, region: str = "us-east") -> Any:
    return await nats.connect(local_cluster.refresh_status()["regions"][region]["nats"])


async def test_stream_deduplicates_by_event_id(local_cluster: Any) -> None:
    nc = await _nats(local_cluster)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream.STREAM)
        assert info.config.duplicate_window == stream.DUPLICATE_WINDOW_S
        assert info.config.num_replicas == 3
        eid = "evt_test_" + uuid.uuid4().hex
        subject = stream.subject("dedup-" + uuid.uuid4().hex[:8], "account.created")
        first = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": eid})
        again = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": eid})
        assert not first.duplicate
        assert again.duplicate
        assert again.seq == first.seq
    finally:
        await nc.close()


async def _commit_while(api: Api, tenant: str, src: str, dst: str, n: int) -> list[str]:
    ids: list[str] = []
    for _ in range(n):
        r = await api.transfer(tenant, "us-east", src, dst, 1)
        assert r.status == 201, r.body
        ids.append(r.body["id"])
    return ids


async def test_publisher_killed_resumes_without_gap(api: Api, local_cluster: Any) -> None:
    """Kill the relay process that runs us-east-1's decoder (and so its publisher), commit
    while it is down, start it again: every event arrives, each once."""
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    dst = await api.open_account(tenant, "us-east")
    before = await _commit_while(api, tenant, src, dst, 3)
    kill_process(local_cluster.dir, "relays-us-east")
    try:
        during = await _commit_while(api, tenant, src, dst, 5)
    finally:
        respawn(local_cluster.dir, "relays-us-east")
    after = await _commit_while(api, tenant, src, dst, 2)
    want = {("transfer.settled", t) for t in before + during + after}
    evs = await wait_events(api, tenant, want)
    assert len(_ids(evs)) == len(set(_ids(evs)))
    # Commit order of the shard is the stream order of its events.
    order = [e["data"]["id"] for e in evs if e["type"] == "transfer.settled"]
    assert [t for t in order if t in set(before + during + after)] == before + during + after


async def test_publisher_resumes_after_its_nats_server_died(api: Api, local_cluster: Any) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    dst = await api.open_account(tenant, "us-east")
    kill_process(local_cluster.dir, "nats-us-east")
    try:
        during = await _commit_while(api, tenant, src, dst, 4)
        # The other regions still read the stream (two of three servers are a quorum), and
        # none of these is there yet: us-east's decoder publishes through us-east's server.
        r = await api.call("GET", "eu-west", "/v1/events?limit=500", tenant=tenant)
        if r.status == 200:
            seen = {e["data"]["id"] for e in r.body["data"]}
            assert not seen & set(during)
    finally:
        respawn(local_cluster.dir, "nats-us-east")
    evs = await wait_events(api, tenant, {("transfer.settled", t) for t in during})
    assert len(_ids(evs)) == len(set(_ids(evs)))


async def test_txclient_lists_events_and_manages_webhooks(api: Api, local_cluster: Any) -> None:
    tenant = new_tenant()
    acc = await api.open_account(tenant, "eu-west")
    await wait_events(api, tenant, {("account.created", acc)})
    client = api.client(tenant, "eu-west")
    evs = [e async for e in client.events(page_size=1)]
    assert [(e.type, e.data["id"]) for e in evs] == [("account.created", acc)]
    first = await client.events_page()
    assert first.data[0].id == evs[0].id
    assert not first.has_more
    later = await client.events_page(first.next_cursor)
    assert later.data == []
    assert later.next_cursor == first.next_cursor
    wh = await client.create_webhook("http://127.0.0.1:1/x", ["transfer.settled"])
    assert wh.secret is not None
    assert wh.status == "active"
    assert [w.id for w in await client.webhooks()] == [wh.id]
    assert (await client.webhooks())[0].secret is None
    await client.delete_webhook(wh.id)
    assert await client.webhooks() == []
    with pytest.raises(errors.NotFound):
        await client.delete_webhook(wh.id)
    with pytest.raises(errors.InvalidRequest):
        await client.create_webhook("http://10.0.0.1/x", ["transfer.settled"])
    # The synchronous client has the same calls.
    with Client(dict(local_cluster.routers), api.token(tenant), prefer="us-east", probe=False) as c:
        assert [e.id for e in c.events()] == [e.id for e in evs]


def test_cli_tail_and_status_show_the_stream(
    local_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async def make() -> tuple[str, str]:
        async with aiohttp.ClientSession() as session:
            a = Api(session, dict(local_cluster.routers), local_cluster)
            tenant = new_tenant()
            acc = await a.open_account(tenant, "us-east")
            await wait_events(a, tenant, {("account.created", acc)})
            await a.aclose()
            return tenant, acc

    tenant, acc = asyncio.run(make())
    capsys.readouterr()
    args = ["events", "tail", "--dir", str(local_cluster.dir), "--tenant", tenant]
    assert cli.main([*args, "--from-start", "--count", "1"]) == 0
    lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"]["data"]["id"] == acc
    assert lines[0]["subject"] == stream.subject(tenant, "account.created")
    assert cli.main(["status", "--dir", str(local_cluster.dir), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["events"]["stream"]["messages"] >= 1
    assert sum(r.get("published", 0) for r in st["events"]["regions"].values()) >= 1


async def test_new_replication_slot_publishes_the_commits_it_skipped(
    api: Api, local_cluster: Any
) -> None:
    """What a failover does to the stream (a promoted standby has no slot, the new one starts
    at its current position), made deterministic: the decoder is down while transfers commit,
    then its slot is dropped, so the new slot never shows them; the publisher derives their
    events from the rows (pending and settled of a saga too)."""
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    dst = await api.open_account(tenant, "us-east")
    far = await api.open_account(tenant, "eu-west")
    await wait_events(api, tenant, {("account.created", far)})
    kill_process(local_cluster.dir, "relays-us-east")
    try:
        gap = await _commit_while(api, tenant, src, dst, 3)
        saga = await api.transfer(tenant, "us-east", src, far, 5)
        assert saga.status == 201, saga.body
        opened = await api.open_account(tenant, "us-east")
        dropped: list[Any] = []
        deadline = time.monotonic() + SLOT_RELEASE_WAIT_S
        # The killed decoder's walsender ends when it sees the connection gone: soon.
        while not dropped and time.monotonic() < deadline:
            with psycopg.connect(
                local_cluster.primary_admin_dsn["us-east-1"], autocommit=True
            ) as c:
                dropped = c.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE starts_with(slot_name, %s) AND NOT active",
                    (repl_slot_prefix("us-east-1"),),
                ).fetchall()
            if not dropped:
                await asyncio.sleep(0.2)
        assert dropped, "the decoder's slot was not released to drop"
    finally:
        respawn(local_cluster.dir, "relays-us-east")
    want = {("transfer.settled", t) for t in gap}
    want |= {("transfer.pending", saga.body["id"]), ("transfer.settled", saga.body["id"])}
    want.add(("account.created", opened))
    evs = await wait_events(api, tenant, want)
    assert len(_ids(evs)) == len(set(_ids(evs))), "an event id repeated in the stream"
    # Afterwards the new slot's stream carries on.
    later = await _commit_while(api, tenant, src, dst, 1)
    await wait_events(api, tenant, {("transfer.settled", later[0])})
