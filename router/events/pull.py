"""The pull API's reads: one page of a tenant's events from the stream, after a cursor.

A cursor is the stream sequence of the last event a page returned, opaque to clients
(``e`` + decimal, base64url). A page is read through a short-lived ordered view of the stream
(an ephemeral consumer, one replica in memory, no acknowledgements) filtered to the tenant's
subjects, starting after the cursor: the stream is de-duplicated by event id, so following the
cursors from the start returns every stored event once, in stream order. The tenant check is
made twice: by the subject filter and on each message's ``Txr-Tenant`` header.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from router.events import stream

PAGE_MIN: Final = 1
PAGE_MAX: Final = 500
PAGE_DEFAULT: Final = 100
CURSOR_LEN_MAX: Final = 64
# The server removes a view nobody reads after this (ours delete theirs at once; a router that
# died mid-page leaves one behind for at most this long).
VIEW_INACTIVE_S: Final = 30.0
# Reading one page: all the messages the view reported pending, within this.
FETCH_TIMEOUT_S: Final = 5.0
SEQ_MAX: Final = (1 << 63) - 1


class CursorInvalid(ValueError):
    """A cursor that is not one this API handed out (the handler answers 422)."""


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"e{seq}".encode()).rstrip(b"=").decode()


def decode_cursor(raw: str) -> int:
    if not 1 <= len(raw) <= CURSOR_LEN_MAX or not raw.isascii():
        raise CursorInvalid("after is not a cursor this API issued")
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorInvalid("after is not a cursor this API issued") from None
    digits = text[1:]
    if (
        not text.startswith("e")
        or not (digits.isascii() and digits.isdigit())
        or len(digits) > 19
        or not 0 <= int(digits) <= SEQ_MAX
    ):
        raise CursorInvalid("after is not a cursor this API issued")
    return int(digits)


@dataclass(frozen=True, slots=True)
class Page:
    events: list[dict[str, Any]]
    last_seq: int
    has_more: bool


async def read_page(js: JetStreamContext, tenant: str, after: int, limit: int) -> Page:
    """Up to ``limit`` events of ``tenant`` stored after sequence ``after``."""
    config = ConsumerConfig(
        filter_subject=stream.tenant_filter(tenant),
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after + 1,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=VIEW_INACTIVE_S,
        num_replicas=1,
        mem_storage=True,
        max_ack_pending=-1,
    )
    try:
        sub = await js.pull_subscribe(
            stream.tenant_filter(tenant), durable=None, stream=stream.STREAM, config=config
        )
    except (nats.errors.Error, TimeoutError) as exc:
        raise stream.StreamUnavailable(repr(exc)) from exc
    view: str | None = None
    try:
        info = await sub.consumer_info()
        view = info.name
        pending = int(info.num_pending or 0)
        want = min(limit, pending)
        out: list[dict[str, Any]] = []
        last = after
        consumed = 0
        while len(out) < want:
            try:
                msgs = await sub.fetch(want - len(out), timeout=FETCH_TIMEOUT_S)
            except TimeoutError:  # nats-py raises its own subclass or the builtin
                break
            for m in msgs:
                consumed += 1
                last = m.metadata.sequence.stream
                if (m.headers or {}).get("Txr-Tenant") != tenant:
                    continue  # never another tenant's, whatever the subject said
                out.append(orjson.loads(m.data))
        return Page(out, last, pending > consumed)
    except (nats.errors.Error, TimeoutError) as exc:
        raise stream.StreamUnavailable(repr(exc)) from exc
    finally:
        # The server drops the view after VIEW_INACTIVE_S anyway; this saves it the wait.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await sub.unsubscribe()
            if view is not None:
                await js.delete_consumer(stream.STREAM, view)
