"""``/v1/accounts``: create, read (consistency levels), and list entries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from consistency import coherence, ids
from consistency.topology import Node, Shard
from regionstore.errors import StoreError
from regionstore.store import AccountRow, EntryRow, ShardStore
from router import render
from router.cache import CacheEntry, CacheUnavailable
from router.errors import Forbidden, NotFound
from router.handlers.common import authorize, client_token, json_response, request_deadline
from router.limits import CACHED_LAG_BOUND_S, READ_DEADLINE_S, WRITE_DEADLINE_S
from router.resources import CACHE, CONFIG, RELAY_LAG, ROUTER, RTT, STORES
from router.routing import Deadline
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
    router = request.app[ROUTER]
    doc = await read_json_object(request)
    spec = validate_account_create(doc, router.topology.regions.keys())
    if spec.overdraft_limit > 0 and "accounts:overdraft" not in principal.scopes:
        # Credit is a privilege of its own, not a default of accounts:write (API.md).
        raise Forbidden("overdraft_limit above 0 needs the 'accounts:overdraft' scope")
    row, shard, replayed = await router.create_account(
        tenant=principal.tenant,
        region=spec.home_region or request.app[CONFIG].region,
        currency=spec.currency,
        overdraft_limit=spec.overdraft_limit,
        metadata=spec.metadata,
        deadline=request_deadline(request, WRITE_DEADLINE_S),
        idempotency_key=key,
    )
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
    """Serve a read from the cheapest source that satisfies its consistency level (G6).

    strong: the home primary. session: the region cache if its version is at least the one in
    the client's token, else this region's synchronous standby when it is closer than the
    primary and new enough, else the primary. cached: the region cache while the region's
    invalidation relay is within its lag bound for the shard, else the primary. The cache
    serves either level only within that bound. The primary and the standby serve only while
    this router's view of the shard's epoch is confirmed (``ShardRouter.require_confirmed``):
    past it the read is a 503, never an answer from a primary that may have been deposed.
    """
    principal = authorize(request, "accounts:read")
    account_id = _account_id(request)
    level = consistency_level(request)
    seen = client_token(request)
    row, shard, source = await read_account(request, account_id, principal.tenant, level, seen)
    if row is None:
        raise NotFound("no such account")
    return json_response(
        request, render.account(row, shard), versions=[(row.id, row.version)], served_by=source
    )


async def read_account(
    request: web.Request, account_id: int, tenant: str, level: str, seen: dict[int, int]
) -> tuple[AccountRow | None, Shard, str]:
    """``(row, shard, source)`` where source is ``cache``, ``standby`` or ``primary``."""
    router = request.app[ROUTER]
    cache = request.app[CACHE]
    config = request.app[CONFIG]
    deadline = request_deadline(request, READ_DEADLINE_S)
    slot = ids.account_slot(account_id)
    shard, _ = router.topology.route(slot)

    async def from_primary() -> tuple[AccountRow | None, Shard, str]:
        async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
            return await store.get_account(account_id, tenant, timeout_s=timeout_s)

        row, home = await router.read(slot, "get_account", fetch, deadline)
        return row, home, "primary"

    if level == "strong":
        return await from_primary()

    if level == "session":
        needed = seen.get(account_id, 0)
        entry = None
        # A session read from the cache is still a cached read: it must not be older than the
        # lag bound either (G6), or a client that saw only old versions would be served from a
        # cache whose relay died long ago (the chaos suite's kill-relays scenario found this).
        lag = await request.app[RELAY_LAG].lag(shard)
        if lag is not None and lag <= CACHED_LAG_BOUND_S:
            try:
                entry = await cache.get(shard.epoch, account_id)
            except CacheUnavailable:
                entry = None  # a Redis outage costs latency, never correctness
        if entry is not None and entry.version >= needed:
            return _visible(entry.payload, tenant), shard, "cache"
        standby = _closer_local_standby(request, shard, config.region)
        if standby is not None:
            # A standby of a deposed primary is as stale as the primary: same lease rule.
            await router.require_confirmed(shard)
            row = await _read_standby(request, standby, account_id, tenant, deadline)
            if row is not None and row.version >= needed:
                return row, shard, "standby"
        return await from_primary()

    lag = await request.app[RELAY_LAG].lag(shard)
    if lag is None or lag > CACHED_LAG_BOUND_S:
        return await from_primary()

    async def loader() -> CacheEntry | None:
        # Shared by every caller that misses this key at once (single flight), whoever they
        # are: so it loads the row for no tenant in particular, and each caller's own tenant
        # check happens below (_visible). Loading as the first caller's tenant gave the owner
        # a 404 whenever another tenant asked first (issue 16).
        async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
            return await store.get_customer_account(account_id, timeout_s=timeout_s)

        row, _ = await router.read(slot, "get_account", fetch, deadline)
        if row is None:
            return None
        return CacheEntry(row.version, _payload(row))

    entry, hit = await cache.read_through(shard.epoch, account_id, loader)
    if entry is None:
        return None, shard, "primary"
    return _visible(entry.payload, tenant), shard, "cache" if hit else "primary"


def _closer_local_standby(request: web.Request, shard: Shard, region: str) -> Node | None:
    table = request.app[RTT]
    for node in shard.standbys:
        if node.region == region and table.cost(f"node:{node.name}") < table.cost(
            f"node:{shard.primary.name}"
        ):
            return node
    return None


async def _read_standby(
    request: web.Request, node: Node, account_id: int, tenant: str, deadline: Deadline
) -> AccountRow | None:
    try:
        store = await request.app[STORES].for_node(node)
        return await store.get_account(
            account_id, tenant, timeout_s=max(deadline.remaining(), 0.01)
        )
    except StoreError:
        # The standby is only a shortcut; the primary still answers.
        return None


def _payload(row: AccountRow) -> dict[str, Any]:
    return coherence.account_payload(
        id=row.id,
        tenant=row.tenant,
        currency=row.currency,
        balance=row.balance,
        overdraft_limit=row.overdraft_limit,
        version=row.version,
        metadata=row.metadata,
        created_at=row.created_at,
    )


def _visible(payload: dict[str, Any], tenant: str) -> AccountRow | None:
    """The cached row as the caller may see it: another tenant's (or a transit) row is absent."""
    if payload.get("tenant") != tenant:
        return None
    return AccountRow(
        id=int(payload["id"]),
        tenant=str(payload["tenant"]),
        currency=str(payload["currency"]),
        balance=int(payload["balance"]),
        overdraft_limit=int(payload["overdraft_limit"]),
        version=int(payload["version"]),
        metadata=dict(payload["metadata"]),
        created_at=datetime.fromisoformat(str(payload["created_at"])),
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

    deadline = request_deadline(request, READ_DEADLINE_S)
    rows, _shard = await router.read(ids.account_slot(account_id), "list_entries", fetch, deadline)
    if rows is None:
        raise NotFound("no such account")
    next_cursor = encode_cursor(rows[-1].seq) if len(rows) == limit and rows[-1].seq > 1 else None
    return json_response(
        request,
        {"data": [render.entry(r) for r in rows], "next_cursor": next_cursor},
        served_by="primary",
    )
