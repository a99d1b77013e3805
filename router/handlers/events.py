"""``/v1/events`` (the pull API) and ``/v1/webhooks`` (router.events)."""

from __future__ import annotations

from typing import Any

import nats.errors
from aiohttp import web

from router.errors import NotFound, RegionUnavailable, Unprocessable
from router.events import model, pull, stream, webhooks
from router.handlers.common import authorize, json_response
from router.resources import CONFIG, EVENTS
from router.validation import read_json_object

_NATS_ERRORS = (stream.StreamUnavailable, nats.errors.Error, OSError, TimeoutError)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return pull.PAGE_DEFAULT
    if (
        not (raw.isascii() and raw.isdigit())
        or len(raw) > 4
        or not pull.PAGE_MIN <= int(raw) <= pull.PAGE_MAX
    ):
        raise Unprocessable(f"limit must be an integer from {pull.PAGE_MIN} to {pull.PAGE_MAX}")
    return int(raw)


async def list_events(request: web.Request) -> web.Response:
    principal = authorize(request, "events:read")
    limit = _limit(request)
    raw = request.query.get("after")
    try:
        after = 0 if raw is None else pull.decode_cursor(raw)
    except pull.CursorInvalid as exc:
        raise Unprocessable(str(exc)) from None
    try:
        js = await request.app[EVENTS].jetstream()
        page = await pull.read_page(js, principal.tenant, after, limit)
    except _NATS_ERRORS:
        raise RegionUnavailable("the event stream is not reachable from this region") from None
    # Always a cursor: where the next read starts, so a consumer can poll for newer events.
    body = {
        "data": page.events,
        "next_cursor": pull.encode_cursor(page.last_seq),
        "has_more": page.has_more,
    }
    return json_response(request, body, served_by="stream")


def _events_field(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= len(model.EVENT_TYPES)
        or any(not isinstance(v, str) or v not in model.EVENT_TYPES for v in value)
        or len(set(value)) != len(value)
    ):
        raise Unprocessable(
            "events must be a non-empty list of distinct types of " + ", ".join(model.EVENT_TYPES)
        )
    return tuple(value)


async def create_webhook(request: web.Request) -> web.Response:
    principal = authorize(request, "webhooks:write")
    doc = await read_json_object(request)
    extra = set(doc) - {"url", "events"}
    if extra:
        raise Unprocessable(f"unknown fields: {', '.join(sorted(extra))}")
    events = _events_field(doc.get("events"))
    try:
        url = await webhooks.check_url(
            doc.get("url"), allow_loopback=request.app[CONFIG].webhooks_allow_loopback
        )
    except webhooks.UrlRefused as exc:
        raise Unprocessable(str(exc), code="url_not_allowed") from None
    try:
        js = await request.app[EVENTS].jetstream()
        registry = webhooks.Registry(js)
        if len(await registry.list(principal.tenant)) >= webhooks.WEBHOOKS_PER_TENANT_MAX:
            raise Unprocessable(
                f"at most {webhooks.WEBHOOKS_PER_TENANT_MAX} webhooks per tenant",
                code="limit_exceeded",
            )
        ep = await registry.create(principal.tenant, url, events)
    except _NATS_ERRORS:
        raise RegionUnavailable("the webhook registry is not reachable") from None
    body: dict[str, Any] = {**ep.public(), "secret": ep.secret}
    return json_response(request, body, status=201, served_by="stream")


async def list_webhooks(request: web.Request) -> web.Response:
    principal = authorize(request, "webhooks:write")
    try:
        js = await request.app[EVENTS].jetstream()
        eps = await webhooks.Registry(js).list(principal.tenant)
    except _NATS_ERRORS:
        raise RegionUnavailable("the webhook registry is not reachable") from None
    return json_response(request, {"data": [e.public() for e in eps]}, served_by="stream")


async def delete_webhook(request: web.Request) -> web.Response:
    principal = authorize(request, "webhooks:write")
    wid = request.match_info["id"]
    if not (wid.startswith("wh_") and len(wid) == 27 and wid[3:].isalnum() and wid.isascii()):
        raise NotFound("no such webhook")
    try:
        js = await request.app[EVENTS].jetstream()
        found = await webhooks.Registry(js).delete(principal.tenant, wid)
    except _NATS_ERRORS:
        raise RegionUnavailable("the webhook registry is not reachable") from None
    if not found:
        raise NotFound("no such webhook")
    return web.Response(status=204)
