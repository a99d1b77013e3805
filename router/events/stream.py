"""The event stream in NATS JetStream: its name, subjects, bounds, and the idempotent set-up.

Stream ``TXR_EVENTS``, subjects ``txr.events.<tenant>.<type>`` (the tenant as one subject token:
``.`` is the only tenant character a token cannot hold, and ``~`` is not a tenant character,
so ``.`` -> ``~`` is one-to-one and no tenant's filter can match another tenant's subject).
Message id (``Nats-Msg-Id``) = event id: a republish inside the duplicate window is stored once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

STREAM: Final = "TXR_EVENTS"
SUBJECT_PREFIX: Final = "txr.events"
# Webhook endpoints (router.events.webhooks): one key per endpoint, replicated like the stream.
WEBHOOKS_BUCKET: Final = "TXR_WEBHOOKS"
# The publisher's position per shard (router.events.publisher.Position): which replication slot
# it follows and the commit time of the last event it published.
POSITIONS_BUCKET: Final = "TXR_EVENTS_POS"
# The duplicate window: a republish of an event already stored inside it is dropped by the
# server. A republish comes from a decoder that restarts from the replication slot's confirmed
# position, which trails what the publisher had acknowledged by at most what a region holds the
# slot back (router.relays.feed.REGION_HOLD_S, 60 s) plus a relay restart; ten minutes covers
# that with room, and the server keeps one id per message of the window in memory (at a few
# thousand events per second a few hundred MB at worst, bounded by the stream's bytes too).
DUPLICATE_WINDOW_S: Final = 600.0
# Retention: what the pull API and a new webhook can still read. A week of history, and at
# most this many bytes on each server (the oldest go first).
STREAM_MAX_AGE_S: Final = 7 * 24 * 3600.0
STREAM_MAX_BYTES: Final = 1 << 30
# One event's body is an account or a transfer: far below this, whatever it holds (validation
# bounds the metadata; tests/unit/test_events.py builds the largest one).
STREAM_MAX_MSG_BYTES: Final = 64 * 1024
# Client connection: a region's own server; reconnect forever (the publisher must resume).
CONNECT_TIMEOUT_S: Final = 2.0
RECONNECT_WAIT_S: Final = 0.5
# JetStream API calls (stream info, consumer create, KV): a meta-group round trip across the WAN.
JS_API_TIMEOUT_S: Final = 5.0

_TENANT_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_~\-]{1,64}")


class StreamUnavailable(Exception):
    """NATS or JetStream did not answer (connection, timeout, no meta leader)."""


def tenant_token(tenant: str) -> str:
    token = tenant.replace(".", "~")
    if not _TENANT_TOKEN_RE.fullmatch(token):
        raise ValueError("not a tenant name")
    return token


def tenant_of_token(token: str) -> str:
    return token.replace("~", ".")


# (tenant, type) subjects remembered by ``subject``: the publisher asks once per event, and a
# busy shard's events come from few tenants.
SUBJECTS_MEMO: Final = 4096


@functools.lru_cache(maxsize=SUBJECTS_MEMO)
def subject(tenant: str, event_type: str) -> str:
    return f"{SUBJECT_PREFIX}.{tenant_token(tenant)}.{event_type}"


def tenant_filter(tenant: str) -> str:
    return f"{SUBJECT_PREFIX}.{tenant_token(tenant)}.>"


def stream_config(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=STREAM_MAX_AGE_S,
        max_bytes=STREAM_MAX_BYTES,
        max_msg_size=STREAM_MAX_MSG_BYTES,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def connect(servers: Sequence[str], *, name: str) -> NATS:
    """A client that reconnects forever; raises StreamUnavailable when the first connect fails."""
    try:
        return await nats.connect(
            servers=list(servers),
            name=name,
            connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise StreamUnavailable(f"cannot connect to NATS: {exc!r}") from exc


async def ensure(js: JetStreamContext, *, replicas: int) -> None:
    """Create (or bring to this configuration) the stream and the webhooks bucket."""
    config = stream_config(replicas)
    try:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Exists with another configuration (an older bound): make it this one.
            await js.update_stream(config)
        for bucket in (WEBHOOKS_BUCKET, POSITIONS_BUCKET):
            try:
                await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=1, replicas=replicas)
                )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise StreamUnavailable(f"cannot set up {STREAM}: {exc!r}") from exc
