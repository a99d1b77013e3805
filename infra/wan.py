"""WAN emulator: a TCP proxy that gives loopback links the latency and partitions of a WAN.

One process serves many listeners. A listener stands for one (source region, remote service)
pair: region A dials it to reach a service in region B, so its traffic crosses link {A, B}. Each
chunk read is stamped with the time it may leave (now + the link's one-way latency) and a
separate writer task sends it when due, so latency is added without limiting throughput (many
chunks are in flight at once, like on a long fat pipe) and order is preserved. Each direction
of a connection buffers at most ``BUFFER_BYTES_MAX``; past that the reader stops reading and TCP
backpressure reaches the sender. A chunk of a link without delay (``--wan none``) and with
nothing queued ahead of it is written by the reader at once (same order, half the work).

etcd peers are different: a member advertises a single peer URL that every other member dials,
so the source region cannot be known from the listener. A *peer front* listener sits in front of
each member's real peer port; it peeks at the first HTTP request of each connection, where
etcd's rafthttp names the sender (``X-PeerURLs``, the sender's advertised peer URLs), and maps
that URL to a region. A connection without the header (version probes) is forwarded without
delay and is never cut: it carries no raft traffic.

A cut link blackholes: its open connections are closed and new ones are accepted and closed at
once. A small HTTP control endpoint (loopback only) reads and changes link state; ``WanControl``
is its client.

Run: ``python -m infra.wan --config FILE`` (the launcher writes FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

log = logging.getLogger("txr.wan")

# Bytes read per syscall: large enough that a bulk transfer costs few wake-ups.
READ_CHUNK_BYTES: Final = 256 * 1024
# Per connection and direction. The bandwidth-delay product sets throughput: 8 MiB over the
# longest one-way delay (95 ms) still allows ~80 MiB/s, far above what a local cluster pushes,
# while a stuck receiver can pin at most 16 MiB per connection.
BUFFER_BYTES_MAX: Final = 8 * 1024 * 1024
# Upstream connect on loopback is instant; a slow one means the service is down.
CONNECT_TIMEOUT_S: Final = 5.0
# A peer front waits this long for the first request headers before treating the connection as
# anonymous (no delay, never cut) rather than stalling etcd.
PEEK_TIMEOUT_S: Final = 2.0
# HTTP request headers of rafthttp are a few hundred bytes; stop peeking well before a body.
PEEK_BYTES_MAX: Final = 16 * 1024
UNKNOWN: Final = "unknown"
# Matched case-insensitively: Go's net/http canonicalises etcd's "X-PeerURLs" to "X-Peerurls".
_PEER_URLS_HEADER: Final = b"\r\nx-peerurls:"
# Enough to hold the header name and a few peer URLs across a read boundary.
SNIFF_TAIL_BYTES: Final = 512

# One-way latency per link in milliseconds. Named pairs for the default regions; custom region
# names take the same figures by position (first/second, first/third, second/third).
PROFILES: Final[dict[str, dict[frozenset[str], float]]] = {
    "realistic": {
        frozenset({"us-east", "eu-west"}): 35.0,
        frozenset({"us-east", "ap-south"}): 95.0,
        frozenset({"eu-west", "ap-south"}): 60.0,
    },
    "none": {},
}
_POSITIONAL_REALISTIC_MS: Final = {(0, 1): 35.0, (0, 2): 95.0, (1, 2): 60.0}
# A link of a custom profile not covered above (more than three regions).
DEFAULT_REALISTIC_MS: Final = 50.0


def profile_latencies(profile: str, regions: Sequence[str]) -> dict[tuple[str, str], float]:
    """One-way latency (ms) of every link, keyed by the sorted region pair."""
    if profile not in PROFILES:
        raise ValueError(f"unknown WAN profile {profile!r} (choose: {', '.join(PROFILES)})")
    table = PROFILES[profile]
    out: dict[tuple[str, str], float] = {}
    for i, a in enumerate(regions):
        for j in range(i + 1, len(regions)):
            b = regions[j]
            if profile == "none":
                ms = 0.0
            else:
                ms = table.get(
                    frozenset({a, b}), _POSITIONAL_REALISTIC_MS.get((i, j), DEFAULT_REALISTIC_MS)
                )
            out[link_key(a, b)] = ms
    return out


def link_key(a: str, b: str) -> tuple[str, str]:
    x, y = sorted((a, b))
    return (x, y)


@dataclass(frozen=True)
class ListenerSpec:
    port: int
    dst: str
    target_host: str
    target_port: int
    # None for an etcd peer front: the source is identified per connection.
    src: str | None
    service: str

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "dst": self.dst,
            "target_host": self.target_host,
            "target_port": self.target_port,
            "src": self.src,
            "service": self.service,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ListenerSpec:
        src = d.get("src")
        return cls(
            port=int(d["port"]),
            dst=str(d["dst"]),
            target_host=str(d["target_host"]),
            target_port=int(d["target_port"]),
            src=None if src is None else str(src),
            service=str(d["service"]),
        )


@dataclass(frozen=True)
class WanConfig:
    host: str
    control_port: int
    latency_ms: dict[tuple[str, str], float]
    listeners: tuple[ListenerSpec, ...]
    # An advertised etcd peer URL -> the region of the member advertising it.
    peer_urls: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "control_port": self.control_port,
            "links": [{"a": a, "b": b, "latency_ms": ms} for (a, b), ms in self.latency_ms.items()],
            "listeners": [spec.to_json() for spec in self.listeners],
            "peer_urls": dict(self.peer_urls),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WanConfig:
        return cls(
            host=str(d.get("host", "127.0.0.1")),
            control_port=int(d["control_port"]),
            latency_ms={
                link_key(str(x["a"]), str(x["b"])): float(x["latency_ms"]) for x in d["links"]
            },
            listeners=tuple(ListenerSpec.from_json(x) for x in d["listeners"]),
            peer_urls={str(k): str(v) for k, v in d.get("peer_urls", {}).items()},
        )

    def save(self, path: Path) -> None:
        path.write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, path: Path) -> WanConfig:
        return cls.from_json(orjson.loads(path.read_bytes()))


class Link:
    """The state of one region pair, shared by every connection crossing it."""

    def __init__(self, a: str, b: str, latency_ms: float) -> None:
        self.a = a
        self.b = b
        self.latency_ms = latency_ms
        self.cut = False
        self.connections: set[_Connection] = set()
        self.accepted_total = 0
        self.refused_total = 0

    @property
    def delay_s(self) -> float:
        return self.latency_ms / 1000.0

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "latency_ms": self.latency_ms,
            "cut": self.cut,
            "connections": len(self.connections),
            "accepted_total": self.accepted_total,
            "refused_total": self.refused_total,
        }


_EOF: Final = b""


class _Direction:
    """One direction of a proxied connection: stamp on read, send when due."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Connection,
        initial: bytes,
        sniff: Callable[[_Connection, bytes], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._sniff = sniff
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._buffered = 0
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._initial = initial
        # The write side holds an item it took from the queue and has not written yet.
        self._holding = False

    def _delay(self) -> float:
        link = self._conn.link
        return link.delay_s if link is not None else 0.0

    def _push(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time() + self._delay(), data))
        self._buffered += len(data)
        self._has_data.set()
        if self._buffered >= BUFFER_BYTES_MAX:
            self._has_room.clear()

    async def read_side(self) -> None:
        if self._initial:
            self._push(self._initial)
        while True:
            await self._has_room.wait()
            data = await self._reader.read(READ_CHUNK_BYTES)
            if self._sniff is not None and self._conn.link is None and data:
                self._sniff(self._conn, data)
            if data and not self._queue and not self._holding and self._delay() <= 0:
                # No delay and nothing ahead of it: write it now. Handing it to the write
                # side (a queue, an event, a task switch) doubled the emulator's CPU per
                # message, which is all it spends on an idle cluster under --wan none.
                self._writer.write(data)
                await self._writer.drain()
                continue
            self._push(data)
            if not data:
                return

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._has_data.clear()
                await self._has_data.wait()
            due, data = self._queue.popleft()
            self._holding = True
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is _EOF or not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            self._holding = False
            await self._writer.drain()
            self._buffered -= len(data)
            if self._buffered < BUFFER_BYTES_MAX:
                self._has_room.set()


class _Connection:
    def __init__(
        self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, link: Link | None
    ) -> None:
        self.client = client
        self.upstream = upstream
        # None: an etcd peer connection whose sender is not known (yet); no delay, never cut.
        self.link = link
        self.tasks: list[asyncio.Task[None]] = []
        # The tail of the previous chunk, so a header split across two reads is still found.
        self.sniff_tail = b""
        self.dst = ""

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            transport = w.transport
            if transport is not None:
                transport.abort()
        for t in self.tasks:
            t.cancel()


class Wan:
    """The emulator: listeners, links and the control API, in one event loop."""

    def __init__(self, config: WanConfig) -> None:
        self.config = config
        self.links: dict[tuple[str, str], Link] = {
            k: Link(k[0], k[1], ms) for k, ms in config.latency_ms.items()
        }
        self._servers: list[asyncio.Server] = []
        self._runner: web.AppRunner | None = None
        self._anonymous: set[_Connection] = set()

    def link(self, a: str, b: str) -> Link:
        try:
            return self.links[link_key(a, b)]
        except KeyError:
            raise KeyError(f"no link between {a!r} and {b!r}") from None

    async def start(self) -> None:
        for spec in self.config.listeners:
            server = await asyncio.start_server(
                lambda r, w, spec=spec: self._serve(spec, r, w),  # type: ignore[misc]
                host=self.config.host,
                port=spec.port,
                reuse_address=True,
                limit=READ_CHUNK_BYTES,
            )
            self._servers.append(server)
        app = web.Application()
        app.router.add_get("/links", self._h_links)
        app.router.add_post("/links/{a}/{b}/cut", self._h_cut)
        app.router.add_post("/links/{a}/{b}/heal", self._h_heal)
        app.router.add_post("/links/{a}/{b}/latency", self._h_latency)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.control_port, reuse_address=True
        )
        await site.start()
        log.info(
            "WAN emulator up: %d listeners, control on %s:%d, links %s",
            len(self._servers),
            self.config.host,
            self.config.control_port,
            {f"{a}/{b}": ms for (a, b), ms in self.config.latency_ms.items()},
        )

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for link in self.links.values():
            for c in list(link.connections):
                c.abort()
        for c in list(self._anonymous):
            c.abort()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- link operations (the control API calls these) ------------------------------------

    def cut(self, a: str, b: str) -> Link:
        link = self.link(a, b)
        link.cut = True
        n = len(link.connections)
        for c in list(link.connections):
            c.abort()
        log.warning("link %s/%s cut: %d connections closed", link.a, link.b, n)
        return link

    def heal(self, a: str, b: str) -> Link:
        link = self.link(a, b)
        link.cut = False
        log.warning("link %s/%s healed", link.a, link.b)
        return link

    def set_latency(self, a: str, b: str, ms: float) -> Link:
        link = self.link(a, b)
        link.latency_ms = ms
        log.warning("link %s/%s latency %.1f ms one way", link.a, link.b, ms)
        return link

    # -- connections -----------------------------------------------------------------------

    async def _identify_peer(
        self, reader: asyncio.StreamReader, spec: ListenerSpec
    ) -> tuple[str, bytes]:
        """Read the first request's headers; return (source region or unknown, bytes read)."""
        buf = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PEEK_TIMEOUT_S
        while b"\r\n\r\n" not in buf and len(buf) < PEEK_BYTES_MAX:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(PEEK_BYTES_MAX), remaining)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
        head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1", errors="replace")
        lines = head.split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        src = self._region_of_peer_urls(headers.get("x-peerurls", ""))
        log.info(
            "peer front %s: %r X-PeerURLs=%r X-Server-From=%r -> source %s",
            spec.dst,
            lines[0][:120],
            headers.get("x-peerurls"),
            headers.get("x-server-from"),
            src,
        )
        return src, buf

    def _region_of_peer_urls(self, value: str) -> str:
        for url in value.split(","):
            region = self.config.peer_urls.get(url.strip().rstrip("/"))
            if region is not None:
                return region
        return UNKNOWN

    def _resniff(self, conn: _Connection, data: bytes) -> None:
        """Look for a sender header in a later request of an anonymous peer connection.

        etcd's prober (``GET /raft/probing``, no sender header) and its pipeline (``POST
        /raft``, with one) share a keep-alive connection pool, so a connection that opened
        anonymous may carry raft messages later: without this a cut link would still pass them
        (seen against etcd 3.4: a member cut off from both peers kept committing).
        """
        buf = (conn.sniff_tail + data).lower()
        conn.sniff_tail = buf[-SNIFF_TAIL_BYTES:]
        at = buf.find(_PEER_URLS_HEADER)
        if at < 0:
            return
        end = buf.find(b"\r\n", at + len(_PEER_URLS_HEADER))
        if end < 0:
            return
        value = buf[at + len(_PEER_URLS_HEADER) : end].decode("latin-1").strip()
        src = self._region_of_peer_urls(value)
        dst = conn.dst
        if src in (UNKNOWN, dst):
            return
        link = self.link(src, dst)
        log.info("peer front %s: anonymous connection now carries traffic from %s", dst, src)
        self._anonymous.discard(conn)
        conn.link = link
        link.connections.add(conn)
        link.accepted_total += 1
        if link.cut:
            link.refused_total += 1
            conn.abort()

    async def _serve(
        self, spec: ListenerSpec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        initial = b""
        src = spec.src
        if src is None:
            src, initial = await self._identify_peer(reader, spec)
        link: Link | None = None
        if src != UNKNOWN and src != spec.dst:
            link = self.link(src, spec.dst)
            if link.cut:
                link.refused_total += 1
                writer.transport.abort()
                return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(spec.target_host, spec.target_port, limit=READ_CHUNK_BYTES),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            log.info("%s -> %s %s: upstream connect failed: %r", src, spec.dst, spec.service, exc)
            writer.transport.abort()
            return
        # The link may have been cut while we connected.
        if link is not None and link.cut:
            link.refused_total += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        conn = _Connection(writer, up_writer, link)
        conn.dst = spec.dst
        if link is not None:
            link.connections.add(conn)
            link.accepted_total += 1
        else:
            self._anonymous.add(conn)
        sniff = self._resniff if spec.src is None else None
        forward = _Direction(reader, up_writer, conn, initial, sniff)
        backward = _Direction(up_reader, writer, conn, b"")
        conn.tasks = [
            asyncio.create_task(forward.read_side()),
            asyncio.create_task(forward.write_side()),
            asyncio.create_task(backward.read_side()),
            asyncio.create_task(backward.write_side()),
        ]
        try:
            # Normal end: both write sides delivered their EOF. Any error ends the connection.
            writers = {conn.tasks[1], conn.tasks[3]}
            pending: set[asyncio.Task[None]] = set(conn.tasks)
            while writers & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break
                if any(t.cancelled() for t in done):
                    break
        finally:
            self._anonymous.discard(conn)
            if conn.link is not None:
                conn.link.connections.discard(conn)
            conn.abort()
            for t in conn.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    # -- control API -----------------------------------------------------------------------

    async def _h_links(self, _req: web.Request) -> web.Response:
        return _json({"links": [link.to_json() for link in self.links.values()]})

    def _link_op(self, req: web.Request) -> tuple[str, str]:
        a, b = req.match_info["a"], req.match_info["b"]
        if link_key(a, b) not in self.links:
            raise web.HTTPNotFound(text=f"no link between {a} and {b}")
        return a, b

    async def _h_cut(self, req: web.Request) -> web.Response:
        return _json(self.cut(*self._link_op(req)).to_json())

    async def _h_heal(self, req: web.Request) -> web.Response:
        return _json(self.heal(*self._link_op(req)).to_json())

    async def _h_latency(self, req: web.Request) -> web.Response:
        a, b = self._link_op(req)
        try:
            ms = float(req.query["ms"])
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="latency needs ?ms=<number>") from None
        if not 0 <= ms <= LATENCY_MS_MAX:
            raise web.HTTPBadRequest(text=f"ms must be within 0..{LATENCY_MS_MAX}")
        return _json(self.set_latency(a, b, ms).to_json())


# Anything above a minute one way is a cut, not a latency; refuse it as a typo.
LATENCY_MS_MAX: Final = 60_000.0


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


class WanControl:
    """Client of the emulator's control endpoint (for tests and chaos nemeses)."""

    # The endpoint is on loopback; a slow answer means the emulator is gone.
    TIMEOUT_S: Final = 5.0

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WanControl:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _req(self, method: str, path: str, **params: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.TIMEOUT_S)
            )
        async with self._session.request(method, self._url + path, params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"WAN control {method} {path}: {resp.status} {body[:200]!r}")
            return orjson.loads(body)

    async def links(self) -> list[dict[str, Any]]:
        data = await self._req("GET", "/links")
        links: list[dict[str, Any]] = data["links"]
        return links

    async def cut(self, a: str, b: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._req("POST", f"/links/{a}/{b}/cut")
        return result

    async def heal(self, a: str, b: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._req("POST", f"/links/{a}/{b}/heal")
        return result

    async def set_latency(self, a: str, b: str, ms: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._req("POST", f"/links/{a}/{b}/latency", ms=str(ms))
        return result


async def serve(config: WanConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    wan = Wan(config)
    await wan.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await wan.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.wan", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = WanConfig.load(args.config)
    import uvloop

    uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
