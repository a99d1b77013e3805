"""The NATS JetStream ``Publisher`` (``router.events.publisher``): events into ``TXR_EVENTS``,
each wave of a call pipelined and its acknowledgements read on a reply inbox of the
publisher's own (``_AckInbox``), positions in the KV bucket ``TXR_EVENTS_POS``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.client import NO_RESPONDERS_STATUS
from nats.js.kv import KeyValue

from router.events import model, stream
from router.events.publisher import Position, Published, PublishError, waves

log = logging.getLogger(__name__)

# The acknowledgements of one wave, all of them, within this.
PUBLISH_ACK_TIMEOUT_S: Final = 10.0

# How a publish was answered (``_Wave.outcomes``).
_OWED: Final = 0
_STORED: Final = 1
_DUPLICATE: Final = 2
_REFUSED: Final = 3


class _Wave:
    """One wave's acknowledgements: each publish's outcome, how many are still owed, and the
    future the publisher awaits (done once none is owed)."""

    __slots__ = ("done", "failure", "outcomes", "owed")

    def __init__(self, size: int) -> None:
        self.outcomes = [_OWED] * size
        self.owed = size
        self.failure: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if size == 0:
            self.done.set_result(None)

    def answer(self, i: int, outcome: int, failure: str | None = None) -> None:
        if self.outcomes[i] != _OWED:
            return
        self.outcomes[i] = outcome
        if failure is not None and self.failure is None:
            self.failure = failure
        self.owed -= 1
        if self.owed == 0 and not self.done.done():
            self.done.set_result(None)


class _AckInbox:
    """The reply subscription of one connection's publishes: every publish carries a reply
    subject ``<inbox>.<n>``, and the stream's acknowledgement (its PubAck, an API error, or the
    server's no-responders status) names the publish by ``n``.

    Why not the client's ``publish_async``: it costs a future, a done-callback, a semaphore
    acquired through ``wait_for``, random token bytes and a stdlib JSON parse per message, about
    twice the CPU of the publish itself (measured 27 vs 12 us per event, same server); one wave
    is bounded already (``PUBLISH_WINDOW_MAX``) and waits as a whole, so it needs one future."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self._owed: dict[str, tuple[_Wave, int]] = {}
        self._next = 0

    async def open(self) -> None:
        await self.nc.subscribe(self.prefix + "*", cb=self._answer)

    def expect(self, wave: _Wave, i: int) -> tuple[str, str]:
        """A reply subject for publish ``i`` of ``wave`` (and its token, to forget it)."""
        self._next += 1
        token = str(self._next)
        self._owed[token] = (wave, i)
        return self.prefix + token, token

    def forget(self, tokens: Sequence[str]) -> None:
        """Stop waiting for these (a wave that timed out or failed to send): a late answer is
        then ignored, and the map holds only what some wave still awaits."""
        for token in tokens:
            self._owed.pop(token, None)

    @property
    def owed(self) -> int:
        return len(self._owed)

    async def _answer(self, msg: Msg) -> None:
        owed = self._owed.pop(msg.subject[len(self.prefix) :], None)
        if owed is None:
            return
        wave, i = owed
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            wave.answer(i, _REFUSED, "no stream answered (no responders)")
            return
        try:
            ack = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            ack = None
        if not isinstance(ack, dict) or ack.get("stream") != stream.STREAM or "error" in ack:
            error = ack.get("error") if isinstance(ack, dict) else None
            text = error.get("description") if isinstance(error, dict) else None
            wave.answer(i, _REFUSED, f"refused by the stream: {text or msg.data[:200]!r}")
            return
        wave.answer(i, _DUPLICATE if ack.get("duplicate") else _STORED)


class JetStreamPublisher:
    """Publishes into ``TXR_EVENTS`` with ``Nats-Msg-Id`` = event id. Connects on first use
    (and again after ``close``), so a relay starts while NATS is still down."""

    def __init__(self, servers: Sequence[str], *, name: str) -> None:
        self._servers = list(servers)
        self._name = name
        self._nc: NATS | None = None
        # One per connection (the client re-subscribes it after a reconnect).
        self._inbox: _AckInbox | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> NATS:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await stream.connect(self._servers, name=self._name)
                self._inbox = None
            return self._nc

    async def _acks(self) -> _AckInbox:
        nc = await self._client()
        async with self._lock:
            if self._inbox is None or self._inbox.nc is not nc:
                inbox = _AckInbox(nc)
                await inbox.open()
                self._inbox = inbox
            return self._inbox

    async def healthy(self) -> bool:
        try:
            nc = await self._client()
            js = nc.jetstream(timeout=stream.JS_API_TIMEOUT_S)
            await js.stream_info(stream.STREAM)
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError):
            return False
        return True

    async def _positions(self) -> KeyValue:
        nc = await self._client()
        return await nc.jetstream(timeout=stream.JS_API_TIMEOUT_S).key_value(
            stream.POSITIONS_BUCKET
        )

    async def load_position(self, shard: str) -> Position | None:
        try:
            kv = await self._positions()
            entry = await kv.get(shard)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            raise PublishError(f"position of {shard}: {exc!r}") from exc
        return Position.from_json(entry.value) if entry.value else None

    async def save_position(self, shard: str, position: Position) -> None:
        try:
            kv = await self._positions()
            await kv.put(shard, position.to_json())
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            raise PublishError(f"position of {shard}: {exc!r}") from exc

    async def publish(self, events: Sequence[model.Event]) -> Published:
        try:
            inbox = await self._acks()
        except (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc
        acked = [False] * len(events)
        dups = 0
        for wave in waves(events):
            failure, wave_dups = await self._publish_wave(inbox, events, wave, acked)
            if failure is not None:
                stored = acked.index(False) if False in acked else len(events)
                raise PublishError(failure, stored)
            dups += wave_dups
        return Published(len(events), dups)

    async def _publish_wave(
        self,
        inbox: _AckInbox,
        events: Sequence[model.Event],
        wave: Sequence[int],
        acked: list[bool],
    ) -> tuple[str | None, int]:
        """Pipeline one wave's publishes and wait for all their acknowledgements; mark the
        acknowledged ones in ``acked``. The first failure's text (None: all stored), and how
        many acknowledgements said duplicate."""
        answers = _Wave(len(wave))
        tokens: list[str] = []
        failure: str | None = None
        publish = inbox.nc.publish
        try:
            async with asyncio.timeout(PUBLISH_ACK_TIMEOUT_S):
                for j, i in enumerate(wave):
                    ev = events[i]
                    reply, token = inbox.expect(answers, j)
                    tokens.append(token)
                    await publish(
                        ev.subject,
                        ev.body(),
                        reply=reply,
                        headers={
                            "Nats-Msg-Id": ev.id,
                            "Txr-Tenant": ev.tenant,
                            Header.EXPECTED_STREAM.value: stream.STREAM,
                        },
                    )
                await answers.done
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            # Whatever is still owed (timed out, never sent, cancelled) is never awaited again;
            # a message sent may still be stored: a later republish is then a duplicate.
            inbox.forget(tokens)
        if len(tokens) < len(wave):
            failure = failure or "not every publish of the wave was sent"
        failure = answers.failure or failure
        dups = 0
        for j, i in enumerate(wave):
            outcome = answers.outcomes[j]
            if outcome == _OWED:
                failure = failure or "acknowledgement timed out"
            elif outcome != _REFUSED:
                acked[i] = True
                dups += outcome == _DUPLICATE
        return failure, dups

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._inbox = None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                log.warning("events: closing the NATS client: %r", exc)
