"""txclient's call loop against a small local aiohttp server that answers with exactly the
documented shapes (API.md; router/openapi.yaml): retries with the same key, Retry-After, the
deadline, the retry budget, region failover, hedged reads, headers, and ``transfer_batch``
(``POST /v1/transfers/batch``, API.md "Batches of transfers"), for both clients.

The batch endpoint is built on another branch; these tests pin the client to the contract, and
the real-cluster test comes with the merge. Everything else is also tested against the real
cluster (tests/integration/test_txclient.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from txclient import AsyncClient, Client, RetryBudget, Transfer, errors

ACC_A = "acc_001000000000001"
ACC_B = "acc_001000000000002"


def transfer_doc(
    tid: str | None = None, amount: int = 5, status: str = "settled"
) -> dict[str, Any]:
    return {
        "id": tid or "tr_" + uuid.uuid4().hex + "abc",
        "source": ACC_A,
        "destination": ACC_B,
        "amount": amount,
        "currency": "EUR",
        "status": status,
        "created_at": "2026-12-01T08:00:00Z",
        "reference": None,
        "refusal_code": None,
    }


def problem(status: int, code: str) -> dict[str, Any]:
    return {
        "type": f"https://txrouter.dev/problems/{code}",
        "title": code,
        "status": status,
        "detail": f"a {code}",
        "code": code,
    }


def account_doc(version: int = 1) -> dict[str, Any]:
    return {
        "id": ACC_A,
        "currency": "EUR",
        "balance": 10,
        "overdraft_limit": 0,
        "home_region": "eu-west",
        "shard": "eu-west-1",
        "version": version,
        "metadata": {},
        "created_at": "2026-12-01T08:00:00Z",
    }


Handler = Callable[[web.Request, dict[str, Any] | None], Any]


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: Any
    at: float


@dataclass
class Fake:
    """One region's router: every request is recorded, then answered by ``handler``."""

    name: str
    handler: Handler | None = None
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.json_response({"status": "ok"})
        body = await request.json() if request.can_read_body else None
        self.seen.append(
            Seen(request.method, request.path, request.headers.copy(), body, time.monotonic())
        )
        assert self.handler is not None
        out = await self.handler(request, body)
        assert isinstance(out, web.StreamResponse)
        out.headers["X-Request-Id"] = request.headers.get("X-Request-Id", "none")
        out.headers["X-Served-By"] = f"{self.name}/primary"
        return out


def reply(status: int, doc: Any, **headers: str) -> web.Response:
    ctype = "application/problem+json" if status >= 400 else "application/json"
    return web.json_response(doc, status=status, headers=headers, content_type=ctype)


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, Fake]]:
    out = {}
    for name in ("eu-west", "us-east"):
        f = Fake(name)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", f.handle)
        f.server = TestServer(app)
        await f.server.start_server()
        out[name] = f
    yield out
    for f in out.values():
        assert f.server is not None
        await f.server.close()


def clients(fakes: dict[str, Fake], **kw: Any) -> dict[str, Any]:
    return {name: f.url for name, f in fakes.items()} | kw


def sequence(*answers: Callable[[], web.StreamResponse]) -> Handler:
    """Answer the n-th request with the n-th answer (the last one repeats)."""
    n = 0

    async def handler(_req: web.Request, _body: Any) -> web.StreamResponse:
        nonlocal n
        ans = answers[min(n, len(answers) - 1)]
        n += 1
        return ans()

    return handler


async def with_sync(fn: Callable[[], Any]) -> Any:
    """Run a sync client in a thread while the fake servers run on this loop."""
    return await asyncio.to_thread(fn)


# -- retries with one key ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_504_and_503_are_retried_with_the_same_key(fakes: dict[str, Fake], kind: str) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(
        lambda: reply(504, problem(504, "outcome_unknown")),
        lambda: reply(503, problem(503, "region_unavailable"), **{"Retry-After": "0"}),
        lambda: reply(201, transfer_doc("tr_" + "0" * 35), **{"Idempotent-Replayed": "true"}),
    )
    fakes["us-east"].handler = eu.handler  # after the 503 the client moves region
    args: dict[str, Any] = {"source": ACC_A, "destination": ACC_B, "amount": 5, "currency": "EUR"}
    endpoints = {"eu-west": eu.url, "us-east": fakes["us-east"].url}
    if kind == "sync":

        def go() -> Transfer:
            with Client(endpoints, "tok", prefer="eu-west", probe=False) as c:
                return c.transfer(**args)

        t = await with_sync(go)
    else:
        async with AsyncClient(endpoints, "tok", prefer="eu-west", probe=False) as ac:
            t = await ac.transfer(**args)
    assert t.id == "tr_" + "0" * 35
    assert t.replayed
    assert t.meta.attempts == 3
    seen = eu.seen + fakes["us-east"].seen
    keys = {s.headers["Idempotency-Key"] for s in seen}
    assert len(keys) == 1
    uuid.UUID(keys.pop())  # generated: a uuid4
    assert [s.headers["Authorization"] for s in seen] == ["Bearer tok"] * 3
    # One request id per call, one suffix per attempt.
    rids = [s.headers["X-Request-Id"] for s in sorted(seen, key=lambda s: s.at)]
    assert len({r.rsplit(".", 1)[0] for r in rids}) == 1
    assert [r.rsplit(".", 1)[1] for r in rids] == ["1", "2", "3"]
    assert [s.body for s in seen] == [{**args}] * 3
    # The 503 moved the client: the third attempt went to us-east.
    assert t.meta.region == "us-east"
    assert len(fakes["us-east"].seen) == 1


async def test_a_refusal_is_final_and_typed(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(lambda: reply(422, problem(422, "insufficient_funds")))
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        with pytest.raises(errors.InsufficientFunds) as info:
            await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR")
    assert info.value.status == 422
    assert info.value.code == "insufficient_funds"
    assert info.value.request_id == eu.seen[0].headers["X-Request-Id"]
    assert len(eu.seen) == 1


async def test_retry_after_is_honoured(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(
        lambda: reply(429, problem(429, "rate_limited"), **{"Retry-After": "1"}),
        lambda: reply(201, transfer_doc()),
    )
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR")
    assert eu.seen[1].at - eu.seen[0].at >= 1.0


async def test_rate_limited_past_the_deadline_raises_rate_limited(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(lambda: reply(429, problem(429, "rate_limited"), **{"Retry-After": "5"}))
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False, timeout=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.RateLimited) as info:
            await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR")
    assert time.monotonic() - t0 < 0.5, "a wait past the deadline is not started"
    assert info.value.retry_after == 5.0
    assert len(eu.seen) == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_unknown_at_the_deadline_carries_the_key(fakes: dict[str, Fake], kind: str) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(lambda: reply(504, problem(504, "outcome_unknown")))
    args: dict[str, Any] = {
        "source": ACC_A,
        "destination": ACC_B,
        "amount": 5,
        "currency": "EUR",
        "timeout": 0.6,
    }
    if kind == "sync":

        def go() -> errors.OutcomeUnknown:
            with Client({"eu-west": eu.url}, "tok", probe=False) as c:
                with pytest.raises(errors.OutcomeUnknown) as info:
                    c.transfer(**args, idempotency_key="order-1")
                return info.value

        exc = await with_sync(go)
    else:
        async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as ac:
            with pytest.raises(errors.OutcomeUnknown) as info:
                await ac.transfer(**args, idempotency_key="order-1")
            exc = info.value
    assert exc.idempotency_key == "order-1"
    assert exc.status == 504
    assert len(eu.seen) >= 2
    assert {s.headers["Idempotency-Key"] for s in eu.seen} == {"order-1"}
    # The deadline is sent, and shrinks attempt by attempt.
    budgets = [int(s.headers["Request-Timeout"]) for s in eu.seen]
    assert budgets[0] <= 600
    assert budgets == sorted(budgets, reverse=True)


async def test_a_slow_router_is_abandoned_at_the_deadline(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]

    async def slow(_req: web.Request, _body: Any) -> web.StreamResponse:
        await asyncio.sleep(3)
        return reply(201, transfer_doc())

    eu.handler = slow
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.OutcomeUnknown) as info:
            await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR", timeout=0.5)
        assert 0.5 <= time.monotonic() - t0 < 0.8
        assert info.value.idempotency_key is not None
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await c.get_transfer("tr_x", timeout=0.3)
        assert time.monotonic() - t0 < 0.6


async def test_an_account_open_is_not_retried_when_it_may_have_happened(
    fakes: dict[str, Fake],
) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(
        lambda: reply(503, problem(503, "region_unavailable"), **{"Retry-After": "0"}),
        lambda: reply(504, problem(504, "outcome_unknown")),
        lambda: reply(201, account_doc()),
    )
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        with pytest.raises(errors.OutcomeUnknown) as info:
            await c.create_account("EUR", home_region="eu-west")
    assert info.value.idempotency_key is None
    assert len(eu.seen) == 2, "the 503 (not started) is retried; the 504 is not"
    assert "Idempotency-Key" not in eu.seen[0].headers
    assert eu.seen[0].body == {"currency": "EUR", "overdraft_limit": 0, "home_region": "eu-west"}


async def test_the_budget_stops_a_storm(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(
        lambda: reply(503, problem(503, "region_unavailable"), **{"Retry-After": "0"})
    )
    budget = RetryBudget(tokens_max=5, refill_per_s=0, success_credit=0)
    async with AsyncClient(
        {"eu-west": eu.url}, "tok", probe=False, budget=budget, timeout=10.0
    ) as c:
        calls = [c.get_account(ACC_A) for _ in range(30)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, errors.RegionUnavailable) for o in outcomes), [
        o for o in outcomes if not isinstance(o, errors.RegionUnavailable)
    ]
    # Counted on the client: an attempt lost on a connection the server had just closed (a
    # loaded machine) is an attempt all the same.
    attempts = sum(o.attempts for o in outcomes if isinstance(o, errors.TxError))
    assert attempts == 30 + 5, "each call once, and only the budget's five retries"
    assert len(eu.seen) <= attempts


# -- sessions, headers ---------------------------------------------------------------------------


async def test_the_newest_token_is_sent_on_every_call(fakes: dict[str, Fake]) -> None:
    from consistency import tokens

    eu, us = fakes["eu-west"], fakes["us-east"]
    t1 = tokens.encode({}, [(1, 5)])
    t2 = tokens.encode({}, [(2, 7)])
    eu.handler = sequence(lambda: reply(200, account_doc(5), **{"X-Consistency-Token": t1}))
    us.handler = sequence(lambda: reply(200, account_doc(7), **{"X-Consistency-Token": t2}))
    async with AsyncClient(clients(fakes), "tok", prefer="eu-west", probe=False) as c:
        a = await c.get_account(ACC_A)
        assert a.version == 5
        assert a.meta.consistency_token == t1
        assert eu.seen[0].path == f"/v1/accounts/{ACC_A}"
    async with AsyncClient(
        clients(fakes), "tok", prefer="us-east", probe=False, session_token=c.consistency_token
    ) as c2:
        await c2.get_account(ACC_A, consistency="strong")
        assert tokens.decode(us.seen[0].headers["X-Consistency-Token"]) == {1: 5}
        await c2.get_account(ACC_A)
        # Both regions' versions, merged.
        assert tokens.decode(us.seen[1].headers["X-Consistency-Token"]) == {2: 7, 1: 5}


async def test_reads_send_the_consistency_level(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    levels: list[str] = []

    async def handler(req: web.Request, _body: Any) -> web.StreamResponse:
        levels.append(req.query["consistency"])
        return reply(200, account_doc())

    eu.handler = handler
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        for level in ("session", "strong", "cached"):
            await c.get_account(ACC_A, consistency=level)  # type: ignore[arg-type]
        await c.get_account(ACC_A)
        with pytest.raises(ValueError, match="consistency"):
            await c.get_account(ACC_A, consistency="eventual")  # type: ignore[arg-type]
    assert levels == ["session", "strong", "cached", "session"]


async def test_traceparent_is_sent_when_opentelemetry_is_configured(
    fakes: dict[str, Fake],
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    eu = fakes["eu-west"]
    eu.handler = sequence(lambda: reply(200, account_doc()))
    tracer = TracerProvider().get_tracer("test")
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        await c.get_account(ACC_A)
        with tracer.start_as_current_span("checkout") as span:
            await c.get_account(ACC_A)
    assert "traceparent" not in eu.seen[0].headers, "no span, no header"
    tp = eu.seen[1].headers["traceparent"]
    assert tp.split("-")[1] == format(span.get_span_context().trace_id, "032x")


async def test_retries_are_logged_at_debug_without_the_token(
    fakes: dict[str, Fake], caplog: pytest.LogCaptureFixture
) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(
        lambda: reply(504, problem(504, "outcome_unknown")), lambda: reply(201, transfer_doc())
    )
    caplog.set_level(logging.DEBUG, logger="txclient")
    async with AsyncClient({"eu-west": eu.url}, "secret-token", probe=False) as c:
        await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR")
    lines = [r.getMessage() for r in caplog.records if r.name == "txclient"]
    assert any("retry 1 of POST /v1/transfers after 504 outcome_unknown" in m for m in lines)
    assert not any("secret-token" in m for m in lines)


# -- regions and hedging ------------------------------------------------------------------------


async def test_the_first_choice_is_the_lowest_rtt(fakes: dict[str, Fake]) -> None:
    eu, us = fakes["eu-west"], fakes["us-east"]
    eu.handler = us.handler = sequence(lambda: reply(200, account_doc()))
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port of loopback
    async with AsyncClient({"dead": dead, "eu-west": eu.url}, "tok") as c:
        assert c.region == "eu-west", "the unreachable region is down from the first probe"
        assert c.rtt_s("eu-west") is not None
        assert c.rtt_s("dead") is None
        await c.get_account(ACC_A)
    assert len(eu.seen) == 1


async def test_connection_refused_moves_to_the_next_region(fakes: dict[str, Fake]) -> None:
    us = fakes["us-east"]
    us.handler = sequence(lambda: reply(201, transfer_doc()))
    endpoints = {"eu-west": "http://127.0.0.1:9", "us-east": us.url}
    async with AsyncClient(endpoints, "tok", prefer="eu-west", probe=False) as c:
        t = await c.transfer(source=ACC_A, destination=ACC_B, amount=5, currency="EUR")
        assert t.meta.region == "us-east"
        assert t.meta.attempts == 2
        assert c.region == "us-east"
    assert not t.replayed


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_slow_cached_read_is_hedged(fakes: dict[str, Fake], kind: str) -> None:
    eu, us = fakes["eu-west"], fakes["us-east"]

    async def slow(_req: web.Request, _body: Any) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return reply(200, account_doc(1))

    eu.handler = slow
    us.handler = sequence(lambda: reply(200, account_doc(2)))
    endpoints = clients(fakes)
    if kind == "sync":

        def go() -> tuple[int, int, float]:
            with Client(endpoints, "tok", prefer="eu-west", probe=False, hedge=True) as c:
                t0 = time.monotonic()
                a = c.get_account(ACC_A, consistency="cached")
                took = time.monotonic() - t0
                b = c.get_account(ACC_A, consistency="strong")  # never hedged
                return a.version, b.version, took

        got, strong, took = await with_sync(go)
    else:
        async with AsyncClient(endpoints, "tok", prefer="eu-west", probe=False, hedge=True) as c:
            t0 = time.monotonic()
            got = (await c.get_account(ACC_A, consistency="cached")).version
            took = time.monotonic() - t0
            strong = (await c.get_account(ACC_A, consistency="strong")).version
    assert got == 2, "the second region answered first"
    assert took < 0.5
    assert strong == 1
    assert [s.path for s in us.seen] == [f"/v1/accounts/{ACC_A}"]


# -- entries ------------------------------------------------------------------------------------


async def test_entries_iterate_every_page(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    pages = {None: ("c1", [3, 2]), "c1": ("c2", [1]), "c2": (None, [])}

    async def handler(req: web.Request, _body: Any) -> web.StreamResponse:
        nxt, seqs = pages[req.query.get("cursor")]
        data = [
            {
                "account": ACC_A,
                "counterparty": ACC_B,
                "seq": s + 1,
                "transfer_id": "tr_" + "1" * 35,
                "amount": s,
                "balance_after": s,
                "created_at": "2026-12-01T08:00:00Z",
            }
            for s in seqs
        ]
        assert req.query["limit"] == "2"
        return reply(200, {"data": data, "next_cursor": nxt})

    eu.handler = handler
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        got = [e.amount async for e in c.entries(ACC_A, page_size=2)]
    assert got == [3, 2, 1]

    def sync_go() -> list[int]:
        with Client({"eu-west": eu.url}, "tok", probe=False) as sc:
            return [e.amount for e in sc.entries(ACC_A, page_size=2)]

    assert await with_sync(sync_go) == [3, 2, 1]


# -- batches --------------------------------------------------------------------------------------


def batch_server(fake: Fake, per_key: dict[str, list[dict[str, Any]]]) -> None:
    """Answers each item by its key: the n-th time a key is seen, its n-th scripted result."""
    count: dict[str, int] = {}

    async def handler(req: web.Request, body: Any) -> web.StreamResponse:
        assert req.path == "/v1/transfers/batch"
        assert "Idempotency-Key" not in req.headers, "keys travel per item"
        results = []
        for item in body["transfers"]:
            key = item["idempotency_key"]
            script = per_key.get(key) or per_key["*"]
            n = count.get(key, 0)
            count[key] = n + 1
            results.append(script[min(n, len(script) - 1)])
        return reply(200, {"results": results})

    fake.handler = handler


def ok(amount: int, replayed: bool = False) -> dict[str, Any]:
    return {"status": 201, "transfer": transfer_doc(amount=amount), "replayed": replayed}


def bad(status: int, code: str) -> dict[str, Any]:
    return {"status": status, "error": problem(status, code)}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_batch_has_one_result_per_item_in_order(fakes: dict[str, Fake], kind: str) -> None:
    eu = fakes["eu-west"]
    batch_server(
        eu,
        {
            "k-ok": [ok(1)],
            "k-funds": [bad(422, "insufficient_funds")],
            "k-reused": [bad(409, "idempotency_key_reused")],
            "k-unknown": [bad(504, "outcome_unknown"), ok(4, replayed=True)],
            "k-busy": [bad(503, "region_unavailable"), ok(5)],
            "*": [ok(6)],
        },
    )
    items = [
        {
            "source": ACC_A,
            "destination": ACC_B,
            "amount": n,
            "currency": "EUR",
            "idempotency_key": k,
        }
        for n, k in enumerate(["k-ok", "k-funds", "k-reused", "k-unknown", "k-busy"], start=1)
    ]
    items.append({"source": ACC_A, "destination": ACC_B, "amount": 6, "currency": "EUR"})
    if kind == "sync":

        def go() -> list[Any]:
            with Client({"eu-west": eu.url}, "tok", probe=False) as c:
                return c.transfer_batch(items)

        res = await with_sync(go)
    else:
        async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as ac:
            res = await ac.transfer_batch(items)
    assert len(res) == 6
    assert isinstance(res[0], Transfer)
    assert res[0].amount == 1
    assert not res[0].replayed
    assert isinstance(res[1], errors.InsufficientFunds)
    assert isinstance(res[2], errors.IdempotencyKeyReused)
    assert isinstance(res[3], Transfer)
    assert res[3].replayed
    assert isinstance(res[4], Transfer)
    assert isinstance(res[5], Transfer)
    # Round 1 sent all six (the last with a generated key); round 2 only the two to retry.
    assert len(eu.seen) == 2
    first, second = (s.body["transfers"] for s in eu.seen)
    assert [i["idempotency_key"] for i in first][:5] == [i["idempotency_key"] for i in items[:5]]
    uuid.UUID(first[5]["idempotency_key"])
    assert [i["idempotency_key"] for i in second] == ["k-unknown", "k-busy"]
    assert second[0] == first[3]


async def test_an_item_still_unknown_at_the_deadline_carries_its_key(
    fakes: dict[str, Fake],
) -> None:
    eu = fakes["eu-west"]
    batch_server(eu, {"k-1": [ok(1)], "*": [bad(504, "outcome_unknown")]})
    items = [
        {
            "source": ACC_A,
            "destination": ACC_B,
            "amount": 1,
            "currency": "EUR",
            "idempotency_key": "k-1",
        },
        {
            "source": ACC_A,
            "destination": ACC_B,
            "amount": 2,
            "currency": "EUR",
            "idempotency_key": "k-2",
        },
    ]
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        res = await c.transfer_batch(items, timeout=0.5)
    assert isinstance(res[0], Transfer)
    assert isinstance(res[1], errors.OutcomeUnknown)
    assert res[1].idempotency_key == "k-2"
    assert len(eu.seen) >= 2


async def test_a_whole_batch_lost_in_transit_is_resent_with_the_same_keys(
    fakes: dict[str, Fake],
) -> None:
    eu = fakes["eu-west"]
    batch_server(eu, {"*": [ok(1)]})
    inner = eu.handler
    assert inner is not None
    n = 0

    async def flaky(req: web.Request, body: Any) -> web.StreamResponse:
        nonlocal n
        n += 1
        if n == 1:
            return reply(504, problem(504, "outcome_unknown"))
        out: web.StreamResponse = await inner(req, body)
        return out

    eu.handler = flaky
    items = [{"source": ACC_A, "destination": ACC_B, "amount": 1, "currency": "EUR"}] * 3
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        res = await c.transfer_batch(items)
    assert all(isinstance(r, Transfer) for r in res)
    assert eu.seen[0].body == eu.seen[1].body
    assert len({i["idempotency_key"] for i in eu.seen[0].body["transfers"]}) == 3


async def test_a_malformed_batch_is_refused_whole(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    eu.handler = sequence(lambda: reply(422, problem(422, "invalid_request")))
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        with pytest.raises(errors.InvalidRequest):
            await c.transfer_batch(
                [{"source": ACC_A, "destination": ACC_B, "amount": 0, "currency": "EUR"}]
            )
        with pytest.raises(ValueError, match="unknown fields"):
            await c.transfer_batch([{"src": ACC_A}])
    assert len(eu.seen) == 1


async def test_a_long_batch_is_split_in_requests_of_the_maximum(fakes: dict[str, Fake]) -> None:
    eu = fakes["eu-west"]
    batch_server(eu, {"*": [ok(1)]})
    items = [{"source": ACC_A, "destination": ACC_B, "amount": 1, "currency": "EUR"}] * 2001
    async with AsyncClient({"eu-west": eu.url}, "tok", probe=False) as c:
        res = await c.transfer_batch(items)
    assert len(res) == 2001
    assert [len(s.body["transfers"]) for s in eu.seen] == [1000, 1000, 1]
