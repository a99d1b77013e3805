"""Failover, switchover and rejoin against a real cluster of its own (ports 7300-7399).

Rehome has its own module and cluster: tests/integration/test_rehome.py.

Every guarantee is checked on the databases and through the routers: acknowledged transfers
survive (G1), each is applied once (G2), stale routers are refused (G5), `txr reconcile` is
clean after failover. Measured figures are printed (logged at INFO)::

    .venv/bin/pytest tests/integration/test_failover.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from consistency import coherence, ids
from infra import cli, failover
from infra.local import cluster as lc
from infra.local import postgres
from router.app import create_app
from router.config import RouterConfig
from router.resources import TOPOLOGY
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S
from tests.fixtures.api import ALL_SCOPES, FUNDING_OVERDRAFT
from tests.fixtures.cluster import private_cluster
from txclient import AsyncClient, RetryBudget, Session, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)]
log = logging.getLogger(__name__)

BASE_PORT: Final = 7300 + PORT_OFFSET
CLIENTS: Final = 3
LOAD_S: Final = 2.5
# A client retries an unacknowledged write (503/504/connection error) with the same key for at
# most this long: past it the transfer is "unknown", never counted as acked.
RETRY_FOR_S: Final = 30.0
RETRY_BUDGET_TOKENS: Final = 10_000.0
RECONCILE_TRIES: Final = 40


@dataclass
class Ack:
    transfer_id: str
    source: str
    destination: str
    at: float


@dataclass
class Load:
    acks: list[Ack] = field(default_factory=list)
    unknown: int = 0


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_cluster(tmp_path_factory, "txr-failover", BASE_PORT) as d:
        yield d


def _routers(d: Path) -> dict[str, str]:
    return {r: v["router"] for r, v in lc.status(d)["regions"].items()}


class Client:
    """One tenant's txclient per entry region (pinned to it), one session for all of them."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.routers = _routers(d)
        self.tenant = "t-" + uuid.uuid4().hex[:10]
        self.tok = lc.token(d, self.tenant, list(ALL_SCOPES), 3600)
        self.session = Session()
        # The load keeps retrying through a failover for up to RETRY_FOR_S: a budget that
        # does not run dry in these few seconds (the default one is for production callers).
        budget = RetryBudget(tokens_max=RETRY_BUDGET_TOKENS)
        self.clients = {
            r: AsyncClient(
                self.routers,
                self.tok,
                prefer=r,
                timeout=RETRY_FOR_S,
                session=self.session,
                budget=budget,
            )
            for r in self.routers
        }

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.aclose()

    def h(self, key: str | None = None) -> dict[str, str]:
        """Headers for a raw request (the stale in-process router below)."""
        out = {"Authorization": f"Bearer {self.tok}"}
        if key:
            out["Idempotency-Key"] = key
        return out

    async def open(self, region: str, overdraft: int = 0) -> str:
        a = await self.clients[region].create_account(
            "EUR", home_region=region, overdraft_limit=overdraft
        )
        return a.id

    async def acked(self, via: str, src: str, dst: str, amount: int = 1) -> str | None:
        """The transfer id once acknowledged (txclient retries with one key), or None if its
        outcome is still unknown (or it never started) after RETRY_FOR_S."""
        try:
            t = await self.clients[via].transfer(
                source=src, destination=dst, amount=amount, currency="EUR"
            )
        except (errors.OutcomeUnknown, errors.RegionUnavailable):
            return None
        return t.id


@contextlib.asynccontextmanager
async def _client(d: Path) -> AsyncIterator[Client]:
    c = Client(d)
    try:
        yield c
    finally:
        await c.aclose()


async def _run_load(
    c: Client, pairs: list[tuple[str, str]], vias: list[str], stop: asyncio.Event
) -> Load:
    load = Load()

    async def one(i: int) -> None:
        src, dst = pairs[i]
        n = 0
        while not stop.is_set():
            via = vias[(i + n) % len(vias)]
            n += 1
            tid = await c.acked(via, src, dst)
            if tid is None:
                load.unknown += 1
            else:
                load.acks.append(Ack(tid, src, dst, time.monotonic()))

    await asyncio.gather(*(one(i) for i in range(len(pairs))))
    return load


async def _pairs(c: Client, region: str) -> list[tuple[str, str]]:
    funding = await c.open(region, overdraft=FUNDING_OVERDRAFT)
    pairs = []
    for _ in range(CLIENTS):
        src, dst = await c.open(region), await c.open(region)
        assert await c.acked(region, funding, src, 1_000_000)
        pairs.append((src, dst))
    return pairs


def _admin(d: Path, shard: str) -> str:
    return lc.primary_admin_dsns(d)[shard]


def _node_dsn(d: Path, node: str) -> str:
    pw = lc.pg_passwords(d)
    e = lc.load_state(d).pg_node(node)
    assert e is not None, node
    return postgres.dsn(lc.HOST, e.port, postgres.ADMIN_ROLE, pw["admin_password"], lc.DB_NAME)


def _entries_per_transfer(dsn: str, public_ids: list[str]) -> dict[str, int]:
    """Ledger entries per transfer, keyed by the public transfer id."""
    by_uuid = {}
    for pub in public_ids:
        parsed = ids.parse_transfer_id(pub)
        assert parsed is not None, pub
        by_uuid[str(parsed[1])] = pub
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT transfer_id::text, count(*) FROM txr.ledger_entries"
            " WHERE transfer_id::text = ANY(%s) GROUP BY 1",
            (list(by_uuid),),
        ).fetchall()
    return {by_uuid[r[0]]: int(r[1]) for r in rows}


async def _check_acked(c: Client, load: Load, dsn: str) -> None:
    """Every acked transfer exists exactly once; destination balances equal the acked model."""
    acked = [a.transfer_id for a in load.acks]
    assert len(set(acked)) == len(acked)
    per = _entries_per_transfer(dsn, acked)
    missing = [i for i in acked if i not in per]
    assert not missing, f"{len(missing)} acknowledged transfers lost"
    assert all(n == 2 for n in per.values()), "a transfer applied more than once"
    want: dict[str, int] = {}
    for a in load.acks:
        want[a.destination] = want.get(a.destination, 0) + 1
    for acc, n in want.items():
        got = await c.clients["eu-west"].get_account(acc, consistency="strong")
        assert got.balance == n, (acc, got.balance, n)
    # And through the API, via another region's router.
    for a in load.acks[:: max(1, len(load.acks) // 10)]:
        assert (await c.clients["ap-south"].get_transfer(a.transfer_id)).id == a.transfer_id


def _max_gap(load: Load, t0: float) -> float:
    times = sorted([t0, *(a.at for a in load.acks)])
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@contextlib.asynccontextmanager
async def _stale_router(d: Path, region: str) -> AsyncIterator[TestClient[Any, Any]]:
    """An in-process router whose topology watch is stopped: it misses every change."""
    config = RouterConfig.load(d / "run" / f"router-{region}.json")
    app = create_app(dataclasses.replace(config, port=0))
    async with TestClient(TestServer(app)) as client:
        await app[TOPOLOGY].stop()
        yield client


async def _cli(*argv: str) -> int:
    # The CLI is synchronous; keep the event loop (and the load) running meanwhile.
    return await asyncio.to_thread(cli.main, list(argv))


async def _reconcile_clean(d: Path) -> None:
    for _ in range(RECONCILE_TRIES):
        if await _cli("reconcile", "--dir", str(d), "--json") == 0:
            return
        await asyncio.sleep(0.5)
    raise AssertionError("txr reconcile never came back clean")


# The change feed's recovery after a switchover or failover keeps every entry it can prove
# unchanged (router.relays.feed); accounts untouched for longer than this before the move are.
QUIET_BEFORE_MOVE_S: Final = 2.0
# The new primary's region starts the decoder and recovers every region within this.
FEED_RECOVERY_S: Final = 30.0


async def _quiet_accounts(c: Client, region: str, n: int = 4) -> list[str]:
    """Accounts of ``region``'s shard that nothing writes again, cached in every region."""
    accounts = [await c.open(region) for _ in range(n)]
    await _wait_entries(c.d, accounts, epoch=1, timeout_s=FEED_RECOVERY_S)
    return accounts


def _redis_urls(d: Path) -> dict[str, str]:
    return {r: v["redis"] for r, v in lc.status(d)["regions"].items()}


async def _wait_entries(d: Path, accounts: list[str], *, epoch: int, timeout_s: float) -> None:
    """Until every region's Redis holds a value (not a tombstone) for every account under the
    shard epoch ``epoch``."""
    ids_ = [ids.parse_account_id(a) for a in accounts]
    assert all(i is not None for i in ids_)
    deadline = time.monotonic() + timeout_s
    clients = {r: aioredis.Redis.from_url(u) for r, u in _redis_urls(d).items()}
    try:
        while True:
            missing = []
            for r, cl in clients.items():
                for a, i in zip(accounts, ids_, strict=True):
                    assert i is not None
                    v, t = await cl.hmget(coherence.entry_key(epoch, i), ["v", "t"])
                    if v is None or t is not None:
                        missing.append((r, a))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"entries missing under epoch {epoch}: {missing[:4]}")
            await asyncio.sleep(0.1)
    finally:
        for cl in clients.values():
            await cl.aclose()


async def test_switchover_under_load(cluster_dir: Path) -> None:
    d = cluster_dir
    async with _client(d) as c:
        quiet = await _quiet_accounts(c, "eu-west")
        pairs = await _pairs(c, "eu-west")
        await asyncio.sleep(QUIET_BEFORE_MOVE_S)
        stop = asyncio.Event()
        task = asyncio.create_task(_run_load(c, pairs, ["us-east", "ap-south", "eu-west"], stop))
        await asyncio.sleep(LOAD_S)
        t0 = time.monotonic()
        assert await _cli("switchover", "eu-west-1", "--to", "us-east", "--dir", str(d)) == 0
        t1 = time.monotonic()
        await asyncio.sleep(LOAD_S)
        stop.set()
        load = await task
        during = [a for a in load.acks if a.at >= t0 - 1]
        gap = _max_gap(Load(during), t0 - 1)
        log.info(
            f"\nSWITCHOVER: command {t1 - t0:.2f}s, {len(load.acks)} acked, "
            f"{load.unknown} unknown, longest gap between acks {gap:.3f}s"
        )
        assert load.unknown == 0
        await _check_acked(c, load, _admin(d, "eu-west-1"))
        st = failover.cluster_status(d)["shards"]["eu-west-1"]
        assert st["primary_region"] == "us-east"
        assert st["epoch"] == 2
        assert st["region_survival_now"], st
        assert st["standbys"][0]["node"] == "eu-west-1@eu-west"
        assert st["standbys"][0]["sync_state"] == "sync"
        # The decoder followed the primary to us-east, recreated its slot there and kept every
        # region's entries of the accounts nothing wrote (under the new epoch's keys).
        await _wait_entries(d, quiet, epoch=2, timeout_s=FEED_RECOVERY_S)
        await _reconcile_clean(d)


async def test_kill_primary_failover_and_rejoin(cluster_dir: Path) -> None:
    d = cluster_dir
    shard, old_node = "us-east-1", "us-east-1@us-east"
    async with _client(d) as c, _stale_router(d, "eu-west") as stale:
        quiet = await _quiet_accounts(c, "us-east")
        pairs = await _pairs(c, "us-east")
        await asyncio.sleep(QUIET_BEFORE_MOVE_S)
        # A refusal first: the target must be a standby of the shard.
        assert await _cli("failover", shard, "--to", "eu-west", "--dir", str(d)) == 1
        stop = asyncio.Event()
        task = asyncio.create_task(_run_load(c, pairs, ["eu-west", "ap-south"], stop))
        await asyncio.sleep(LOAD_S)
        entry = lc.load_state(d).pg_node(old_node)
        assert entry is not None, old_node
        assert entry.pid is not None, old_node
        os.kill(entry.pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        assert await _cli("failover", shard, "--to", "ap-south", "--dir", str(d)) == 0
        t1 = time.monotonic()
        await asyncio.sleep(LOAD_S)
        stop.set()
        load = await task
        first = min((a.at for a in load.acks if a.at > t0), default=None)
        assert first is not None
        log.info(
            f"\nFAILOVER: command {t1 - t0:.2f}s, command start -> first acked write "
            f"{first - t0:.3f}s (kill -> first ack {first - killed:.3f}s), "
            f"{len(load.acks)} acked, {load.unknown} unknown"
        )
        assert load.unknown == 0
        new_dsn = _admin(d, shard)
        await _check_acked(c, load, new_dsn)
        st = failover.cluster_status(d)["shards"][shard]
        assert st["epoch"] == 2
        assert not st["region_survival"]
        assert not st["region_survival_now"]
        assert st["detached"] == [old_node]
        await _wait_entries(d, quiet, epoch=2, timeout_s=FEED_RECOVERY_S)
        # Writes resume through every region's router.
        for via in ("us-east", "eu-west", "ap-south"):
            assert await c.acked(via, pairs[0][0], pairs[0][1]) is not None
        await _reconcile_clean(d)

        # The old primary comes back as it was (not fenced: it was dead) and a router with the
        # old map writes to it: it cannot be acknowledged (its synchronous standby was
        # promoted), so the client never counts it.
        postgres.start(entry.datadir, entry.log)
        src, dst = pairs[1]
        key = uuid.uuid4().hex
        body = {"source": src, "destination": dst, "amount": 7, "currency": "EUR"}
        r = await stale.post("/v1/transfers", json=body, headers=c.h(key))
        text = await r.text()
        log.info(f"stale router -> revived old primary: {r.status} {text[:120]}")
        if r.status == 201:
            # It found the new primary by refreshing: then the write is there.
            tid = (await r.json())["id"]
            assert _entries_per_transfer(new_dsn, [tid]) == {tid: 2}
        else:
            assert r.status in (503, 504), text
            assert await c.acked("eu-west", src, dst, 7) is not None

        assert await _cli("rejoin", shard, "--node", "us-east", "--dir", str(d)) == 0
        st = failover.cluster_status(d)["shards"][shard]
        assert st["region_survival_now"], st
        assert st["standbys"][0]["node"] == old_node
        assert st["standbys"][0]["state"] == "streaming"
        # Nothing diverges: the rejoined node holds exactly the new primary's accounts.
        await asyncio.sleep(0.5)
        q = "SELECT md5(string_agg(id || ':' || balance || ':' || version, ',' ORDER BY id))"
        with psycopg.connect(new_dsn) as a, psycopg.connect(_node_dsn(d, old_node)) as b:
            sa = a.execute(q + " FROM txr.accounts").fetchone()
            sb = b.execute(q + " FROM txr.accounts").fetchone()
        assert sa == sb
        assert await _cli("status", "--dir", str(d)) == 0
