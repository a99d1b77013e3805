"""Idle PostgreSQL connections, by their sockets: waiting on one without a timer (the loop
watches the socket), and telling at a pool checkout whether one is still alive (``check_idle``).

psycopg's own waits (``AsyncConnection.notifies()`` included) wake every 0.1 s
(``psycopg.connection_async._WAIT_INTERVAL``, so that Ctrl-C is noticed), whatever the timeout:
a process holding a few LISTEN or watch connections then runs its loop tens of times a second
while nothing happens. Here the event loop watches the socket itself (``add_reader``) and
nothing runs until the server sends something or closes. The connection must not be in use
by anything else meanwhile (one waiter; psycopg registers its own reader during a query).
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import psycopg
from psycopg import pq


async def readable(conn: psycopg.AsyncConnection[Any], timeout_s: float | None) -> bool:
    """Wait until ``conn``'s socket has something to read (data or end of file): True, or
    False once ``timeout_s`` passed (None: no limit). Reads nothing itself."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout(timeout_s):
            await fut
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def until_closed(conn: psycopg.AsyncConnection[Any]) -> str:
    """Return once the server side of ``conn`` is gone (it exited, its host or the link went
    away), with what libpq said. Anything the server sends meanwhile (a notice, a parameter
    change) is consumed and ignored; an idle session gets none, so this costs nothing while the
    server lives."""
    while True:
        await readable(conn, None)
        try:
            conn.pgconn.consume_input()
        except psycopg.OperationalError as exc:
            return str(exc).strip() or type(exc).__name__
        if conn.pgconn.status == pq.ConnStatus.BAD:
            return "connection bad"


async def check_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check at every checkout, without a round trip: close and refuse (raise
    OperationalError) a pooled connection with anything to read, so the pool opens another. An
    idle session is sent nothing unprompted but a goodbye (a backend terminated, a server
    restarted or promoted, a link cut: a FATAL error and the end of the stream) or, rarely, a
    notice or a changed setting; a reconnect is cheap, and reasoning about which it was is not
    (libpq takes an idle-time FATAL as a mere notice). Without it, a write on a connection the
    server had closed failed only once sent, and was reported as an unknown outcome."""
    if not conn.closed and not select.select([conn.pgconn.socket], [], [], 0)[0]:
        return
    # Closed here, so the pool discards it (it would take back a connection that looks idle).
    await conn.close()
    raise psycopg.OperationalError("the server closed the connection while it was idle")
