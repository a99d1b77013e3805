"""``/v1/transfers``: post a transfer (idempotent) and read one."""

from __future__ import annotations

from aiohttp import web

from consistency import ids
from regionstore.store import ShardStore, TransferCode, TransferRow
from router import render
from router.errors import BusinessRefusal, Conflict, NotFound
from router.handlers.common import authorize, client_token, json_response
from router.limits import READ_DEADLINE_S, WRITE_DEADLINE_S
from router.resources import METRICS, ROUTER
from router.routing import Deadline
from router.validation import read_json_object, validate_idempotency_key, validate_transfer

_REFUSALS = {
    TransferCode.INSUFFICIENT_FUNDS: "the source account's balance would fall below its floor",
    TransferCode.CURRENCY_MISMATCH: "source, destination and transfer currencies must match",
    TransferCode.BALANCE_LIMIT: "the destination balance would exceed the largest allowed",
}


async def create_transfer(request: web.Request) -> web.Response:
    principal = authorize(request, "transfers:write")
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    client_token(request)
    doc = await read_json_object(request)
    req = validate_transfer(doc)
    router = request.app[ROUTER]
    posted = await router.post_transfer(principal.tenant, req, key, Deadline(WRITE_DEADLINE_S))
    res = posted.result
    request.app[METRICS].transfer_outcomes.labels(router.region, res.code.value).inc()
    if res.code is TransferCode.NOT_FOUND:
        raise NotFound("source or destination account not found")
    if res.code is TransferCode.IDEMPOTENCY_KEY_REUSED:
        raise Conflict("this Idempotency-Key was used for a different request")
    if res.code in _REFUSALS:
        raise BusinessRefusal(_REFUSALS[res.code], code=res.code.value)
    assert res.code in (TransferCode.OK, TransferCode.REPLAYED), res.code
    assert res.transfer_id is not None
    assert res.status is not None
    assert res.created_at is not None
    assert res.source_version is not None
    assert res.source_balance is not None
    status = res.status
    if res.code is TransferCode.OK and posted.destination_shard is not None:
        status = await router.settle_inline(principal.tenant, posted, req)
    row = TransferRow(
        id=res.transfer_id,
        tenant=principal.tenant,
        source=req.source,
        destination=req.destination,
        amount=req.amount,
        currency=req.currency,
        reference=req.reference,
        status=status,
        created_at=res.created_at,
    )
    if status == "reversed":
        # Rare: the destination refused. The stored row carries the refusal code.
        row = await _stored_transfer(request, principal.tenant, row)
    # A cross-shard leg 1 reports only the source; leg 2 runs on another shard. The batch's
    # cache write happened before this answer (ShardRouter._cache_committed).
    versions = [(req.source, res.source_version)]
    if res.destination_version is not None:
        versions.append((req.destination, res.destination_version))
    headers = {"Idempotent-Replayed": "true"} if res.code is TransferCode.REPLAYED else {}
    return json_response(
        request,
        render.transfer(row),
        status=201,
        versions=versions,
        served_by="primary",
        headers=headers,
    )


async def _stored_transfer(request: web.Request, tenant: str, row: TransferRow) -> TransferRow:
    async def fetch(store: ShardStore, timeout_s: float) -> TransferRow | None:
        return await store.get_transfer(row.id, tenant, timeout_s=timeout_s)

    stored, _shard = await request.app[ROUTER].read(
        ids.account_slot(row.source), "get_transfer", fetch, Deadline(READ_DEADLINE_S)
    )
    return stored if stored is not None else row


async def get_transfer(request: web.Request) -> web.Response:
    principal = authorize(request, "accounts:read")
    parsed = ids.parse_transfer_id(request.match_info["id"])
    if parsed is None:
        raise NotFound("no such transfer")
    slot, transfer_uuid = parsed

    async def fetch(store: ShardStore, timeout_s: float) -> TransferRow | None:
        return await store.get_transfer(transfer_uuid, principal.tenant, timeout_s=timeout_s)

    row, _shard = await request.app[ROUTER].read(
        slot, "get_transfer", fetch, Deadline(READ_DEADLINE_S)
    )
    if row is None or ids.account_slot(row.source) != slot:
        raise NotFound("no such transfer")
    return json_response(request, render.transfer(row), versions=[], served_by="primary")
