"""``/v1/transfers``: post a transfer (idempotent), post a batch of them, and read one."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from consistency import ids
from consistency.idempotency import is_valid_key
from consistency.saga import TransferStatus
from regionstore.store import ShardStore, TransferCode, TransferRow
from router import render
from router.errors import (
    ApiError,
    BusinessRefusal,
    Conflict,
    NotFound,
    Unprocessable,
    from_outcome,
)
from router.handlers.common import authorize, client_token, json_response, request_deadline
from router.limits import (
    READ_DEADLINE_S,
    TRANSFER_BATCH_BODY_BYTES_MAX,
    TRANSFER_BATCH_ITEMS_MAX,
    WRITE_DEADLINE_S,
)
from router.model import PostedTransfer, TransferRequest
from router.outcomes import RouteOutcome
from router.ratelimit import charge
from router.reads import ReadPolicy
from router.resolver import Deadline
from router.resources import METRICS, READS, SAGA, WRITES
from router.validation import (
    decode_transfer,
    parse_json_object,
    read_body,
    validate_idempotency_key,
    validate_transfer,
)

_REFUSALS = {
    TransferCode.INSUFFICIENT_FUNDS: "the source account's balance would fall below its floor",
    TransferCode.CURRENCY_MISMATCH: "source, destination and transfer currencies must match",
    TransferCode.BALANCE_LIMIT: "the destination balance would exceed the largest allowed",
}

Versions = list[tuple[int, int]]


async def create_transfer(request: web.Request) -> web.Response:
    principal = authorize(request, "transfers:write")
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    client_token(request)
    deadline = request_deadline(request, WRITE_DEADLINE_S)
    req = decode_transfer(await read_body(request))
    try:
        posted = await request.app[WRITES].post_transfer(principal.tenant, req, key, deadline)
        body, versions, replayed = await _answer(request, principal.tenant, req, posted)
    except RouteOutcome as out:
        raise from_outcome(out) from out
    return json_response(
        request,
        body,
        status=201,
        versions=versions,
        served_by="primary",
        headers={"Idempotent-Replayed": "true"} if replayed else None,
    )


async def _answer(
    request: web.Request,
    tenant: str,
    req: TransferRequest,
    posted: PostedTransfer,
) -> tuple[dict[str, Any], Versions, bool]:
    """The transfer's public form, the versions it wrote, and whether it was a replay; or the
    refusal as an ApiError (the same for a single request and a batch item)."""
    res = posted.result
    request.app[METRICS].transfer_outcome(res.code.value).inc()
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
        status = await request.app[SAGA].settle_inline(tenant, posted, req)
    row = TransferRow(
        id=res.transfer_id,
        tenant=tenant,
        source=req.source,
        destination=req.destination,
        amount=req.amount,
        currency=req.currency,
        reference=req.reference,
        status=status,
        created_at=res.created_at,
    )
    if status is TransferStatus.REVERSED:
        # Rare: the destination refused. The stored row carries the refusal code.
        row = await _stored_transfer(request.app[READS], tenant, row)
    # A cross-shard leg 1 reports only the source; leg 2 runs on another shard. The batch's
    # cache write happened before this answer (WritePath._cache_committed).
    versions = [(req.source, res.source_version)]
    if res.destination_version is not None:
        versions.append((req.destination, res.destination_version))
    return render.transfer(row), versions, res.code is TransferCode.REPLAYED


async def create_transfer_batch(request: web.Request) -> web.Response:
    """``POST /v1/transfers/batch``: independent items, each exactly one POST /v1/transfers.

    The envelope is checked whole first (400/413/422, nothing applied); the batch is charged to
    the tenant's rate as one unit per item (429 for the whole batch, nothing applied, when that
    many are not there); then every item is validated on its own (a bad item gets its own 422,
    its neighbours go on), the valid ones go to their shards' batchers together, and the answer
    lists one result per item in request order. The consistency token covers every applied or
    replayed item.
    """
    principal = authorize(request, "transfers:write")
    client_token(request)
    deadline = request_deadline(request, WRITE_DEADLINE_S)
    doc = parse_json_object(await read_body(request, limit=TRANSFER_BATCH_BODY_BYTES_MAX))
    if set(doc) != {"transfers"}:
        raise Unprocessable('the body must be {"transfers": [item, ...]} and nothing else')
    items = doc["transfers"]
    if not isinstance(items, list) or not 1 <= len(items) <= TRANSFER_BATCH_ITEMS_MAX:
        raise Unprocessable(f"transfers must be a list of 1 to {TRANSFER_BATCH_ITEMS_MAX} items")
    # The tenant's rate limit, one unit per item, all or nothing (router.ratelimit).
    rate_headers = await charge(request, principal.tenant, len(items))
    results: list[dict[str, Any] | None] = [None] * len(items)
    valid: list[tuple[int, TransferRequest, str]] = []
    for i, item in enumerate(items):
        try:
            req, key = _batch_item(item)
        except ApiError as err:
            results[i] = _error(err)
            continue
        valid.append((i, req, key))
    tenant = principal.tenant
    posted = await request.app[WRITES].post_many(
        tenant, [(req, key) for _, req, key in valid], deadline
    )
    versions: Versions = []

    async def answer(i: int, req: TransferRequest, outcome: PostedTransfer | RouteOutcome) -> None:
        if isinstance(outcome, RouteOutcome):
            results[i] = _error(from_outcome(outcome))
            return
        try:
            body, wrote, replayed = await _answer(request, tenant, req, outcome)
        except ApiError as err:
            results[i] = _error(err)
            return
        except RouteOutcome as out:
            results[i] = _error(from_outcome(out))
            return
        versions.extend(wrote)
        results[i] = {"status": 201, "transfer": body, "replayed": replayed}

    cross = []
    for (i, req, _key), outcome in zip(valid, posted, strict=True):
        if isinstance(outcome, PostedTransfer) and outcome.destination_shard is not None:
            cross.append(answer(i, req, outcome))  # its leg 2 is delivered inline, in parallel
        else:
            await answer(i, req, outcome)  # no await inside for a same-shard outcome
    if cross:
        await asyncio.gather(*cross)
    assert all(r is not None for r in results)
    return json_response(
        request,
        {"results": results},
        versions=versions,
        served_by="primary",
        headers=rate_headers,
    )


def _batch_item(item: object) -> tuple[TransferRequest, str]:
    if not isinstance(item, dict):
        raise Unprocessable("each item must be a JSON object")
    key = item.get("idempotency_key")
    if not isinstance(key, str) or not is_valid_key(key):
        raise Unprocessable("idempotency_key must be 1-255 printable ASCII characters")
    fields = {k: v for k, v in item.items() if k != "idempotency_key"}
    return validate_transfer(fields), key


def _error(err: ApiError) -> dict[str, Any]:
    if err.status == 400:
        # Within a well-formed envelope an item is content, never syntax.
        err = Unprocessable(err.detail)
    return {"status": err.status, "error": err.body()}


async def _stored_transfer(reads: ReadPolicy, tenant: str, row: TransferRow) -> TransferRow:
    async def fetch(store: ShardStore, timeout_s: float) -> TransferRow | None:
        return await store.get_transfer(row.id, tenant, timeout_s=timeout_s)

    stored, _shard = await reads.primary(
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

    try:
        row, _shard = await request.app[READS].primary(
            slot, "get_transfer", fetch, request_deadline(request, READ_DEADLINE_S)
        )
    except RouteOutcome as out:
        raise from_outcome(out) from out
    if row is None or ids.account_slot(row.source) != slot:
        raise NotFound("no such transfer")
    return json_response(request, render.transfer(row), versions=[], served_by="primary")
