"""``PrefixMirror`` against the session cluster's real etcd: one load, then the watch keeps it
current (puts, updates, deletes, several keys in one transaction), with no further reads: the
controllers read their prefixes every round through it, and polled reads were most of an idle
cluster's etcd CPU."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Final

import pytest

from consistency.errors import EtcdUnavailable
from consistency.etcd import EtcdClient, PrefixMirror
from tests.fixtures import PORT_OFFSET
from tests.fixtures.cluster import LocalCluster

pytestmark = pytest.mark.integration

# How long a change may take to reach the mirror on a loaded machine (a watch event is
# milliseconds; this is the poll's bound, not a figure).
SEEN_WITHIN_S: Final = 10.0
HOST: Final = "127.0.0.1"
# In the suite's band, beside test_txclient's proxy ports (7980-7981).
PROXY_PORT: Final = 7982 + PORT_OFFSET


class CountingClient(EtcdClient):
    """The real client, counting the prefix reads that reach etcd."""

    reads = 0

    async def get_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        self.reads += 1
        return await super().get_prefix(prefix)


async def _until(mirror: PrefixMirror, want: dict[str, bytes]) -> None:
    deadline = time.monotonic() + SEEN_WITHIN_S
    while (got := await mirror.snapshot()) != want:
        assert time.monotonic() < deadline, f"mirror shows {got}, want {want}"
        await asyncio.sleep(0.02)


async def test_the_mirror_follows_puts_updates_and_deletes_without_reads(
    local_cluster: LocalCluster,
) -> None:
    prefix = f"/txr-test/mirror/{uuid.uuid4().hex}/"
    endpoints = list(local_cluster.etcd.values())
    writer = EtcdClient(endpoints)
    client = CountingClient(endpoints)
    mirror = PrefixMirror(client, prefix)
    try:
        await writer.put(prefix + "a", b"1")
        await _until(mirror, {prefix + "a": b"1"})
        assert client.reads == 1

        await writer.put(prefix + "b", b"2")
        await writer.put(prefix + "a", b"3")
        # Outside the prefix: never shown.
        await writer.put(prefix.rstrip("/") + "x", b"no")
        await _until(mirror, {prefix + "a": b"3", prefix + "b": b"2"})
        await writer.delete(prefix + "a")
        await _until(mirror, {prefix + "b": b"2"})
        # Several keys in one revision (the CAS the failover procedures use).
        rev = (await writer.get_prefix_kvs(prefix))[1][prefix + "b"][1]
        await writer.cas(prefix + "b", rev, {prefix + "b": b"4", prefix + "c": b"5"})
        await _until(mirror, {prefix + "b": b"4", prefix + "c": b"5"})

        for _ in range(50):
            await mirror.snapshot()
        assert client.reads == 1, "a synced mirror must not read etcd again"
    finally:
        await mirror.close()
        await writer.delete_prefix(prefix)
        await writer.delete(prefix.rstrip("/") + "x")
        await writer.close()
        await client.close()


async def test_a_dropped_stream_loses_no_change(local_cluster: LocalCluster) -> None:
    """The stream dropped under it (its HTTP session closed): the watch resumes on a member
    from where it started, so every change still reaches the mirror."""
    prefix = f"/txr-test/mirror/{uuid.uuid4().hex}/"
    endpoints = list(local_cluster.etcd.values())
    writer = EtcdClient(endpoints)
    client = CountingClient(endpoints)
    mirror = PrefixMirror(client, prefix)
    try:
        await writer.put(prefix + "a", b"1")
        await _until(mirror, {prefix + "a": b"1"})
        await client.close()
        await writer.put(prefix + "a", b"2")
        await writer.put(prefix + "b", b"3")
        await _until(mirror, {prefix + "a": b"2", prefix + "b": b"3"})
    finally:
        await mirror.close()
        await writer.delete_prefix(prefix)
        await writer.close()
        await client.close()


class _Proxy:
    """A TCP forwarder to one etcd member that can go away with every connection it carries
    and come back on the same port: etcd unreachable, for real."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_an_unreachable_etcd_unsyncs_the_mirror_and_it_reloads_when_back(
    local_cluster: LocalCluster,
) -> None:
    """With every member unreachable the mirror may miss changes: it must not keep serving what
    it holds as current (a snapshot raises, as a read would), and once etcd answers again the
    next snapshot reads the prefix afresh."""
    prefix = f"/txr-test/mirror/{uuid.uuid4().hex}/"
    member = next(iter(local_cluster.etcd.values()))
    host, port = member.removeprefix("http://").rsplit(":", 1)
    proxy = _Proxy(PROXY_PORT, (host, int(port)))
    await proxy.start()
    writer = EtcdClient(list(local_cluster.etcd.values()))
    client = CountingClient([f"http://{HOST}:{PROXY_PORT}"], timeout_s=1.0)
    mirror = PrefixMirror(client, prefix)
    try:
        await writer.put(prefix + "a", b"1")
        await _until(mirror, {prefix + "a": b"1"})
        await proxy.stop()
        await writer.put(prefix + "a", b"2")
        deadline = time.monotonic() + SEEN_WITHIN_S
        while True:
            try:
                await mirror.snapshot()
            except EtcdUnavailable:
                break
            assert time.monotonic() < deadline, "the mirror kept serving with etcd unreachable"
            await asyncio.sleep(0.05)
        await proxy.start()
        await _until(mirror, {prefix + "a": b"2"})
        assert client.reads >= 2
    finally:
        await mirror.close()
        await writer.delete_prefix(prefix)
        await writer.close()
        await client.close()
        with contextlib.suppress(AssertionError, OSError):
            await proxy.stop()
