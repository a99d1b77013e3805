"""A region's failover controller process: ``python -m infra.controller --dir D --region R``.

The rules are ``consistency.autofailover`` (pure, unit-tested); this module is their I/O for a
local cluster: probes are real queries over one kept connection per server, dialled from this
region through the WAN emulator (so a partition hides a server from it as from the region's
routers), and a second kept connection per server (the sentinel) waits for that server's socket
to close, which starts a round at once: idle, rounds run at ``PROBE_IDLE_INTERVAL_S`` rather
than the fast ``PROBE_INTERVAL_S`` (consistency.limits says why that is safe). Verdicts, the
mode, decisions and the anti-flap record live in etcd (``consistency.autofailover.CONTROL_PREFIX``,
outside the topology prefix the routers watch); actions run ``consistency.failover_plan`` with
``infra.failover.LocalShardOps`` dialling from this region, under the per-shard lock
(``consistency.autofailover.lock_key``) that the operator commands take too (``shard_lock``
below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
from psycopg import conninfo

from consistency import autofailover as af
from consistency import failover_plan
from consistency.errors import ConsistencyError, EtcdError, LeaseExpired
from consistency.etcd import EtcdClient, PrefixMirror
from consistency.failover_plan import ShardRecord
from consistency.limits import (
    CONTROLLER_ETCD_TIMEOUT_S,
    PROBE_TIMEOUT_S,
    SENTINEL_RECONNECT_S,
    SHARD_LOCK_TTL_S,
    SHARD_LOCK_WAIT_S,
    TCP_KEEPALIVE_COUNT,
    TCP_KEEPALIVE_IDLE_S,
    TCP_KEEPALIVE_INTERVAL_S,
    VERDICT_LEASE_TTL_S,
)
from consistency.topology import SHARD_PREFIX, Node
from infra import failover
from infra.local import cluster, postgres
from regionstore import pgwait

log = logging.getLogger("txr.controller")

# A lock holder renews its lease this many times per TTL.
LOCK_RENEWALS_PER_TTL: Final = 3
# `shard_lock` polls a lock someone else holds this often.
LOCK_POLL_S: Final = 0.1
# A round slower than this is logged: its verdict may go stale for the other regions.
ROUND_SLOW_S: Final = 1.0
PROBE_SQL: Final = "SELECT pg_is_in_recovery(), (SELECT epoch FROM txr.fence LIMIT 1)"
# libpq connection parameters of every controller connection (consistency.limits says why).
KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": TCP_KEEPALIVE_IDLE_S,
    "keepalives_interval": TCP_KEEPALIVE_INTERVAL_S,
    "keepalives_count": TCP_KEEPALIVE_COUNT,
}


def holder_id(what: str) -> bytes:
    """Who holds a lock, for the humans reading etcd (and for unlock to delete only its own)."""
    return orjson.dumps(
        {"by": what, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    )


async def _renew(client: EtcdClient, lease: int, ttl_s: int, lost: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(ttl_s / LOCK_RENEWALS_PER_TTL)
        try:
            await client.lease_keepalive(lease)
        except LeaseExpired:
            lost.set()
            return
        except EtcdError:
            # One failed renewal is not yet a lost lease; the next may get through.
            continue


@contextlib.asynccontextmanager
async def hold_lock(
    client: EtcdClient, shard: str, holder: bytes, *, wait_s: float
) -> AsyncIterator[asyncio.Event]:
    """Hold ``shard``'s lock (waiting at most ``wait_s`` for it); yields an event set if the
    lease is lost meanwhile. Raises TimeoutError when someone else keeps it."""
    key = af.lock_key(shard)
    lease = await client.lease_grant(SHARD_LOCK_TTL_S)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            other = await client.try_lock(key, holder, lease)
            if other is None:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{shard} is locked by {other.decode(errors='replace')}")
            await asyncio.sleep(LOCK_POLL_S)
        lost = asyncio.Event()
        renew = asyncio.create_task(_renew(client, lease, SHARD_LOCK_TTL_S, lost))
        try:
            yield lost
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            with contextlib.suppress(EtcdError):
                await client.unlock(key, holder)
    finally:
        with contextlib.suppress(EtcdError):
            await client.lease_revoke(lease)


@contextlib.contextmanager
def shard_lock(
    cluster_dir: Path, shard: str, what: str, *, wait_s: float = SHARD_LOCK_WAIT_S
) -> Iterator[None]:
    """The per-shard lock for a synchronous operator command (`txr failover`, ...): held in a
    background thread's event loop for the duration of the ``with`` block."""
    endpoints = cluster.load_state(cluster_dir).etcd_endpoints()
    loop = asyncio.new_event_loop()
    release = asyncio.Event()
    errors: list[BaseException] = []
    ready = threading.Event()

    async def hold() -> None:
        async with EtcdClient(endpoints) as client:
            try:
                async with hold_lock(client, shard, holder_id(what), wait_s=wait_s):
                    ready.set()
                    await release.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                errors.append(exc)
                ready.set()

    th = threading.Thread(target=lambda: loop.run_until_complete(hold()), name="txr-shard-lock")
    th.start()
    ready.wait()
    try:
        if errors:
            raise errors[0]
        yield
    finally:
        loop.call_soon_threadsafe(release.set)
        th.join()
        loop.close()


class LocalControllerIO:
    """``consistency.autofailover.ControllerIO`` of one region of a local cluster."""

    def __init__(self, cluster_dir: Path, region: str) -> None:
        self.dir = cluster_dir.resolve()
        self.region = region
        state = cluster.load_state(self.dir)
        self.regions: list[str] = state.regions
        self.etcd = EtcdClient(state.etcd_endpoints(region), timeout_s=CONTROLLER_ETCD_TIMEOUT_S)
        self._ops = failover.LocalShardOps(self.dir, via_region=region)
        self._nodes: dict[str, Node] = {}
        self._records: dict[str, ShardRecord] = {}
        self._conns: dict[tuple[str, int], psycopg.AsyncConnection[Any]] = {}
        self._lease: int | None = None
        self._lease_renewed = 0.0
        # The shard records and the controllers' keys, each mirrored by one watch: a round
        # reads them every quarter second, and polled reads were most of the idle etcd load.
        self._shard_mirror = PrefixMirror(self.etcd, SHARD_PREFIX)
        self._control_mirror = PrefixMirror(self.etcd, af.CONTROL_PREFIX)
        self._control: dict[str, bytes] = {}
        # Our own latest verdict: the mirror shows it only once the watch brings it back.
        self._own: af.Verdict | None = None
        # Set when a sentinel's connection closed (or stop was asked): the round runs now.
        self.wake = asyncio.Event()
        self._sentinels: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def close(self) -> None:
        for t in self._sentinels.values():
            t.cancel()
        for t in self._sentinels.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._shard_mirror.close()
        await self._control_mirror.close()
        for c in self._conns.values():
            with contextlib.suppress(Exception):
                await c.close()
        if self._lease is not None:
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(self._lease)
        await self.etcd.close()

    async def shards(self) -> dict[str, af.ShardView]:
        kv = await self._shard_mirror.snapshot()
        out: dict[str, af.ShardView] = {}
        watched: set[tuple[str, int]] = set()
        for key, raw in kv.items():
            rec = ShardRecord.from_json(orjson.loads(raw))
            s = rec.shard
            self._records[s.name] = rec
            for n in (s.primary, *s.standbys):
                self._nodes[n.name] = n
            sb = s.standbys[0] if s.standbys else None
            for w in (s.primary, sb):
                if w is not None:
                    watched.add((w.name, w.port))
                    if (w.name, w.port) not in self._sentinels:
                        self._sentinels[(w.name, w.port)] = asyncio.create_task(
                            self._sentinel(w), name=f"sentinel {w.name}"
                        )
            out[key.removeprefix(SHARD_PREFIX)] = af.ShardView(
                s.name,
                s.primary.name,
                s.primary.region,
                s.epoch,
                rec.region_survival,
                sb.name if sb else None,
                sb.region if sb else None,
            )
        for k in set(self._sentinels) - watched:
            self._sentinels.pop(k).cancel()
        return out

    def _dsn(self, n: Node) -> str:
        return conninfo.make_conninfo(self._ops.admin_dsn(n), **KEEPALIVES)

    async def _sentinel(self, n: Node) -> None:
        """Hold a connection to ``n`` that sends nothing and wait until it closes; then wake
        the round. The event loop watches the socket (``regionstore.pgwait``; psycopg's own
        waits wake ten times a second): an idle backend says nothing until it exits (its
        postmaster was killed: it sends FATAL and closes; the host or the link is gone: the
        kernel or the WAN emulator closes), so this costs no CPU while the server lives."""
        while True:
            try:
                conn = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(self._dsn(n), autocommit=True),
                    PROBE_TIMEOUT_S,
                )
            except (TimeoutError, psycopg.Error, OSError):
                await asyncio.sleep(SENTINEL_RECONNECT_S)
                continue
            try:
                why = await pgwait.until_closed(conn)
                log.info("sentinel of %s: connection closed (%s)", n.name, why)
            except OSError as exc:
                log.info("sentinel of %s: connection closed (%s)", n.name, exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), PROBE_TIMEOUT_S)
            self.wake.set()
            await asyncio.sleep(SENTINEL_RECONNECT_S)

    async def probe(self, node: str, *, want_primary: bool) -> af.Probe:
        n = self._nodes[node]
        key = (n.name, n.port)
        try:
            return await asyncio.wait_for(self._query(key, n), PROBE_TIMEOUT_S)
        except (TimeoutError, psycopg.Error, OSError) as exc:
            conn = self._conns.pop(key, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), PROBE_TIMEOUT_S)
            return af.Probe(False, detail=type(exc).__name__)

    async def _query(self, key: tuple[str, int], n: Node) -> af.Probe:
        conn = self._conns.get(key)
        if conn is None or conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn(n),
                autocommit=True,
                options=f"-c statement_timeout={int(PROBE_TIMEOUT_S * 1000)}",
            )
            self._conns[key] = conn
        cur = await conn.execute(PROBE_SQL)
        row = await cur.fetchone()
        in_recovery = bool(row[0]) if row else False
        return af.Probe(True, in_recovery, "in recovery" if in_recovery else "")

    async def publish(self, verdict: af.Verdict) -> None:
        now = time.monotonic()
        if self._lease is None:
            self._lease = await self.etcd.lease_grant(VERDICT_LEASE_TTL_S)
            self._lease_renewed = now
        elif now - self._lease_renewed >= VERDICT_LEASE_TTL_S / LOCK_RENEWALS_PER_TTL:
            try:
                await self.etcd.lease_keepalive(self._lease)
            except LeaseExpired:
                self._lease = await self.etcd.lease_grant(VERDICT_LEASE_TTL_S)
            self._lease_renewed = now
        try:
            await self.etcd.put_with_lease(
                af.VERDICT_PREFIX + self.region, orjson.dumps(verdict.to_json()), self._lease
            )
        except EtcdError:
            # The lease may have expired while we were cut off: a new one next round.
            self._lease = None
            self._own = None
            raise
        self._own = verdict

    async def verdicts(self) -> list[af.Verdict]:
        self._control = await self._control_mirror.snapshot()
        own_key = af.VERDICT_PREFIX + self.region
        out = [
            af.Verdict.from_json(orjson.loads(v))
            for k, v in self._control.items()
            if k.startswith(af.VERDICT_PREFIX) and k != own_key
        ]
        if self._own is not None:
            out.append(self._own)
        return out

    async def mode(self) -> af.Mode:
        raw = self._control.get(af.MODE_KEY)
        return af.Mode.from_json(orjson.loads(raw) if raw else None)

    async def last_failover_at(self, shard: str) -> float | None:
        raw = self._control.get(af.LAST_FAILOVER_PREFIX + shard)
        return float(orjson.loads(raw)["at"]) if raw else None

    async def record_decision(self, decision: af.Decision) -> None:
        level = logging.INFO if decision.action is af.Action.NONE else logging.WARNING
        if decision.reason in (af.Reason.REFUSED, af.Reason.FAILED):
            level = logging.ERROR
        log.log(
            level,
            "%s: %s %s: %s",
            decision.shard,
            decision.action,
            decision.reason,
            decision.detail,
        )
        body = {"at": time.time(), "by": self.region, **decision.to_json()}
        with contextlib.suppress(EtcdError):
            await self.etcd.put(
                af.DECISION_PREFIX + f"{decision.shard}/{self.region}", orjson.dumps(body)
            )

    async def act(self, decision: af.Decision, decided: af.ShardView) -> af.Acted:
        holder = holder_id(f"controller {self.region}")
        try:
            async with hold_lock(self.etcd, decision.shard, holder, wait_s=0.0) as lost:
                now = (await self.shards()).get(decision.shard)
                if now is None or not af.still_valid(decided, now):
                    return af.Acted(
                        af.Reason.CHANGED, "the shard changed before the lock was taken"
                    )
                acted = await asyncio.to_thread(self._run, decision)
                if lost.is_set():
                    log.error("%s: the lock's lease was lost during the action", decision.shard)
                if acted.failed_over:
                    body = {
                        "at": time.time(),
                        "by": self.region,
                        "from_epoch": decision.epoch,
                        "to_region": decision.target_region,
                        "action": decision.action.value,
                        "detail": acted.detail,
                    }
                    await self.etcd.put(
                        af.LAST_FAILOVER_PREFIX + decision.shard, orjson.dumps(body)
                    )
                return acted
        except TimeoutError as exc:
            return af.Acted(af.Reason.CHANGED, f"another actor holds the lock: {exc}")

    def _run(self, decision: af.Decision) -> af.Acted:
        ops = failover.LocalShardOps(self.dir, via_region=self.region)

        def progress(msg: str) -> None:
            log.warning("%s: %s", decision.shard, msg)

        try:
            if decision.action is af.Action.FAILOVER:
                assert decision.target_region is not None
                out = failover_plan.failover(
                    ops, decision.shard, decision.target_region, progress=progress
                )
                detail = f"failed over to {out.new_primary} at epoch {out.epoch}"
                return af.Acted(af.Reason.DONE, detail + "".join(f"; {n}" for n in out.notes), True)
            if decision.action is af.Action.FINISH:
                out = failover_plan.finish_promotion(ops, decision.shard, progress=progress)
                return af.Acted(
                    af.Reason.DONE,
                    f"finished the promotion of {out.new_primary} at epoch {out.epoch}",
                    True,
                )
            if decision.action is af.Action.DEGRADE:
                failover_plan.degrade(ops, decision.shard, progress=progress)
                return af.Acted(af.Reason.DONE, "synchronous standby cleared: NO REGION SURVIVAL")
            if decision.action is af.Action.RESTORE:
                failover_plan.restore(ops, decision.shard, progress=progress)
                return af.Acted(af.Reason.DONE, "synchronous standby restored: region survival on")
        except failover_plan.FailoverRefused as exc:
            return af.Acted(af.Reason.REFUSED, f"REFUSED: {exc}")
        except (
            ConsistencyError,
            cluster.ClusterError,
            postgres.PostgresError,
            psycopg.Error,
            OSError,
        ) as exc:
            return af.Acted(af.Reason.FAILED, f"FAILED: {type(exc).__name__}: {exc}")
        raise AssertionError(decision.action)


async def run(cluster_dir: Path, region: str, stop: asyncio.Event) -> None:
    io = LocalControllerIO(cluster_dir, region)
    ctl = af.Controller(io, regions_total=len(io.regions))
    log.warning("controller %s: %d regions, %s", region, len(io.regions), ctl.cfg)
    stopping = asyncio.create_task(_wake_on(stop, io.wake))
    try:
        while not stop.is_set():
            io.wake.clear()
            t0 = time.monotonic()
            try:
                await ctl.round(time.time(), time.monotonic)
            except (EtcdError, OSError) as exc:
                # Cut off from etcd: nothing is published, so our verdicts expire, and nothing
                # is done. Keep probing so that we are current when etcd is back.
                log.info("round without etcd: %s", exc)
            took = time.monotonic() - t0
            interval = ctl.next_round_s()
            if took > ROUND_SLOW_S:
                log.warning("slow round: %.2fs (probe interval %gs)", took, interval)
            # A sentinel that saw a connection close during the round set wake: no wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(io.wake.wait(), max(0.0, interval - took))
    finally:
        stopping.cancel()
        await io.close()


async def _wake_on(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.controller")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--region", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(args.dir, args.region, stop)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
