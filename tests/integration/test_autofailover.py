"""Automatic failover against a real cluster of its own (ports 7200-7299): real PostgreSQL with
synchronous standbys, real etcd, the WAN emulator, and the three controllers ``txr local up``
starts. The pure rules have their own tests (tests/unit/test_autofailover.py); these prove the
wiring: probes, verdicts under leases, the lock, the real procedure, the CLI.

The tests share the cluster and run in file order (each leaves every shard writable with a
synchronous standby). Measured figures are logged at INFO::

    .venv/bin/pytest tests/integration/test_autofailover.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from consistency import autofailover as af
from consistency import failover_plan
from consistency.etcd import EtcdClient
from consistency.limits import FAILOVER_DETECTION_S, SHARD_LOCK_TTL_S
from consistency.topology import Node
from infra import cli, controller, failover
from infra.local import cluster as lc
from infra.local import control
from infra.wan import WanControl
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S
from tests.fixtures.api import ALL_SCOPES, FUNDING_OVERDRAFT
from tests.fixtures.cluster import private_cluster
from txclient import AsyncClient, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)]
log = logging.getLogger(__name__)

BASE_PORT: Final = 7200 + PORT_OFFSET
REGIONS: Final = ("us-east", "eu-west", "ap-south")
# Long enough for the controllers to have acted had they been going to (detection, a round,
# the lock, the procedure), with slack for a loaded machine.
QUIET_S: Final = 3 * FAILOVER_DETECTION_S + 2.0
# Bounds of the polls below; the goal (writes back within 5 s) is a figure, not an assertion.
FAILOVER_WAIT_S: Final = 30.0
WRITE_WAIT_S: Final = 30.0
POLL_S: Final = 0.1
# One attempt of the polling write (the client retries inside it with the same key).
ATTEMPT_TIMEOUT_S: Final = 1.0


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_cluster(tmp_path_factory, "txr-autofail", BASE_PORT) as d:
        yield d


@pytest.fixture(scope="module")
def accounts(cluster_dir: Path) -> dict[str, tuple[str, str]]:
    """Per home region (= shard): (funding account, customer account)."""

    async def run() -> dict[str, tuple[str, str]]:
        out = {}
        async with _client(cluster_dir, "us-east", timeout=10.0) as c:
            for r in REGIONS:
                f = await c.create_account("EUR", home_region=r, overdraft_limit=FUNDING_OVERDRAFT)
                a = await c.create_account("EUR", home_region=r)
                out[r] = (f.id, a.id)
        return out

    return asyncio.run(run())


def _client(d: Path, via: str, *, timeout: float) -> AsyncClient:
    """A txclient pinned to ``via`` (no probes: the test picks the entry region)."""
    routers = {r: v["router"] for r, v in lc.status(d)["regions"].items()}
    tok = lc.token(d, "af-tenant", list(ALL_SCOPES), 3600)
    return AsyncClient(routers, tok, prefer=via, timeout=timeout, probe=False)


def _write(d: Path, accounts: dict[str, tuple[str, str]], shard: str) -> float:
    """Send one transfer on ``shard`` (same key until acknowledged); seconds it took."""
    src, dst = accounts[shard.removesuffix("-1")]

    async def run() -> float:
        t0 = time.monotonic()
        key = uuid.uuid4().hex
        vias = [_client(d, r, timeout=ATTEMPT_TIMEOUT_S) for r in REGIONS]
        try:
            n = 0
            while time.monotonic() - t0 < WRITE_WAIT_S:
                try:
                    await vias[n % len(vias)].transfer(
                        source=src, destination=dst, amount=1, currency="EUR", idempotency_key=key
                    )
                    return time.monotonic() - t0
                except (errors.OutcomeUnknown, errors.RegionUnavailable, errors.DeadlineExceeded):
                    n += 1
                    await asyncio.sleep(POLL_S)
        finally:
            for c in vias:
                await c.aclose()
        raise AssertionError(f"{shard}: no write acknowledged within {WRITE_WAIT_S:g}s")

    return asyncio.run(run())


def _record(d: Path, shard: str) -> failover_plan.ShardRecord:
    return failover.LocalShardOps(d).load(shard)[0]


def _auto(d: Path, shard: str) -> dict[str, Any]:
    got: dict[str, Any] = failover.autofailover_status(failover.LocalShardOps(d).etcd)
    return dict(got["shards"].get(shard, {}))


def _decided(d: Path, shard: str, reason: str) -> bool:
    """Whether some region's controller's latest decision on ``shard`` has ``reason``."""
    return any(x.get("reason") == reason for x in _auto(d, shard).get("decisions", {}).values())


def _wait(what: str, pred: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def _txr(*argv: str) -> int:
    return cli.main(list(argv))


def _rejoin(d: Path, shard: str, region: str) -> None:
    assert _txr("rejoin", shard, "--node", region, "--dir", str(d)) == 0
    assert _record(d, shard).region_survival


def _primary_node(d: Path, shard: str) -> str:
    return _record(d, shard).shard.primary.name


def test_off_holds_on_acts_and_the_operator_command_is_idempotent(
    cluster_dir: Path, accounts: dict[str, tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    d, shard = cluster_dir, "ap-south-1"
    st = lc.status(d)
    assert all(st["regions"][r]["controller_pid"] for r in REGIONS), st["regions"]
    _write(d, accounts, shard)
    assert _txr("autofailover", "off", "--shard", shard, "--dir", str(d)) == 0
    control.pg_signal(d, _primary_node(d, shard), signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(QUIET_S)
    assert _record(d, shard).shard.epoch == 1
    _wait(
        "a 'disabled' decision",
        lambda: _decided(d, shard, "disabled"),
        QUIET_S,
    )
    assert _auto(d, shard)["on"] is False

    assert _txr("autofailover", "on", "--shard", shard, "--dir", str(d)) == 0
    on = time.monotonic()
    took = _write(d, accounts, shard)
    rec = _record(d, shard)
    assert rec.shard.epoch == 2
    assert rec.shard.primary.region == "eu-west"
    log.info(
        f"\nAUTOFAILOVER: 'on' -> first acked write {time.monotonic() - on:.2f}s "
        f"(write loop {took:.2f}s; killed {on - killed:.1f}s before 'on')"
    )
    last = _auto(d, shard)["last_failover"]
    assert "failed over to ap-south-1@eu-west" in last["detail"]

    # The operator's command on a shard the controller already moved there: exit 0, says so.
    capsys.readouterr()
    assert _txr("failover", shard, "--to", "eu-west", "--dir", str(d)) == 0
    assert "already in eu-west" in capsys.readouterr().out
    assert _txr("status", "--dir", str(d), "--json") == 0
    st_json = json.loads(capsys.readouterr().out)
    assert st_json["shards"][shard]["autofailover"]["last_failover"]["by"] in REGIONS
    assert _txr("status", "--dir", str(d)) == 0
    text = capsys.readouterr().out
    assert "last automatic failover" in text
    assert "detached: ap-south-1@ap-south" in text
    _rejoin(d, shard, "ap-south")


def test_one_cut_off_region_cannot_trigger_a_failover(cluster_dir: Path) -> None:
    """The ap-south <-> us-east link cut: each of those two controllers loses sight of the
    other region's servers, but every primary stays visible to two regions of three, so the
    suspicion never becomes a majority and nothing is failed over."""
    d = cluster_dir
    before = {s: _record(d, s).shard.epoch for s in ("us-east-1", "eu-west-1", "ap-south-1")}

    async def cut(on: bool) -> None:
        async with WanControl(lc.status(d)["wan"]["control"]) as wan:
            await (wan.cut if on else wan.heal)("ap-south", "us-east")

    asyncio.run(cut(True))
    try:
        _wait(
            "ap-south's controller suspects us-east-1",
            lambda: _decided(d, "us-east-1", "suspected"),
            FAILOVER_WAIT_S,
        )
        time.sleep(QUIET_S)
        after = {s: _record(d, s).shard.epoch for s in before}
        assert after == before
    finally:
        asyncio.run(cut(False))


def test_pauses_below_the_detection_time_cause_no_failover(cluster_dir: Path) -> None:
    d, shard = cluster_dir, "eu-west-1"
    node = _primary_node(d, shard)
    pauses: list[float] = []

    def flap() -> None:
        # Timed here, in a thread of its own: exactly what the server sees.
        for _ in range(4):
            pids = control.pg_tree(d, node)
            control.send(pids, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                time.sleep(0.7 * FAILOVER_DETECTION_S)
            finally:
                control.send(pids, signal.SIGCONT)
                pauses.append(time.monotonic() - t0)
            time.sleep(1.0)

    th = threading.Thread(target=flap)
    th.start()
    th.join()
    time.sleep(FAILOVER_DETECTION_S)
    assert max(pauses) < FAILOVER_DETECTION_S, pauses
    assert _record(d, shard).shard.epoch == 1
    assert _record(d, shard).region_survival


def _decision(shard: str, view: af.ShardView) -> af.Decision:
    return af.Decision(
        shard, af.Action.FAILOVER, af.Reason.PRIMARY_LOST, "test", view.epoch, view.standby_region
    )


def test_two_racing_controllers_promote_exactly_once(
    cluster_dir: Path, accounts: dict[str, tuple[str, str]]
) -> None:
    d, shard = cluster_dir, "us-east-1"
    assert _txr("autofailover", "off", "--dir", str(d)) == 0
    try:
        control.pg_signal(d, _primary_node(d, shard), signal.SIGKILL)

        async def race() -> list[af.Acted]:
            ios = [controller.LocalControllerIO(d, r) for r in ("eu-west", "ap-south")]
            try:
                views = [(await io.shards())[shard] for io in ios]
                return list(
                    await asyncio.gather(
                        *(io.act(_decision(shard, v), v) for io, v in zip(ios, views, strict=True))
                    )
                )
            finally:
                for io in ios:
                    await io.close()

        acted = asyncio.run(race())
        reasons = sorted(a.reason.value for a in acted)
        assert reasons == ["changed", "done"], acted
        assert _record(d, shard).shard.epoch == 2
    finally:
        assert _txr("autofailover", "on", "--dir", str(d)) == 0
    _write(d, accounts, shard)
    _rejoin(d, shard, "us-east")


class _DiesAtPromote:
    """The real operations, except that the actor "dies" when it would promote."""

    def __init__(self, ops: failover.LocalShardOps) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def promote(self, node: Node) -> None:
        raise SystemExit("controller died")


def test_a_controller_dying_after_the_epoch_cas_is_finished_by_another(
    cluster_dir: Path, accounts: dict[str, tuple[str, str]]
) -> None:
    d, shard = cluster_dir, "eu-west-1"
    e0 = _record(d, shard).shard.epoch
    assert _txr("autofailover", "off", "--dir", str(d)) == 0
    endpoints = failover.LocalShardOps(d).etcd

    async def take_lock_and_abandon() -> None:
        # The dead controller's lock: its lease is never renewed, so it frees after its TTL.
        async with EtcdClient(endpoints) as c:
            lease = await c.lease_grant(SHARD_LOCK_TTL_S)
            assert await c.try_lock(af.lock_key(shard), b"dead controller", lease) is None

    try:
        control.pg_signal(d, _primary_node(d, shard), signal.SIGKILL)
        asyncio.run(take_lock_and_abandon())
        ops = _DiesAtPromote(failover.LocalShardOps(d))
        with pytest.raises(SystemExit):
            failover_plan.failover(ops, shard, "us-east")
        rec = _record(d, shard)
        assert (rec.shard.epoch, rec.shard.primary.region) == (e0 + 1, "us-east")
    finally:
        assert _txr("autofailover", "on", "--dir", str(d)) == 0
    took = _write(d, accounts, shard)
    log.info(f"\nFINISH: abandoned promotion finished, write back after {took:.2f}s")
    assert _record(d, shard).shard.epoch == e0 + 1  # finished, not failed over again
    assert "finished the promotion" in _auto(d, shard)["last_failover"]["detail"]
    _rejoin(d, shard, "eu-west")


def test_anti_flap_window_blocks_a_second_automatic_failover(
    cluster_dir: Path, accounts: dict[str, tuple[str, str]]
) -> None:
    # eu-west-1 was failed over (finished) moments ago and has its standby back.
    d, shard = cluster_dir, "eu-west-1"
    rec = _record(d, shard)
    assert rec.region_survival
    node = rec.shard.primary.name
    control.pg_signal(d, node, signal.SIGKILL)
    _wait(
        "an anti-flap decision",
        lambda: _decided(d, shard, "anti_flap"),
        QUIET_S,
    )
    assert _record(d, shard).shard.epoch == rec.shard.epoch
    # The operator's call now: start the node again as it was.
    control.restart_pg(d, node)
    _write(d, accounts, shard)


def _primaries_in(d: Path, region: str) -> list[str]:
    shards = ("us-east-1", "eu-west-1", "ap-south-1")
    return [sh for sh in shards if _record(d, sh).shard.primary.region == region]


def test_region_evacuate_then_region_fail(
    cluster_dir: Path, accounts: dict[str, tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    d = cluster_dir
    evac = _record(d, "us-east-1").shard.primary.region
    moving = _primaries_in(d, evac)
    capsys.readouterr()
    assert _txr("region", "evacuate", evac, "--json", "--dir", str(d)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"], out
    assert sorted(r["shard"] for r in out["shards"]) == sorted(moving)
    assert _primaries_in(d, evac) == []
    for sh in moving:
        assert _record(d, sh).region_survival
        _write(d, accounts, sh)

    # A region holding primaries is lost (the controllers are off: the operator acts).
    lost = max(REGIONS, key=lambda r: len(_primaries_in(d, r)))
    failing = _primaries_in(d, lost)
    assert failing
    assert _txr("autofailover", "off", "--dir", str(d)) == 0
    try:
        for sh in failing:
            control.pg_signal(d, _primary_node(d, sh), signal.SIGKILL)
        capsys.readouterr()
        assert _txr("region", "fail", lost, "--json", "--dir", str(d)) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["ok"], out
        assert sorted(r["shard"] for r in out["shards"]) == sorted(failing)
        assert _primaries_in(d, lost) == []
        assert _txr("region", "fail", lost, "--dir", str(d)) == 0
        assert "nothing to do" in capsys.readouterr().out
    finally:
        assert _txr("autofailover", "on", "--dir", str(d)) == 0
    for sh in failing:
        _write(d, accounts, sh)
