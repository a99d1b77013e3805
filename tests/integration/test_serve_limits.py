"""The router's HTTP server bounds what slow or numerous clients can hold (issue 16).

A real aiohttp server built the way the router builds it (router.serve.ProblemAppRunner, the
keep-alive timer at HEADER_RECEIVE_TIMEOUT_S), on a loopback port, with a small connection cap
so that the test opens a handful of sockets rather than thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Final

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from router.limits import CONNECTIONS_MAX, HEADER_RECEIVE_TIMEOUT_S
from router.serve import ProblemAppRunner
from tests.fixtures import PORT_OFFSET

pytestmark = pytest.mark.integration

HOST: Final = "127.0.0.1"
PORT: Final = 7990 + PORT_OFFSET
CAP: Final = 4
# Generous: a loaded machine may be slow to schedule the close.
SLACK_S: Final = 10.0


async def _hello(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_get("/hello", _hello)
    runner = ProblemAppRunner(
        app, connections_max=CAP, access_log=None, keepalive_timeout=HEADER_RECEIVE_TIMEOUT_S
    )
    await runner.setup()
    await web.TCPSite(runner, HOST, PORT).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive request: its status line and headers (its body is read and dropped)."""
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK_S)
    length = re.search(rb"Content-Length: (\d+)", head, re.I)
    assert length is not None, head
    await asyncio.wait_for(reader.readexactly(int(length.group(1))), SLACK_S)
    return head


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.usefixtures("server")
async def test_connections_past_the_cap_get_503_and_are_closed() -> None:
    held = [await asyncio.open_connection(HOST, PORT) for _ in range(CAP)]
    try:
        # Each held connection is served (registered with the server).
        for reader, writer in held:
            assert (await _get(reader, writer)).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection(HOST, PORT)
        raw = await asyncio.wait_for(reader.read(), SLACK_S)  # the server closes it
        await _close(writer)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), raw
        assert b"application/problem+json" in head
        assert b"Retry-After: " in head
        assert orjson.loads(body)["code"] == "region_unavailable"
        # The held ones still work; one freed slot admits a new connection.
        r0, w0 = held.pop()
        assert (await _get(r0, w0)).startswith(b"HTTP/1.1 200")
        await _close(w0)
        deadline = time.monotonic() + SLACK_S
        while True:
            r1, w1 = await asyncio.open_connection(HOST, PORT)
            w1.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            await w1.drain()
            line = await asyncio.wait_for(r1.readline(), SLACK_S)
            await _close(w1)
            if line.startswith(b"HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, line
            await asyncio.sleep(0.1)
    finally:
        for _, w in held:
            await _close(w)


@pytest.mark.usefixtures("server")
async def test_headers_sent_drop_by_drop_are_cut_off() -> None:
    """A slowloris: a header byte every second never completes a request; the keep-alive timer
    closes the connection within HEADER_RECEIVE_TIMEOUT_S of its opening."""
    reader, writer = await asyncio.open_connection(HOST, PORT)
    started = time.monotonic()
    closed_after = None
    try:
        for byte in b"GET /hello HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof():
                break
            try:
                got = await asyncio.wait_for(reader.read(1), 1.0)
            except TimeoutError:
                continue
            if got == b"":
                break
        closed_after = time.monotonic() - started
    finally:
        await _close(writer)
    assert closed_after is not None
    assert closed_after < HEADER_RECEIVE_TIMEOUT_S + SLACK_S


def test_the_cap_is_a_sane_bound() -> None:
    assert 256 <= CONNECTIONS_MAX <= 16_384
    with pytest.raises(ValueError, match="connections_max"):
        ProblemAppRunner(web.Application(), connections_max=0)
