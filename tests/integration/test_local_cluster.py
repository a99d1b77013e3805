"""The local cluster launcher: what ``txr local up`` builds, and that ``down`` removes it all.

The shared ``local_cluster`` (base port 7600) serves the read-only checks; the start/stop tests
run their own clusters on base port 7500 so that they can tear them down.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt
import psycopg
import pytest

from consistency.etcd import EtcdClient
from consistency.topology import SlotMap
from infra import cli
from infra.local import cluster as lc
from infra.local import postgres, procs
from infra.local.ports import plan_ports
from infra.wan import WanControl
from regionstore.replication import standbys
from router.config import RouterConfig
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S
from tests.fixtures.cluster import TEST_ROUTER_WORKERS, LocalCluster, kill_process, respawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)]

OWN_BASE_PORT: Final = 7500 + PORT_OFFSET
# A standby applies a synchronously committed row within one replay cycle; allow for load.
REPLAY_TIMEOUT_S: Final = 10.0


def _with_db(dsn: str, db: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + db


def _all_pids(cluster_dir: Path) -> list[tuple[int, str | None]]:
    state = lc.load_state(cluster_dir)
    pids: list[tuple[int, str | None]] = [(p.pid, p.marker) for p in state.procs]
    pids += [(e.pid, str(e.datadir)) for e in state.pg_nodes if e.pid is not None]
    return pids


def _assert_nothing_left(cluster_dir: Path) -> None:
    state = lc.load_state(cluster_dir)
    left = [pid for pid, marker in _all_pids(cluster_dir) if procs.is_alive(pid, marker)]
    assert left == [], f"processes left behind: {left}"
    plan = plan_ports(state.base_port, state.regions)
    busy = [p for p in plan.all_ports() if not procs.port_free(p)]
    assert busy == [], f"ports still bound: {busy}"


async def test_etcd_cluster_formed_through_the_peer_fronts(local_cluster: LocalCluster) -> None:
    state = lc.load_state(local_cluster.dir)
    fronts = {f"http://127.0.0.1:{p}" for p in state.ports["etcd_peer_front"].values()}
    for region, url in local_cluster.etcd.items():
        async with aiohttp.ClientSession() as http, http.get(url + "/health") as resp:
            assert json.loads(await resp.read())["health"] == "true", region
        async with EtcdClient([url]) as client:
            members = await client.member_list()
        assert {m["name"] for m in members} == set(local_cluster.regions)
        assert {u for m in members for u in m["peerURLs"]} == fronts
    # Raft traffic crossed every link of the emulator (identified by its X-PeerURLs header).
    async with WanControl(local_cluster.wan_control) as wan:
        links = await wan.links()
    assert len(links) == 3
    assert all(link["accepted_total"] > 0 and not link["cut"] for link in links), links


def test_every_primary_has_its_sync_standby_in_the_previous_region(
    local_cluster: LocalCluster,
) -> None:
    regions = local_cluster.regions
    for i, region in enumerate(regions):
        shard = lc.shard_name(region)
        standby_region = regions[(i - 1) % len(regions)]
        expected = postgres.application_name(lc.node_name(shard, standby_region))
        found = standbys(_with_db(local_cluster.primary_admin_dsn[shard], "postgres"))
        assert [(s.application_name, s.state, s.sync_state) for s in found] == [
            (expected, "streaming", "sync")
        ]


def test_a_commit_on_a_primary_is_on_its_standby(local_cluster: LocalCluster) -> None:
    for shard, primary in local_cluster.primary_admin_dsn.items():
        token = secrets.token_hex(8)
        # The probe table lives in the maintenance database, away from the ledger's schema.
        with psycopg.connect(_with_db(primary, "postgres"), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS infra_probe (v text)")
            conn.execute("INSERT INTO infra_probe VALUES (%s)", (token,))
        standby = _with_db(local_cluster.standby_admin_dsn[shard], "postgres")
        with psycopg.connect(standby, autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            deadline = time.monotonic() + REPLAY_TIMEOUT_S
            query = "SELECT EXISTS (SELECT 1 FROM infra_probe WHERE v = %s)"
            while conn.execute(query, (token,)).fetchone() != (True,):
                assert time.monotonic() < deadline, f"{shard}: row not replayed on the standby"
                time.sleep(0.05)


def test_status_describes_the_cluster(
    local_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["local", "status", "--dir", str(local_cluster.dir), "--json"]) == 0
    desc: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert desc["topology_source"] == "etcd"
    assert set(desc["regions"]) == set(local_cluster.regions)
    for region, r in desc["regions"].items():
        assert r["router"].startswith("http://127.0.0.1:")
        assert r["redis"].startswith("redis://127.0.0.1:")
        roles = sorted((n["role"], n["shard"]) for n in r["nodes"])
        assert roles[0] == ("primary", lc.shard_name(region))
        assert roles[1][0] == "standby"
        for n in r["nodes"]:
            assert n["pid"]
            assert ":***@" in n["dsn"]
        if local_cluster.routers_started:
            assert r["router_pid"]
            assert r["relays_pid"], "one relay process per region, beside the router"
            assert r["relays_pid"] != r["router_pid"]
            assert r["router_pids"][0] == r["router_pid"]
            assert (
                len(r["router_pids"])
                == RouterConfig.load(local_cluster.dir / "run" / f"router-{region}.json").workers
            )
    for shard, s in desc["shards"].items():
        # Other tests may have bumped an epoch (the fencing tests); it is never below 1.
        assert s["home_region"] == s["primary_region"] == shard[:-2]
        assert s["epoch"] >= 1
    secret_values = lc.pg_passwords(local_cluster.dir).values()
    text = json.dumps(desc)
    assert not any(v in text for v in secret_values if len(v) >= 16)


def _public_key(local_cluster: LocalCluster, token: str) -> jwt.PyJWK:
    kid = jwt.get_unverified_header(token)["kid"]
    jwks = jwt.PyJWKSet.from_json(local_cluster.keys.jwks_path.read_text())
    return jwks[kid]


def test_token_command_signs_with_the_cluster_key(
    local_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["token", "--dir", str(local_cluster.dir)]
    assert cli.main([*base, "--tenant", "t1", "--scopes", "accounts:read", "--ttl", "60"]) == 0
    tok = capsys.readouterr().out.strip()
    claims = jwt.decode(
        tok,
        _public_key(local_cluster, tok),
        algorithms=["EdDSA"],
        audience=lc.JWT_AUDIENCE,
        issuer=lc.JWT_ISSUER,
    )
    assert claims["sub"] == "t1"
    assert claims["scope"] == "accounts:read"
    assert claims["exp"] - claims["iat"] == 60
    # An operator token is its own kind, in its own audience.
    assert cli.main([*base, "--admin", "--ttl", "60"]) == 0
    admin = capsys.readouterr().out.strip()
    claims = jwt.decode(
        admin,
        _public_key(local_cluster, admin),
        algorithms=["EdDSA"],
        audience=lc.JWT_ADMIN_AUDIENCE,
        issuer=lc.JWT_ISSUER,
    )
    assert claims["scope"] == "admin"
    # admin in a tenant token, a 100-year token, an admin token past its bound: refused.
    assert cli.main([*base, "--tenant", "t1", "--scopes", "accounts:read,admin"]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main([*base, "--tenant", "t1", "--scopes", "accounts:read", "--ttl", "3153600000"])
    assert info.value.code == 2
    assert cli.main([*base, "--admin", "--ttl", "7200"]) == 2


def test_dev_token_has_no_admin_scope(local_cluster: LocalCluster) -> None:
    tok = lc.dev_token(local_cluster.dir)
    claims = jwt.decode(
        tok, _public_key(local_cluster, tok), algorithms=["EdDSA"], audience=lc.JWT_AUDIENCE
    )
    assert "admin" not in claims["scope"].split()
    assert "accounts:overdraft" in claims["scope"].split()


@pytest.mark.slow
def test_up_then_down_leaves_nothing(tmp_path: Path) -> None:
    cluster_dir = tmp_path / "c"
    opts = lc.UpOptions(
        dir=cluster_dir, base_port=OWN_BASE_PORT, wan="realistic", start_routers=False
    )
    try:
        state = lc.up(opts)
        assert state["status"] == "up"
        # Under --wan realistic a commit on us-east-1 waits for its standby in ap-south: one
        # 2 x 95 ms round trip at least (the price of G1).
        dsn = postgres.dsn(
            lc.HOST,
            state["ports"]["regions"]["us-east"]["pg_primary"],
            postgres.ADMIN_ROLE,
            lc.pg_passwords(cluster_dir)["admin_password"],
            "postgres",
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
            t0 = time.perf_counter()
            conn.execute("INSERT INTO t VALUES (1)")
            assert time.perf_counter() - t0 >= 0.190
        # Every process of every server, and one postmaster killed alone (its backends,
        # checkpointer and walreceiver outlive it for a while): `down` returns only once all
        # of them have exited, so a next cluster could take the ports at once.
        trees = [
            [int(e["pid"]), *procs.children_of(int(e["pid"]))] for e in state["pg"] if e["pid"]
        ]
        assert all(len(t) > 1 for t in trees), trees
        os.kill(trees[-1][0], signal.SIGKILL)
    finally:
        assert lc.down(cluster_dir) is True
    left = [pid for tree in trees for pid in tree if procs.is_alive(pid)]
    assert left == [], f"PostgreSQL processes still running after down: {left}"
    _assert_nothing_left(cluster_dir)
    lc.purge(cluster_dir)
    # Idempotent: a second down finds nothing running and succeeds.
    assert cli.main(["local", "down", "--dir", str(cluster_dir)]) == 0
    lc.purge(cluster_dir)


def test_down_cleans_up_after_a_start_that_crashed_half_way(tmp_path: Path) -> None:
    cluster_dir = tmp_path / "c"
    launcher = lc.Launcher(
        lc.UpOptions(
            dir=cluster_dir, base_port=OWN_BASE_PORT, start_routers=False, init_schema=False
        ),
        lambda _msg: None,
    )
    try:
        # The steps of up() as far as the first PostgreSQL server, then "crash".
        launcher.prepare()
        launcher.write_secrets()
        launcher.start_wan()
        launcher.spawn_etcd()
        launcher.spawn_redis()
        launcher.start_primary(launcher.regions[0], SlotMap.even(["x"]))
    except Exception:
        lc.down(cluster_dir)
        raise
    # WAN, three etcd, three Redis, one PostgreSQL.
    assert len([p for p, m in _all_pids(cluster_dir) if procs.is_alive(p, m)]) == 8
    assert lc.down(cluster_dir) is True
    _assert_nothing_left(cluster_dir)
    lc.purge(cluster_dir)


async def test_one_router_worker_restarts_alone(local_cluster: LocalCluster) -> None:
    """Every worker is its own recorded process: killing one leaves the region serving through
    the others (SO_REUSEPORT), and it starts again alone from its recorded command line."""
    if not local_cluster.routers_started:
        # Only with the documented opt-out TXR_TEST_NO_ROUTERS=1 (work on the layers below).
        pytest.skip("TXR_TEST_NO_ROUTERS=1: this session started no routers")
    status = lc.status(local_cluster.dir)["regions"]["eu-west"]
    # The fixture always starts TEST_ROUTER_WORKERS (2) workers per region.
    assert len(status["router_pids"]) == TEST_ROUTER_WORKERS, status["router_pids"]
    name = lc.router_proc_name("eu-west", 1)
    kill_process(local_cluster.dir, name)
    url = local_cluster.routers["eu-west"] + "/readyz"
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            # Fresh connections: the kernel spreads them over the live workers only.
            async with http.get(url, headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        pid = respawn(local_cluster.dir, name)
        deadline = time.monotonic() + lc.ROUTER_READY_TIMEOUT_S
        while pid not in lc.status(local_cluster.dir)["regions"]["eu-west"]["router_pids"]:
            assert time.monotonic() < deadline, "the worker did not come back"
            await asyncio.sleep(0.1)
        async with http.get(url) as resp:
            assert resp.status == 200
