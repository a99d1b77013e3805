"""``Client``: the synchronous client (httpx.Client). Thread-safe: one client may serve many
threads, and it is one session for all of them."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
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

_R = TypeVar("_R")
_T = TypeVar("_T")


class Client(_calls.Facade):
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
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(
            limits=_calls.pool_limits(),
            transport=transport,
            follow_redirects=False,
            verify=ssl_context(),
        )
        self._closed = threading.Event()
        self._hedge_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hedge_lock = threading.Lock()
        self._prober: threading.Thread | None = None
        if probe:
            first_round = threading.Event()
            self._prober = threading.Thread(
                target=self._probe_loop, args=(first_round,), name="txclient-probe", daemon=True
            )
            self._prober.start()
            if prefer is None:
                # The first choice should be measured; a dead region must not hold us up long.
                first_round.wait(limits.PROBE_TIMEOUT_S + 0.5)

    # -- the API ------------------------------------------------------------------------------

    def create_account(
        self,
        currency: str,
        *,
        home_region: str | None = None,
        overdraft_limit: int = 0,
        metadata: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Account:
        return self._run(
            _calls.create_account(
                self._core, currency, home_region, overdraft_limit, metadata, timeout
            )
        )

    def get_account(
        self,
        account_id: str,
        *,
        consistency: Consistency = "session",
        timeout: float | None = None,
        hedge: bool | None = None,
    ) -> Account:
        return self._run(_calls.get_account(self._core, account_id, consistency, timeout, hedge))

    def entries(
        self,
        account_id: str,
        *,
        page_size: int = limits.ENTRIES_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> Iterator[Entry]:
        """Every entry of the account, newest first, page after page (each page one call)."""
        cursor: str | None = None
        for _ in range(limits.ENTRIES_PAGES_MAX):
            page = self._run(
                _calls.entries_page(self._core, account_id, page_size, cursor, timeout)
            )
            yield from page.data
            cursor = page.next_cursor
            if cursor is None:
                return

    def transfer(
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
        return self._run(
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

    def transfer_batch(
        self, items: Sequence[Mapping[str, Any]], *, timeout: float | None = None
    ) -> list[BatchResult]:
        """One result per item, in order: the ``Transfer``, or the ``TxError`` it met."""
        result: list[BatchResult] = self._run(batch_plan(self._core, batch_items(items), timeout))
        return result

    def get_transfer(self, transfer_id: str, *, timeout: float | None = None) -> Transfer:
        return self._run(_calls.get_transfer(self._core, transfer_id, timeout))

    # -- events and webhooks (API.md "Events and webhooks") ----------------------------------

    def events_page(
        self,
        after: str | None = None,
        *,
        limit: int = limits.EVENTS_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> EventsPage:
        """One page of the tenant's events after the cursor ``after`` (None: from the start)."""
        return self._run(_calls.events_page(self._core, after, limit, timeout))

    def events(
        self,
        after: str | None = None,
        *,
        page_size: int = limits.EVENTS_PAGE_DEFAULT,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """Every event after ``after`` stored so far, in stream order, each once."""
        cursor = after
        for _ in range(limits.ENTRIES_PAGES_MAX):
            page = self.events_page(cursor, limit=page_size, timeout=timeout)
            yield from page.data
            cursor = page.next_cursor
            if not page.has_more:
                return

    def create_webhook(
        self, url: str, events: Sequence[str], *, timeout: float | None = None
    ) -> Webhook:
        """Register an endpoint; the answer carries its signing secret (shown only here)."""
        return self._run(_calls.create_webhook(self._core, url, events, timeout))

    def webhooks(self, *, timeout: float | None = None) -> list[Webhook]:
        return self._run(_calls.webhooks(self._core, timeout))

    def delete_webhook(self, webhook_id: str, *, timeout: float | None = None) -> None:
        self._run(_calls.delete_webhook(self._core, webhook_id, timeout))

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        if self._prober is not None:
            self._prober.join(limits.PROBE_TIMEOUT_S * 2)
        if self._hedge_pool is not None:
            self._hedge_pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the call loop ----------------------------------------------------------------------------

    def _send(self, op: Op, first_region: str | None = None) -> Answer:
        core = self._core
        st = core.start(op)
        region = first_region
        while True:
            region = region or core.selector.best()
            url, headers, remaining = core.request(st, region)
            t0 = time.perf_counter()
            try:
                resp = self._http.request(
                    op.method,
                    url,
                    json=op.json,
                    params=op.params,
                    headers=headers,
                    timeout=core.timeouts(remaining),
                )
            except httpx.TransportError as exc:
                wait = core.on_transport_error(st, region, exc)
            else:
                got = core.on_response(st, region, resp, time.perf_counter() - t0)
                if isinstance(got, Answer):
                    return got
                wait = got
            time.sleep(wait)
            region = None

    def _run(self, plan: Call[_T]) -> _T:
        """Run a plan (``_calls``, ``_core.batch_plan``): its sleeps, and each request it yields,
        hedged when the request says it may be."""
        step = next(plan)
        while True:
            try:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = plan.send(None)
                    continue
                try:
                    ans = self._hedged(step) if step.hedge else self._send(step)
                except errors.TxError as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(ans)
            except StopIteration as stop:
                # The plan's return value: a ``_T`` by its type.
                result: _T = stop.value
                return result

    def _hedged(self, op: Op) -> Answer:
        regions = self._core.hedge_regions()
        if len(regions) < 2:
            return self._send(op)
        with self._hedge_lock:
            if self._hedge_pool is None:
                self._hedge_pool = concurrent.futures.ThreadPoolExecutor(
                    limits.HEDGE_THREADS_MAX, thread_name_prefix="txclient-hedge"
                )
            pool = self._hedge_pool
        first = pool.submit(self._send, op, regions[0])
        try:
            return first.result(timeout=self._core.hedge_delay_s())
        except concurrent.futures.TimeoutError:
            pass
        second = pool.submit(self._send, op, regions[1])
        return _first_success([first, second])

    # -- probes -------------------------------------------------------------------------------

    def _probe_loop(self, first_round: threading.Event) -> None:
        with httpx.Client(
            timeout=limits.PROBE_TIMEOUT_S, follow_redirects=False, verify=ssl_context()
        ) as http:
            while not self._closed.is_set():
                for region in self._core.selector.names:
                    self._core.on_probe(region, _probe(http, self._core.selector.url(region)))
                first_round.set()
                self._closed.wait(limits.PROBE_INTERVAL_S)


def _probe(http: httpx.Client, url: str) -> float | None:
    t0 = time.perf_counter()
    try:
        resp = http.get(url + "/healthz")
    except httpx.TimeoutException:
        # Slow is not down (a loaded router, a loaded client): a sample at the bound, which
        # moves an unpinned client elsewhere through the EWMA, not at once.
        return limits.PROBE_TIMEOUT_S
    except httpx.HTTPError:
        return None
    return time.perf_counter() - t0 if resp.status_code == 200 else None


def _first_success(futures: list[concurrent.futures.Future[_R]]) -> _R:
    """The first future to succeed; if all fail, the first one's error."""
    pending = set(futures)
    while pending:
        done, pending = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for f in done:
            if f.exception() is None:
                for other in pending:
                    other.cancel()
                return f.result()
    return futures[0].result()
