"""The chaos run's view of the ledger events: a webhook receiver, and the read-back.

The receiver is a real HTTP endpoint on loopback (a local cluster allows loopback webhooks),
registered for every event type of the run's tenant; it answers 200 and records the id of each
delivery whose signature verifies. After the settle, ``collect`` reads the tenant's stream from
the start through the pull API (txclient) until every stored transfer's final state is there
and the receiver has every event, or ``EVENTS_SETTLE_S`` passes (the checker then counts what is
missing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web

from router.events import model, webhooks
from txclient import AsyncClient, errors

# The publisher and the webhooks catch up after the heal: a relay restart, a NATS server
# rejoining its cluster, a webhook retry back-off of a few seconds.
EVENTS_SETTLE_S: Final = 90.0
POLL_S: Final = 0.5
EVENT_PAGE: Final = 500


class Receiver:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/chaos-hook"
        self.secret: str | None = None
        self.delivered: set[str] = set()
        # Event id -> wall-clock time of its first valid delivery (bench.events' latency).
        self.first_seen: dict[str, float] = {}
        self.deliveries = 0
        self.bad_signatures = 0
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries += 1
        sig = request.headers.get("Txr-Signature", "")
        if self.secret is None or not webhooks.verify(self.secret, body, sig):
            self.bad_signatures += 1
            return web.Response(status=400)
        eid = request.headers.get("Txr-Event-Id", "")
        self.delivered.add(eid)
        self.first_seen.setdefault(eid, time.time())
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/chaos-hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def register(self, client: AsyncClient) -> None:
        wh = await client.create_webhook(self.url, list(model.EVENT_TYPES))
        self.secret = wh.secret

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def read_all(client: AsyncClient) -> list[dict[str, Any]]:
    return [e.raw async for e in client.events(page_size=EVENT_PAGE)]


async def collect(
    client: AsyncClient, receiver: Receiver, stored: Iterable[tuple[str, str]]
) -> tuple[list[dict[str, Any]] | None, set[str]]:
    """(events, delivered ids) once the stream holds ``stored``'s (id, status) final events and
    the receiver has them all, or at the deadline as they are. None: the stream never read."""
    final = {(model.event_id(f"transfer.{status}", tid)) for tid, status in stored}
    deadline = time.monotonic() + EVENTS_SETTLE_S
    events: list[dict[str, Any]] | None = None
    while True:
        try:
            events = await read_all(client)
        except errors.TxError:
            events = None
        if events is not None:
            ids = {e["id"] for e in events}
            if final <= ids and ids <= receiver.delivered:
                return events, set(receiver.delivered)
        if time.monotonic() > deadline:
            return events, set(receiver.delivered)
        await asyncio.sleep(POLL_S)
