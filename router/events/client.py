"""A router's NATS client for the events API: connected on first use, shared by requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router.events import stream


class EventsClient:
    def __init__(self, servers: Sequence[str], *, name: str) -> None:
        self.servers = list(servers)
        self.name = name
        self._nc: NATS | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.servers)

    async def jetstream(self) -> JetStreamContext:
        """Raises StreamUnavailable when NATS is not configured or does not answer."""
        if not self.servers:
            raise stream.StreamUnavailable("events are not configured in this region")
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await stream.connect(self.servers, name=self.name)
            nc = self._nc
        if not nc.is_connected:
            raise stream.StreamUnavailable("NATS is reconnecting")
        return nc.jetstream(timeout=stream.JS_API_TIMEOUT_S)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await nc.close()
