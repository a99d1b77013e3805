"""regionstore.pgwait against the real test primary (tests/fixtures/pg.py): an idle connection is
waited on by the event loop alone (no timer), and what wakes it is the server speaking or the
server side going away. Also the outbox relay's LISTEN wait built on it (ShardStore).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg
import pytest

from regionstore import pgwait
from regionstore.store import OUTBOX_CHANNEL, ShardStore
from tests.fixtures.pg import SHARD_A, STORE_OPEN_TIMEOUT_S, PgShard
from tests.integration.test_saga_store import new_account, new_tenant

pytestmark = pytest.mark.integration

IDLE_WAIT_S: Final = 1.0
# The loop turns a wait of IDLE_WAIT_S may take: a few for the wait's own start and end. psycopg's
# notifies() takes one per 0.1 s (its _WAIT_INTERVAL) on top: the contrast below shows it.
IDLE_LOOP_TURNS_MAX: Final = 4
# A termination or a notification reaches the waiter within this (loopback, one round trip).
WAKE_S_MAX: Final = 2.0


@contextmanager
def loop_turns() -> Iterator[list[int]]:
    """Count the event loop's selector calls (one per loop iteration) inside the block."""
    loop = asyncio.get_running_loop()
    selector: Any = getattr(loop, "_selector")  # noqa: B009 - asyncio's selector loop, no API
    original = selector.select
    count = [0]

    def select(timeout: float | None = None) -> Any:
        count[0] += 1
        return original(timeout)

    selector.select = select
    try:
        yield count
    finally:
        selector.select = original


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def test_an_idle_wait_runs_nothing_until_its_timeout(pg_shard: PgShard) -> None:
    conn = await _connect(pg_shard.admin_dsn)
    try:
        with loop_turns() as ours:
            t0 = time.monotonic()
            assert await pgwait.readable(conn, IDLE_WAIT_S) is False
            assert time.monotonic() - t0 >= IDLE_WAIT_S * 0.9
        with loop_turns() as theirs:
            async for _ in conn.notifies(timeout=IDLE_WAIT_S):
                raise AssertionError("nothing was sent")
        assert ours[0] <= IDLE_LOOP_TURNS_MAX, ours
        assert theirs[0] > ours[0] + 5, (theirs, ours)
    finally:
        await conn.close()


async def test_a_notification_wakes_the_wait_and_psycopg_reads_it(pg_shard: PgShard) -> None:
    listener = await _connect(pg_shard.admin_dsn)
    sender = await _connect(pg_shard.admin_dsn)
    try:
        await listener.execute("LISTEN txr_pgwait_test")
        waiting = asyncio.create_task(pgwait.readable(listener, WAKE_S_MAX * 5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        t0 = time.monotonic()
        await sender.execute("NOTIFY txr_pgwait_test, 'hello'")
        assert await waiting is True
        assert time.monotonic() - t0 < WAKE_S_MAX
        got = [n.payload async for n in listener.notifies(timeout=WAKE_S_MAX, stop_after=1)]
        assert got == ["hello"]
    finally:
        await listener.close()
        await sender.close()


async def test_until_closed_returns_when_the_backend_goes_away(pg_shard: PgShard) -> None:
    """What the failover controller's sentinel relies on: a backend that exits (here it is
    terminated; a killed postmaster's backends exit the same way) closes the socket, and the
    waiter returns at once, having run nothing while the server lived."""
    watched = await _connect(pg_shard.admin_dsn)
    admin = await _connect(pg_shard.admin_dsn)
    try:
        pid = watched.info.backend_pid
        with loop_turns() as turns:
            waiting = asyncio.create_task(pgwait.until_closed(watched))
            await asyncio.sleep(IDLE_WAIT_S)
            assert not waiting.done()
        assert turns[0] <= IDLE_LOOP_TURNS_MAX, turns
        t0 = time.monotonic()
        await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        why = await asyncio.wait_for(waiting, WAKE_S_MAX)
        assert time.monotonic() - t0 < WAKE_S_MAX
        assert why
    finally:
        await watched.close()
        await admin.close()


async def test_the_outbox_wait_idles_without_a_timer_and_wakes_on_notify(
    pg_shard: PgShard, store: ShardStore
) -> None:
    # A fresh LISTEN connection answers True at once (notifications before it were lost).
    assert await store.wait_for_outbox(WAKE_S_MAX) is True
    with loop_turns() as turns:
        assert await store.wait_for_outbox(IDLE_WAIT_S) is False
    assert turns[0] <= IDLE_LOOP_TURNS_MAX, turns
    sender = await _connect(pg_shard.admin_dsn)
    try:
        waiting = asyncio.create_task(store.wait_for_outbox(WAKE_S_MAX * 5))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await sender.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        assert await waiting is True
        assert time.monotonic() - t0 < WAKE_S_MAX
    finally:
        await sender.close()


async def test_a_connection_the_server_closed_in_the_pool_is_never_given_to_a_write(
    pg_shard: PgShard,
) -> None:
    """A pooled connection whose backend went away while idle (a cut link, a restart; here
    pg_terminate_backend) is discarded at checkout (pgwait.check_idle): the next write runs on
    a new connection and succeeds. Handed to the write, it failed once sent, and the write was
    reported as an unknown outcome though the server had closed the connection before it."""
    store = ShardStore(pg_shard.app_dsn, name=SHARD_A, pool_min=1, pool_max=1)
    await store.open(timeout_s=STORE_OPEN_TIMEOUT_S)
    try:
        async with store._pool.connection() as c:
            pid = c.info.backend_pid
        async with await _connect(pg_shard.admin_dsn) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + WAKE_S_MAX
            while (
                await (
                    await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
                ).fetchone()
            ) is not None:
                assert time.monotonic() < deadline, "the backend exits"
                await asyncio.sleep(0.02)
        account = await new_account(store, new_tenant())
        assert account > 0
    finally:
        await store.close()
