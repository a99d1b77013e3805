"""A lean open-loop HTTP/1.1 generator for the overload runs (issue 16).

The aiohttp client costs about 300-370 us of CPU per request on the development machine
(measured with ``time.process_time`` around open-loop runs): at 200 % of a 1,300/s saturation
that is most of one of the two cores, taken from the router and the database it loads, and
its 512-connection pool filled before the router shed anything, so the runs measured the
generator's own queue (client timeouts at 200 %, p99 18 s while no write may take the router
more than 5 s). This one writes pre-formatted requests on keep-alive connections through a
bare ``asyncio.Protocol`` and parses only the status line and ``Content-Length`` of the
answers (the router always sends one), so the load costs a fraction of that.

It talks only to 127.0.0.1 (``loadgen.check_loopback``), bounds its connections
(``RAW_CONNECTIONS_MAX``) and its run (``loadgen.DRAIN_TIMEOUT_S`` after the last send), and
measures latency from each request's intended send time, like ``loadgen.open_loop``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlsplit

from bench.loadgen import REQUEST_TIMEOUT_S, RunResult, check_loopback, paced

# Connections open at once. Under the router's CONNECTIONS_MAX (2,048 per process), and
# enough for 2,500 requests/s at 400 ms each; past it a scheduled request waits for one, and
# that wait counts in its latency (from the intended send time).
RAW_CONNECTIONS_MAX: Final = 1024
# Connections opened before a run's clock starts: what the run holds in flight at this much
# latency per request (rate x WARM_LATENCY_S), as a client's kept pool would be. Opening them
# during the run instead measures connection set-up under load, not the router's answers.
WARM_LATENCY_S: Final = 0.25
# An answer head larger than this is not the router's: the connection is dropped.
HEAD_BYTES_MAX: Final = 16 * 1024
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"

# Builds the bytes of request number ``seq`` (a whole HTTP/1.1 request).
RawRequest = Callable[[int], bytes]


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > HEAD_BYTES_MAX:
                waiter.set_exception(ValueError("answer head too large"))
            return
        head = bytes(self._buf[:end]).lower()
        at = head.find(_CONTENT_LENGTH)
        if at < 0:
            waiter.set_exception(ValueError("answer without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + len(_CONTENT_LENGTH) : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self._buf) < total:
            return
        del self._buf[:total]
        self._waiter = None
        waiter.set_result(int(head[9:12]))

    def send(self, payload: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self._waiter


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(RAW_CONNECTIONS_MAX)

    async def request(self, payload: bytes) -> int:
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Conn, self._host, self._port
                )
            try:
                status = await asyncio.wait_for(conn.send(payload), REQUEST_TIMEOUT_S)
            except BaseException:
                if conn.transport is not None:
                    conn.transport.abort()
                raise
            if not conn.closed:
                self._idle.append(conn)
            return status

    async def warm(self, n: int) -> None:
        """Open ``n`` idle connections (at most RAW_CONNECTIONS_MAX)."""
        loop = asyncio.get_running_loop()
        made = await asyncio.gather(
            *(
                loop.create_connection(_Conn, self._host, self._port)
                for _ in range(min(n, RAW_CONNECTIONS_MAX))
            )
        )
        self._idle.extend(conn for _, conn in made)

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


async def open_loop(
    url: str,
    build: RawRequest,
    *,
    rate: float,
    duration_s: float,
    ok_statuses: frozenset[int],
) -> RunResult:
    """Send ``build(seq)`` at ``rate`` per second for ``duration_s`` to ``url``'s host."""
    check_loopback(url)
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    pool = _Pool(parts.hostname, parts.port)
    await pool.warm(int(rate * WARM_LATENCY_S))
    res = RunResult(mode="open", duration_s=duration_s, target_rate=rate)

    async def fire(seq: int, intended: float) -> None:
        try:
            status: int | str = await pool.request(build(seq))
        except (OSError, ValueError, TimeoutError) as exc:
            status = type(exc).__name__
        res.record(status, time.perf_counter() - intended, status in ok_statuses)

    try:
        res.duration_s = await paced(rate, duration_s, fire)
    finally:
        pool.close()
    return res


def transfer_request(
    url: str, token: str, pair: Callable[[], tuple[str, str]], amount: int, nonce: str
) -> RawRequest:
    """``POST /v1/transfers`` between the accounts ``pair()`` picks, a fresh key each."""
    parts = urlsplit(url)
    head = (
        f"POST /v1/transfers HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
    ).encode()

    def build(seq: int) -> bytes:
        src, dst = pair()
        body = (
            f'{{"source":"{src}","destination":"{dst}","amount":{amount},"currency":"EUR"}}'
        ).encode()
        return (
            head
            + f"Idempotency-Key: {nonce}-{seq}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return build
