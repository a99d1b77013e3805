"""``AsyncClient``: the asyncio client (httpx.AsyncClient), the same methods as ``Client`` as
coroutines. One client is one session for every task that uses it; it must be used from one
event loop (the one it first ran in)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from txclient import _calls, errors, limits
from txclient._calls import Call
from txclient._core import (
    Answer,
    BatchResult,
    Consistency,
    Op,
    Sleep,
    batch_items,
    batch_plan,
    ssl_context,
)
from txclient.models import Account, Entry, Event, EventsPage, Transfer, Webhook
from txclient.retry import Backoff, RetryBudget
from txclient.session import Session

_T = TypeVar("_T")


class AsyncClient(_calls.Facade):
    """One session against a txrouter deployment (see the package docstring).

    ``endpoints``: region -> router base URL. ``token``: the bearer JWT. ``prefer``: pin a
    region (it is left only while it does not answer); else the lowest measured RTT.
    ``timeout``: each call's deadline in seconds (every method also takes ``timeout=``), sent
    as ``Request-Timeout``. ``hedge``: hedge ``cached`` reads to the second-best region.
    ``probe``: measure RTT with ``GET /healthz`` at start and in the background.
    ``session``/``session_token``: continue a session (share one ``Session`` between clients,
    or start from a token). ``budget``/``backoff``: the retry policy (defaults in
    ``txclient.limits``). ``transport``: an httpx transport (tests, proxies, mounts).
    """

    def __init__(
        self,
        endpoints: Mapping[str, str],
        token: str,
        *,
        prefer: str | None = None,
        timeout: float = limits.CALL_TIMEOUT_S_DEFAULT,
        hedge: bool = False,
        probe: bool = True,
        session_token: str | None = None,
        session: Session | None = None,
        budget: RetryBudget | None = None,
        backoff: Backoff | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            endpoints,
            token,
            prefer=prefer,
            timeout=timeout,
            hedge=hedge,
            session_token=session_token,
            session=session,
            budget=budget,
            backoff=backoff,
        )
        self._http = httpx.AsyncClient(
            limits=_calls.pool_limits(),
            transport=transport,
            follow_redirects=False,
            verify=ssl_context(),
        )
        self._probe = probe
        self._started = False
        self._prober: asyncio.Task[None] | None = None
        self._closed = False

    # -- the API ------------------------------------------------------------------------------

    async def create_account(
        self,
        currency: str,
        *,
        home_region: str | None = None,
        overdraft_limit: int = 0,
        metadata: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Account:
        return await self._run(
            _calls.create_account(
                self._core, currency, home_region, overdraft_limit, metadata, timeout
            )
        )

    async def get_account(
        self,
        account_id: str,
        *,
        consistency: Consistency = "session",
        timeout: float | None = None,
        hedge: bool | None = None,
    ) -> Account:
        return await self._run(
            _calls.get_account(self._core, account_id, consistency, timeout, hedge)
        )

    async def entries(
        self,
        account_id: str,
        *,
        page_size: int = limits.ENTRIES_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> AsyncIterator[Entry]:
        """Every entry of the account, newest first (``async for``), one call per page."""
        cursor: str | None = None
        for _ in range(limits.ENTRIES_PAGES_MAX):
            page = await self._run(
                _calls.entries_page(self._core, account_id, page_size, cursor, timeout)
            )
            for entry in page.data:
                yield entry
            cursor = page.next_cursor
            if cursor is None:
                return

    async def transfer(
        self,
        *,
        source: str,
        destination: str,
        amount: int,
        currency: str,
        reference: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Transfer:
        return await self._run(
            _calls.transfer(
                self._core,
                source,
                destination,
                amount,
                currency,
                reference,
                idempotency_key,
                timeout,
            )
        )

    async def transfer_batch(
        self, items: Sequence[Mapping[str, Any]], *, timeout: float | None = None
    ) -> list[BatchResult]:
        """One result per item, in order: the ``Transfer``, or the ``TxError`` it met."""
        result: list[BatchResult] = await self._run(
            batch_plan(self._core, batch_items(items), timeout)
        )
        return result

    async def get_transfer(self, transfer_id: str, *, timeout: float | None = None) -> Transfer:
        return await self._run(_calls.get_transfer(self._core, transfer_id, timeout))

    # -- events and webhooks (API.md "Events and webhooks") ----------------------------------

    async def events_page(
        self,
        after: str | None = None,
        *,
        limit: int = limits.EVENTS_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> EventsPage:
        """One page of the tenant's events after the cursor ``after`` (None: from the start)."""
        return await self._run(_calls.events_page(self._core, after, limit, timeout))

    async def events(
        self,
        after: str | None = None,
        *,
        page_size: int = limits.EVENTS_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Every event after ``after`` stored so far, in stream order, each once."""
        cursor = after
        for _ in range(limits.ENTRIES_PAGES_MAX):
            page = await self.events_page(cursor, limit=page_size, timeout=timeout)
            for ev in page.data:
                yield ev
            cursor = page.next_cursor
            if not page.has_more:
                return

    async def create_webhook(
        self, url: str, events: Sequence[str], *, timeout: float | None = None
    ) -> Webhook:
        """Register an endpoint; the answer carries its signing secret (shown only here)."""
        return await self._run(_calls.create_webhook(self._core, url, events, timeout))

    async def webhooks(self, *, timeout: float | None = None) -> list[Webhook]:
        return await self._run(_calls.webhooks(self._core, timeout))

    async def delete_webhook(self, webhook_id: str, *, timeout: float | None = None) -> None:
        await self._run(_calls.delete_webhook(self._core, webhook_id, timeout))

    # -- lifecycle ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _start(self) -> None:
        """Probe once (unless a region is pinned: then in the background only) and start the
        background probe. Runs at the first call or on ``async with``."""
        if self._started or not self._probe or self._closed:
            self._started = True
            return
        self._started = True
        if self._core.selector.prefer is None:
            await self._probe_round()
        self._prober = asyncio.create_task(self._probe_loop(), name="txclient-probe")

    # -- the call loop ----------------------------------------------------------------------------

    async def _send(self, op: Op, first_region: str | None = None) -> Answer:
        if not self._started:
            await self._start()
        core = self._core
        st = core.start(op)
        region = first_region
        while True:
            region = region or core.selector.best()
            url, headers, remaining = core.request(st, region)
            t0 = time.perf_counter()
            try:
                # httpx bounds each phase; this bounds the whole attempt by the deadline.
                async with asyncio.timeout(remaining):
                    resp = await self._http.request(
                        op.method,
                        url,
                        json=op.json,
                        params=op.params,
                        headers=headers,
                        timeout=core.timeouts(remaining),
                    )
            except httpx.TransportError as exc:
                wait = core.on_transport_error(st, region, exc)
            except TimeoutError:
                wait = core.on_transport_error(
                    st, region, httpx.ReadTimeout("the call's deadline passed")
                )
            else:
                got = core.on_response(st, region, resp, time.perf_counter() - t0)
                if isinstance(got, Answer):
                    return got
                wait = got
            await asyncio.sleep(wait)
            region = None

    async def _run(self, plan: Call[_T]) -> _T:
        """Run a plan (``_calls``, ``_core.batch_plan``): its sleeps, and each request it yields,
        hedged when the request says it may be."""
        step = next(plan)
        while True:
            try:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = plan.send(None)
                    continue
                try:
                    ans = await (self._hedged(step) if step.hedge else self._send(step))
                except errors.TxError as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(ans)
            except StopIteration as stop:
                # The plan's return value: a ``_T`` by its type.
                result: _T = stop.value
                return result

    async def _hedged(self, op: Op) -> Answer:
        regions = self._core.hedge_regions()
        if len(regions) < 2:
            return await self._send(op)
        first = asyncio.create_task(self._send(op, regions[0]))
        done, _ = await asyncio.wait({first}, timeout=self._core.hedge_delay_s())
        if done:
            return first.result()
        second = asyncio.create_task(self._send(op, regions[1]))
        tasks = [first, second]
        pending: set[asyncio.Task[Answer]] = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None:
                        return t.result()
            return first.result()
        finally:
            for t in pending:
                t.cancel()
            for t in tasks:
                # Retrieve every exception so none is reported as never retrieved.
                if t.done() and not t.cancelled():
                    t.exception()

    # -- probes -------------------------------------------------------------------------------

    async def _probe_round(self) -> None:
        names = self._core.selector.names
        rtts = await asyncio.gather(*(self._probe_one(r) for r in names))
        for region, rtt in zip(names, rtts, strict=True):
            self._core.on_probe(region, rtt)

    async def _probe_one(self, region: str) -> float | None:
        t0 = time.perf_counter()
        try:
            resp = await self._http.get(
                self._core.selector.url(region) + "/healthz", timeout=limits.PROBE_TIMEOUT_S
            )
        except httpx.TimeoutException:
            # Slow is not down: a sample at the bound (see the sync client).
            return limits.PROBE_TIMEOUT_S
        except httpx.HTTPError:
            return None
        return time.perf_counter() - t0 if resp.status_code == 200 else None

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(limits.PROBE_INTERVAL_S)
            await self._probe_round()
