"""Idempotent account opens, the saga's roles and its key rotation, on the real cluster
(issue 16)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
import pytest
from psycopg import errors as pg_errors

from consistency import ids
from consistency.idempotency import OpenShards, account_open_fingerprint, open_shards
from infra.local import cluster as lc
from infra.local import postgres
from regionstore import saga_keys
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

# Concurrent opens with one key, sent to every worker of two regions at once.
CONCURRENT_OPENS: Final = 12
TXR: Final = Path(sys.executable).parent / "txr"
CLI_TIMEOUT_S: Final = 60.0
# A cross-region transfer settles within this once nothing holds it (relays retry with backoff).
SETTLE_WAIT_S: Final = 30.0


async def _open(api: Api, tenant: str, via: str, key: str, body: dict[str, Any]) -> Any:
    return await api.call("POST", via, "/v1/accounts", tenant=tenant, json=body, key=key)


async def test_same_key_same_body_is_the_same_account(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "eu-west", "metadata": {"ref": "a-1"}}
    first = await _open(api, tenant, "eu-west", key, body)
    assert first.status == 201, first.body
    assert "Idempotent-Replayed" not in first.headers
    # Again, from another region's router: the same answer, marked as a replay.
    for via in ("eu-west", "us-east"):
        again = await _open(api, tenant, via, key, body)
        assert again.status == 201, again.body
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.body == first.body
    # Another tenant's identical key is its own (the key's scope is the tenant).
    other = await _open(api, new_tenant(), "eu-west", key, body)
    assert other.status == 201
    assert other.body["id"] != first.body["id"]
    # Money moves into the account once, whatever the replays: it is one account.
    acc = await api.account(tenant, "eu-west", first.body["id"])
    assert acc["balance"] == 0


async def test_same_key_another_body_is_409_and_opens_nothing(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "us-east"}
    first = await _open(api, tenant, "us-east", key, body)
    assert first.status == 201
    for changed in (
        {"currency": "USD", "home_region": "us-east"},
        {"currency": "EUR", "home_region": "us-east", "metadata": {"x": 1}},
    ):
        r = await _open(api, tenant, "us-east", key, changed)
        assert r.status == 409, r.body
        assert r.body["code"] == "idempotency_key_reused"
        assert r.headers["Content-Type"].startswith("application/problem+json")
    assert _accounts_of(api, tenant) == 1


async def test_concurrent_opens_with_one_key_open_one_account(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "ap-south"}
    vias = ["ap-south", "us-east"] * (CONCURRENT_OPENS // 2)
    replies = await asyncio.gather(*(_open(api, tenant, v, key, body) for v in vias))
    assert all(r.status == 201 for r in replies), [(r.status, r.body) for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert _accounts_of(api, tenant) == 1


async def test_a_bad_key_is_400(api: Api) -> None:
    tenant = new_tenant()
    r = await _open(api, tenant, "us-east", "k" * 256, {"currency": "EUR"})
    assert r.status == 400
    assert r.body["code"] == "invalid_request"
    assert _accounts_of(api, tenant) == 0


def _homes(api: Api) -> dict[str, str]:
    shards = lc.status(api.cluster.dir)["shards"]
    return {name: str(s["home_region"]) for name, s in shards.items()}


def _two_step_key(api: Api, tenant: str, region: str) -> tuple[str, OpenShards]:
    """A key whose arbiter shard is not homed in ``region``: its open naming ``region`` takes
    the two-step path (claim on the arbiter, account on a shard of ``region``)."""
    homes = _homes(api)
    for _ in range(1000):
        key = uuid.uuid4().hex
        plan = open_shards(tenant, key, homes, region)
        assert plan is not None
        if plan.arbiter != plan.target:
            return key, plan
    raise AssertionError("no key found whose arbiter is outside the region")


def _region_of(body: dict[str, Any]) -> str:
    return str(body["home_region"])


async def test_a_key_without_home_region_opens_one_account_from_every_region(api: Api) -> None:
    """Without home_region, the key (not the router asked) picks the shard: the same from
    every region's router, sequentially and concurrently, so one account and one row."""
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body: dict[str, Any] = {"currency": "EUR", "metadata": {"ref": "no-home"}}
    first = await _open(api, tenant, "us-east", key, body)
    assert first.status == 201, first.body
    expect = open_shards(tenant, key, _homes(api), None)
    assert expect is not None
    assert first.body["shard"] == expect.arbiter
    for via in ("eu-west", "ap-south", "us-east"):
        again = await _open(api, tenant, via, key, body)
        assert again.status == 201, again.body
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.body == first.body
    assert _accounts_of(api, tenant) == 1
    # Concurrently, a fresh key, every region's router at once: one account.
    tenant = new_tenant()
    key = uuid.uuid4().hex
    vias = ["us-east", "eu-west", "ap-south"] * (CONCURRENT_OPENS // 3)
    replies = await asyncio.gather(*(_open(api, tenant, v, key, body) for v in vias))
    assert all(r.status == 201 for r in replies), [(r.status, r.body) for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert _accounts_of(api, tenant) == 1


async def test_a_key_retried_with_another_home_region_is_409(api: Api) -> None:
    """The key is arbitrated in one place whatever region the body names: naming one, naming
    another or naming none is another body, 409 from every router, and nothing opens."""
    tenant = new_tenant()
    key, plan = _two_step_key(api, tenant, "eu-west")
    body = {"currency": "EUR", "home_region": "eu-west"}
    first = await _open(api, tenant, "ap-south", key, body)
    assert first.status == 201, first.body
    assert (first.body["shard"], _region_of(first.body)) == (plan.target, "eu-west")
    arbiter_region = _homes(api)[plan.arbiter]
    for via in ("us-east", "eu-west", "ap-south"):
        for changed in (
            {"currency": "EUR"},
            {"currency": "EUR", "home_region": arbiter_region},
        ):
            r = await _open(api, tenant, via, key, changed)
            assert r.status == 409, (via, changed, r.body)
            assert r.body["code"] == "idempotency_key_reused"
    assert _accounts_of(api, tenant) == 1
    # The other way round: first without home_region, then naming a region.
    tenant = new_tenant()
    key = uuid.uuid4().hex
    first = await _open(api, tenant, "eu-west", key, {"currency": "EUR"})
    assert first.status == 201, first.body
    for region in ("us-east", "eu-west", "ap-south"):
        r = await _open(api, tenant, "us-east", key, {"currency": "EUR", "home_region": region})
        assert r.status == 409, (region, r.body)
    assert _accounts_of(api, tenant) == 1


async def test_two_step_opens_are_one_account_from_every_region(api: Api) -> None:
    """A key whose arbiter is in another region than the one named: claimed there, opened in
    the named region; replays and concurrent duplicates from every router meet on the claim."""
    tenant = new_tenant()
    key, plan = _two_step_key(api, tenant, "ap-south")
    body = {"currency": "EUR", "home_region": "ap-south", "metadata": {"k": "two-step"}}
    vias = ["us-east", "eu-west", "ap-south"] * (CONCURRENT_OPENS // 3)
    replies = await asyncio.gather(*(_open(api, tenant, v, key, body) for v in vias))
    assert all(r.status == 201 for r in replies), [(r.status, r.body) for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert {r.body["shard"] for r in replies} == {plan.target}
    later = await _open(api, tenant, "eu-west", key, body)
    assert later.status == 201
    assert later.body["id"] == replies[0].body["id"]
    assert _accounts_of(api, tenant) == 1
    assert _key_rows(api, tenant, key) == {
        plan.arbiter: later.body["id"],
        plan.target: later.body["id"],
    }


async def test_a_claim_left_by_a_dead_opener_is_finished_by_the_retry(api: Api) -> None:
    """An opener that claimed the key and died before opening the account: the retry opens the
    claimed id (the same account the first attempt would have had). A claim whose id is taken
    by another account (a clash of random bits) is given back and the open takes a new id."""
    tenant = new_tenant()
    key, plan = _two_step_key(api, tenant, "us-east")
    body: dict[str, Any] = {"currency": "EUR", "home_region": "us-east"}
    slot = _slot_of(api, plan.target)
    claimed = ids.new_account_id(slot)
    assert _claim(api, plan.arbiter, tenant, key, body, claimed) == "claimed"
    r = await _open(api, tenant, "eu-west", key, body)
    assert r.status == 201, r.body
    assert r.body["id"] == ids.format_account_id(claimed)
    assert _accounts_of(api, tenant) == 1
    # A claim naming another tenant's account: never returned, released, a fresh id opened.
    other = await api.open_account(new_tenant(), "us-east")
    other_id = ids.parse_account_id(other)
    assert other_id is not None
    tenant = new_tenant()
    key, plan = _two_step_key(api, tenant, "us-east")
    assert _claim(api, plan.arbiter, tenant, key, body, other_id) == "claimed"
    r = await _open(api, tenant, "ap-south", key, body)
    assert r.status == 201, r.body
    assert r.body["id"] != other
    assert _accounts_of(api, tenant) == 1
    assert _key_rows(api, tenant, key)[plan.arbiter] == r.body["id"]


def _slot_of(api: Api, shard: str) -> int:
    with psycopg.connect(lc.primary_admin_dsns(api.cluster.dir)[shard]) as conn:
        row = conn.execute("SELECT min(slot) FROM txr.owned_slots").fetchone()
    assert row is not None
    return int(row[0])


def _claim(
    api: Api, shard: str, tenant: str, key: str, body: dict[str, Any], account_id: int
) -> str:
    fingerprint = account_open_fingerprint(
        currency=body["currency"],
        home_region=body.get("home_region"),
        overdraft_limit=body.get("overdraft_limit", 0),
        metadata=body.get("metadata", {}),
    )
    with psycopg.connect(lc.primary_admin_dsns(api.cluster.dir)[shard]) as conn:
        fence = conn.execute("SELECT epoch FROM txr.fence").fetchone()
        assert fence is not None
        row = conn.execute(
            "SELECT code FROM txr.claim_account_key(%s, %s, %s, %s, %s, %s, 0, '{}')",
            (fence[0], tenant, key, fingerprint, account_id, body["currency"]),
        ).fetchone()
    assert row is not None
    return str(row[0])


def _key_rows(api: Api, tenant: str, key: str) -> dict[str, str]:
    """Each shard's account_open_keys row for the key: shard -> the account id it names."""
    rows: dict[str, str] = {}
    for shard, dsn in lc.primary_admin_dsns(api.cluster.dir).items():
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT account_id FROM txr.account_open_keys WHERE tenant = %s AND key = %s",
                (tenant, key),
            ).fetchone()
        if row is not None:
            rows[shard] = ids.format_account_id(int(row[0]))
    return rows


def _accounts_of(api: Api, tenant: str) -> int:
    total = 0
    for dsn in lc.primary_admin_dsns(api.cluster.dir).values():
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM txr.accounts WHERE tenant = %s", (tenant,)
            ).fetchone()
        assert row is not None
        total += int(row[0])
    return total


async def test_the_app_role_cannot_credit_without_leg1(api: Api) -> None:
    """With the routers' DB password, leg 2 (a credit from a transit account) is refused; the
    relays' role can call it but a message it made up is refused as unauthenticated."""
    tenant = new_tenant()
    dst = await api.open_account(tenant, "eu-west")
    dst_id = ids.parse_account_id(dst)
    assert dst_id is not None
    pw = lc.pg_passwords(api.cluster.dir)
    admin_dsn = lc.primary_admin_dsns(api.cluster.dir)
    shard = next(s for s in admin_dsn if s.startswith("eu-west"))
    base = admin_dsn[shard]
    host_port = base.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    # A credit of 1000 from us-east-1's transit account, with no leg 1 behind it.
    call = (
        "SELECT code FROM txr.apply_inbound(%s, %s, 'us-east-1', %s, 1, %s, 1000, 'EUR', %s,"
        " now(), 1, %s)"
    )
    with psycopg.connect(base) as conn:
        fence = conn.execute("SELECT epoch FROM txr.fence").fetchone()
        slot = conn.execute(
            "SELECT epoch FROM txr.owned_slots WHERE slot = %s", (ids.account_slot(dst_id),)
        ).fetchone()
    assert fence is not None
    assert slot is not None
    params = (fence[0], uuid.uuid4(), tenant, dst_id, slot[0], b"\x00" * 32)
    app = postgres.dsn(host, int(port), postgres.APP_ROLE, pw["app_password"], "txr")
    with psycopg.connect(app) as conn, pytest.raises(pg_errors.InsufficientPrivilege):
        conn.execute(call, params)
    relay = postgres.dsn(host, int(port), postgres.RELAY_ROLE, pw["relay_password"], "txr")
    with psycopg.connect(relay) as conn:
        got = conn.execute(call, params).fetchone()
    assert got == ("unauthenticated",)
    assert (await api.account(tenant, "eu-west", dst))["balance"] == 0


async def test_txr_keys_rotate_saga_on_the_cluster(api: Api) -> None:
    """`txr keys rotate-saga` on the running cluster: every shard signs with the new key and
    keeps the old one, and cross-region transfers settle before and after. (A message pending
    under the old key while the key changes: tests/integration/test_saga_auth.py.)"""
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1000)
    dst = await api.open_account(tenant, "eu-west")
    dsns = lc.primary_admin_dsns(api.cluster.dir)
    before = await api.transfer(tenant, "us-east", src, dst, 100)
    assert before.status == 201, before.body
    old = {s: saga_keys.signing_key(saga_keys.list_keys(d)) for s, d in dsns.items()}
    rotated = await asyncio.to_thread(
        subprocess.run,
        [str(TXR), "keys", "rotate-saga", "--dir", str(api.cluster.dir), "--json"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr
    listed = orjson.loads(rotated.stdout)
    assert set(listed) == set(dsns)
    for shard, keys in listed.items():
        signing = [k["key_id"] for k in keys if k["signing"]]
        assert len(signing) == 1
        assert signing[0] > (old[shard] or 0)
        assert old[shard] in {k["key_id"] for k in keys}, "the old key must stay"
    after = await api.transfer(tenant, "us-east", src, dst, 10)
    assert after.status == 201, after.body
    for t in (before.body, after.body):
        assert await _settled(api, tenant, t["id"]), t
    assert (await api.account(tenant, "eu-west", dst))["balance"] == 110
    parsed = ids.parse_transfer_id(after.body["id"])
    assert parsed is not None
    with psycopg.connect(dsns[next(s for s in dsns if s.startswith("us-east"))]) as conn:
        row = conn.execute(
            "SELECT key_id FROM txr.outbox WHERE transfer_id = %s", (parsed[1],)
        ).fetchone()
    assert row is not None
    assert row[0] == max(k["key_id"] for k in listed[next(iter(listed))])


async def _settled(api: Api, tenant: str, transfer_id: str) -> bool:
    deadline = time.monotonic() + SETTLE_WAIT_S
    while time.monotonic() < deadline:
        r = await api.call("GET", "eu-west", f"/v1/transfers/{transfer_id}", tenant=tenant)
        if r.body.get("status") == "settled":
            return True
        await asyncio.sleep(0.2)
    return False


# The write procedures an open may call, by the text pg_stat_statements records for them.
_OPEN_PROCEDURES: Final = (
    "txr.create_account(",
    "txr.claim_account_key(",
    "txr.release_account_key(",
)
# Opens per case of the round-trip count: enough that a stray extra call per open shows.
OPENS_COUNTED: Final = 5


def _procedure_calls(api: Api) -> dict[tuple[str, str], int]:
    """(shard, procedure) -> calls so far by the app role, from pg_stat_statements (top-level
    statements: one per store call, whatever runs inside the procedure)."""
    out: dict[tuple[str, str], int] = {}
    for shard, dsn in lc.primary_admin_dsns(api.cluster.dir).items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            rows = conn.execute(
                "SELECT s.query, s.calls FROM pg_stat_statements s"
                " JOIN pg_roles r ON r.oid = s.userid"
                " WHERE r.rolname = %s"
                " AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (postgres.APP_ROLE,),
            ).fetchall()
        for query, calls in rows:
            for proc in _OPEN_PROCEDURES:
                if proc in str(query):
                    key = (shard, proc.rstrip("("))
                    out[key] = out.get(key, 0) + int(calls)
    return out


def _calls_since(api: Api, before: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    after = _procedure_calls(api)
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_an_open_is_one_store_call_and_a_two_step_open_two(api: Api) -> None:
    """The round trips of an open to the primaries (issue 11): one procedure call without a
    key, and with a key whose arbiter is its home (first open and replay alike); a claim on
    the arbiter plus the open on the named region's shard for a two-step key. Nothing else
    (a release only follows an id clash)."""
    tenant = new_tenant()
    homes = _homes(api)
    us_east = [s for s, r in homes.items() if r == "us-east"]
    before = _procedure_calls(api)
    for _ in range(OPENS_COUNTED):
        r = await _open_unkeyed(api, tenant, "us-east", {"currency": "EUR"})
        assert r.status == 201, r.body
    calls = _calls_since(api, before)
    assert sum(calls.values()) == OPENS_COUNTED, calls
    assert {s for s, _ in calls} <= set(us_east)
    assert {p for _, p in calls} == {"txr.create_account"}

    key = uuid.uuid4().hex
    body: dict[str, Any] = {"currency": "EUR"}
    plan = open_shards(tenant, key, homes, None)
    assert plan is not None
    before = _procedure_calls(api)
    for _ in range(OPENS_COUNTED):  # the first opens, the others replay
        r = await _open(api, tenant, "us-east", key, body)
        assert r.status == 201, r.body
    assert _calls_since(api, before) == {(plan.arbiter, "txr.create_account"): OPENS_COUNTED}

    key, plan = _two_step_key(api, tenant, "eu-west")
    body = {"currency": "EUR", "home_region": "eu-west"}
    before = _procedure_calls(api)
    for _ in range(OPENS_COUNTED):
        r = await _open(api, tenant, "us-east", key, body)
        assert r.status == 201, r.body
    assert _calls_since(api, before) == {
        (plan.arbiter, "txr.claim_account_key"): OPENS_COUNTED,
        (plan.target, "txr.create_account"): OPENS_COUNTED,
    }


async def _open_unkeyed(api: Api, tenant: str, via: str, body: dict[str, Any]) -> Any:
    return await api.call("POST", via, "/v1/accounts", tenant=tenant, json=body)
