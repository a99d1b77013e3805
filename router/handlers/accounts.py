"""``/v1/accounts``: create, read (consistency levels), and list entries."""

from __future__ import annotations

from aiohttp import web

from consistency import ids
from regionstore.store import EntryRow, ShardStore
from router import render
from router.errors import Forbidden, NotFound, from_outcome
from router.handlers.common import authorize, client_token, json_response, request_deadline
from router.limits import READ_DEADLINE_S, WRITE_DEADLINE_S
from router.outcomes import RouteOutcome
from router.resources import READS, RESOLVER, WRITES
from router.validation import (
    consistency_level,
    decode_cursor,
    encode_cursor,
    page_limit,
    read_json_object,
    validate_account_create,
    validate_idempotency_key,
)


async def create_account(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:write")
    raw_key = request.headers.get("Idempotency-Key")
    # Optional here (API.md requires it for transfers only): with it, the open happens once.
    key = None if raw_key is None else validate_idempotency_key(raw_key)
    client_token(request)
    doc = await read_json_object(request)
    spec = validate_account_create(doc, request.app[RESOLVER].topology.regions.keys())
    if spec.overdraft_limit > 0 and "accounts:overdraft" not in principal.scopes:
        # Credit is a privilege of its own, not a default of accounts:write (API.md).
        raise Forbidden("overdraft_limit above 0 needs the 'accounts:overdraft' scope")
    try:
        row, shard, replayed = await request.app[WRITES].opens.create_account(
            tenant=principal.tenant,
            home_region=spec.home_region,
            currency=spec.currency,
            overdraft_limit=spec.overdraft_limit,
            metadata=spec.metadata,
            deadline=request_deadline(request, WRITE_DEADLINE_S),
            idempotency_key=key,
        )
    except RouteOutcome as out:
        raise from_outcome(out) from out
    headers = {"Location": f"/v1/accounts/{ids.format_account_id(row.id)}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(
        request,
        render.account(row, shard),
        status=201,
        versions=[(row.id, row.version)],
        served_by="primary",
        headers=headers,
    )


def _account_id(request: web.Request) -> int:
    account_id = ids.parse_account_id(request.match_info["id"])
    if account_id is None:
        raise NotFound("no such account")
    return account_id


async def get_account(request: web.Request) -> web.Response:
    """Serve a read from the cheapest source that satisfies its consistency level (G6): the
    read policy (router.reads) decides which."""
    principal = authorize(request, "accounts:read")
    account_id = _account_id(request)
    level = consistency_level(request)
    seen = client_token(request)
    deadline = request_deadline(request, READ_DEADLINE_S)
    try:
        row, shard, source = await request.app[READS].account(
            account_id, principal.tenant, level, seen, deadline
        )
    except RouteOutcome as out:
        raise from_outcome(out) from out
    if row is None:
        raise NotFound("no such account")
    return json_response(
        request, render.account(row, shard), versions=[(row.id, row.version)], served_by=source
    )


async def list_entries(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:read")
    account_id = _account_id(request)
    limit = page_limit(request)
    before = decode_cursor(request)

    async def fetch(store: ShardStore, timeout_s: float) -> list[EntryRow] | None:
        return await store.list_entries(
            account_id, principal.tenant, before_seq=before, limit=limit, timeout_s=timeout_s
        )

    deadline = request_deadline(request, READ_DEADLINE_S)
    try:
        rows, _shard = await request.app[READS].primary(
            ids.account_slot(account_id), "list_entries", fetch, deadline
        )
    except RouteOutcome as out:
        raise from_outcome(out) from out
    if rows is None:
        raise NotFound("no such account")
    next_cursor = encode_cursor(rows[-1].seq) if len(rows) == limit and rows[-1].seq > 1 else None
    return json_response(
        request,
        {"data": [render.entry(r) for r in rows], "next_cursor": next_cursor},
        served_by="primary",
    )
