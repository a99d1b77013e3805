"""``/v1/accounts``: create, read (consistency levels), and list entries."""

from __future__ import annotations

from aiohttp import web

from consistency import ids
from regionstore.store import AccountRow, EntryRow, ShardStore
from router import render
from router.errors import NotFound
from router.handlers.common import authorize, client_token, json_response
from router.limits import READ_DEADLINE_S, WRITE_DEADLINE_S
from router.resources import CONFIG, ROUTER
from router.routing import Deadline
from router.validation import (
    consistency_level,
    decode_cursor,
    encode_cursor,
    page_limit,
    read_json_object,
    validate_account_create,
)


async def create_account(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:write")
    client_token(request)
    router = request.app[ROUTER]
    doc = await read_json_object(request)
    spec = validate_account_create(doc, router.topology.regions.keys())
    row, shard = await router.create_account(
        tenant=principal.tenant,
        region=spec.home_region or request.app[CONFIG].region,
        currency=spec.currency,
        overdraft_limit=spec.overdraft_limit,
        metadata=spec.metadata,
        deadline=Deadline(WRITE_DEADLINE_S),
    )
    return json_response(
        request,
        render.account(row, shard),
        status=201,
        versions=[(row.id, row.version)],
        served_by="primary",
        headers={"Location": f"/v1/accounts/{ids.format_account_id(row.id)}"},
    )


def _account_id(request: web.Request) -> int:
    account_id = ids.parse_account_id(request.match_info["id"])
    if account_id is None:
        raise NotFound("no such account")
    return account_id


async def get_account(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:read")
    account_id = _account_id(request)
    consistency_level(request)
    client_token(request)
    router = request.app[ROUTER]

    async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
        return await store.get_account(account_id, principal.tenant, timeout_s=timeout_s)

    # Every level is served by the home primary until the commit-log relay keeps region caches
    # coherent; the primary satisfies strong, session and cached alike.
    row, shard = await router.read(
        ids.account_slot(account_id), "get_account", fetch, Deadline(READ_DEADLINE_S)
    )
    if row is None:
        raise NotFound("no such account")
    return json_response(
        request, render.account(row, shard), versions=[(row.id, row.version)], served_by="primary"
    )


async def list_entries(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:read")
    account_id = _account_id(request)
    limit = page_limit(request)
    before = decode_cursor(request)
    router = request.app[ROUTER]

    async def fetch(store: ShardStore, timeout_s: float) -> list[EntryRow] | None:
        return await store.list_entries(
            account_id, principal.tenant, before_seq=before, limit=limit, timeout_s=timeout_s
        )

    rows, _shard = await router.read(
        ids.account_slot(account_id), "list_entries", fetch, Deadline(READ_DEADLINE_S)
    )
    if rows is None:
        raise NotFound("no such account")
    next_cursor = encode_cursor(rows[-1].seq) if len(rows) == limit and rows[-1].seq > 1 else None
    return json_response(
        request,
        {"data": [render.entry(r) for r in rows], "next_cursor": next_cursor},
        served_by="primary",
    )
