"""The WAN emulator against a real echo server (in this event loop, on ports 7590-7599)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Final

import pytest
import pytest_asyncio

from infra.wan import ListenerSpec, Wan, WanConfig, WanControl
from tests.fixtures import PORT_OFFSET

pytestmark = pytest.mark.integration

HOST: Final = "127.0.0.1"
ECHO_PORT: Final = 7590 + PORT_OFFSET
AB_PORT: Final = 7591 + PORT_OFFSET  # region a dials this to reach the echo service "in" region b
CONTROL_PORT: Final = 7592 + PORT_OFFSET
FRONT_PORT: Final = 7593 + PORT_OFFSET  # an etcd-style peer front of region b
A_PEER_URL: Final = (
    f"http://127.0.0.1:{7594 + PORT_OFFSET}"  # what "region a" advertises as its peer URL
)
ONE_WAY_MS: Final = 20.0
# Scheduling slack on a loaded two-core machine; the emulator itself adds well under 1 ms.
SLACK_S: Final = 0.030
IO_TIMEOUT_S: Final = 5.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest_asyncio.fixture
async def wan() -> AsyncIterator[Wan]:
    echo = await asyncio.start_server(_echo, HOST, ECHO_PORT, reuse_address=True)
    config = WanConfig(
        host=HOST,
        control_port=CONTROL_PORT,
        latency_ms={("a", "b"): ONE_WAY_MS},
        listeners=(
            ListenerSpec(AB_PORT, "b", HOST, ECHO_PORT, "a", "echo"),
            ListenerSpec(FRONT_PORT, "b", HOST, ECHO_PORT, None, "etcd-peer"),
        ),
        peer_urls={A_PEER_URL: "a"},
    )
    w = Wan(config)
    await w.start()
    try:
        yield w
    finally:
        await w.stop()
        echo.close()
        await echo.wait_closed()


async def _roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> float:
    t0 = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), IO_TIMEOUT_S)
    assert got == payload
    return time.perf_counter() - t0


async def _closed_soon(reader: asyncio.StreamReader, timeout_s: float = 1.0) -> bool:
    """True when the connection ends (EOF or reset) within ``timeout_s`` without data."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout_s)
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return data == b""


async def test_round_trip_pays_both_directions(wan: Wan) -> None:
    reader, writer = await asyncio.open_connection(HOST, AB_PORT)
    rtts = [await _roundtrip(reader, writer, b"ping %d" % i) for i in range(10)]
    writer.close()
    expected = 2 * ONE_WAY_MS / 1000
    assert min(rtts) >= expected
    assert statistics.median(rtts) < expected + SLACK_S


async def test_latency_does_not_limit_throughput(wan: Wan) -> None:
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    reader, writer = await asyncio.open_connection(HOST, AB_PORT)
    t0 = time.perf_counter()

    async def send() -> None:
        writer.write(payload)
        await writer.drain()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.readexactly(len(payload)), IO_TIMEOUT_S * 4)
    await sender
    elapsed = time.perf_counter() - t0
    writer.close()
    assert got == payload
    # Stop-and-wait over a 40 ms round trip with 64 KiB windows would take 3.2 s; pipelined it
    # is the RTT plus copying time.
    assert elapsed < 1.5, f"5 MiB echoed in {elapsed:.2f}s"


async def test_order_is_kept_when_latency_drops_mid_stream(wan: Wan) -> None:
    reader, writer = await asyncio.open_connection(HOST, AB_PORT)
    sent = bytearray()
    for i in range(200):
        msg = b"%05d;" % i
        sent += msg
        writer.write(msg)
        await writer.drain()
        if i == 100:
            # Later chunks are due earlier than queued ones; they must still come after them.
            wan.set_latency("a", "b", 0)
        await asyncio.sleep(0.001)
    got = await asyncio.wait_for(reader.readexactly(len(sent)), IO_TIMEOUT_S)
    writer.close()
    assert got == bytes(sent)


async def test_cut_blackholes_and_heal_restores(wan: Wan) -> None:
    async with WanControl(f"http://{HOST}:{CONTROL_PORT}") as ctl:
        reader, writer = await asyncio.open_connection(HOST, AB_PORT)
        await _roundtrip(reader, writer, b"before")
        link = await ctl.cut("b", "a")
        assert link["cut"] is True
        assert await _closed_soon(reader), "an open connection must be closed by the cut"
        writer.close()

        reader, writer = await asyncio.open_connection(HOST, AB_PORT)
        with contextlib.suppress(ConnectionError):
            writer.write(b"during")
            await writer.drain()
        assert await _closed_soon(reader), "a new connection across a cut must be dropped"
        writer.close()

        await ctl.heal("a", "b")
        reader, writer = await asyncio.open_connection(HOST, AB_PORT)
        assert await _roundtrip(reader, writer, b"after") >= 2 * ONE_WAY_MS / 1000
        writer.close()
        links = await ctl.links()
        assert links[0]["cut"] is False
        assert links[0]["refused_total"] >= 1
        await ctl.set_latency("a", "b", 5)
        assert (await ctl.links())[0]["latency_ms"] == 5


async def test_peer_front_identifies_the_sender(wan: Wan) -> None:
    # A raft stream request names its sender: the connection belongs to link a/b.
    request = (
        "GET /raft/stream/msgapp/1 HTTP/1.1\r\nHost: b\r\n"
        f"X-Server-From: 1\r\nX-Peerurls: {A_PEER_URL}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(HOST, FRONT_PORT)
    assert await _roundtrip(reader, writer, request) >= 2 * ONE_WAY_MS / 1000
    # A probe without the header is anonymous: no delay, and a cut does not touch it ...
    probe = b"GET /raft/probing HTTP/1.1\r\nHost: b\r\n\r\n"
    p_reader, p_writer = await asyncio.open_connection(HOST, FRONT_PORT)
    assert await _roundtrip(p_reader, p_writer, probe) < ONE_WAY_MS / 1000
    wan.cut("a", "b")
    assert await _closed_soon(reader)
    assert not await _closed_soon(p_reader, 0.2)
    # ... until a later request on the same keep-alive connection names a sender in a cut link
    # (etcd's pipeline reuses its prober's connections).
    with contextlib.suppress(ConnectionError):
        p_writer.write(
            b"POST /raft HTTP/1.1\r\nHost: b\r\nX-PeerURLs: "
            + A_PEER_URL.encode()
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        await p_writer.drain()
    assert await _closed_soon(p_reader)
    writer.close()
    p_writer.close()
    wan.heal("a", "b")
