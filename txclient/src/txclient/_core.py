"""What the sync and async clients share: request building, answer decoding, the retry loop's
decisions and the plans of multi-request calls (batches). Only the I/O differs between the two
(``_sync.py``, ``_async.py``); every decision is taken here, once, and every public call's plan
(its request and how its answer maps to the result) in ``_calls``.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from txclient import errors, limits
from txclient.models import Meta, Transfer
from txclient.regions import RegionSelector
from txclient.retry import (
    MAYBE_SENT,
    NOT_SENT,
    TIMED_OUT,
    Backoff,
    Clock,
    RetryBudget,
    Verdict,
    parse_retry_after,
    verdict_for_status,
)
from txclient.session import Session

log = logging.getLogger("txclient")

VERSION = "0.1.0"
Consistency = Literal["strong", "session", "cached"]
CONSISTENCY_LEVELS: frozenset[str] = frozenset({"strong", "session", "cached"})
# read: retried freely. write: carries an idempotency key, retried with it. open: an account
# open has no key, so it is retried only when it surely did not start.
Kind = Literal["read", "write", "open"]

HEADER_TOKEN = "X-Consistency-Token"  # noqa: S105 - a header name, not a secret
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_SERVED_BY = "X-Served-By"
HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_REPLAYED = "Idempotent-Replayed"
HEADER_REQUEST_TIMEOUT = "Request-Timeout"
HEADER_RETRY_AFTER = "Retry-After"


def _otel_injector() -> Callable[[dict[str, str]], None] | None:
    """OpenTelemetry's propagator when the ``otel`` extra is installed: it writes
    ``traceparent`` only while a span is recording, so an unconfigured app sends nothing."""
    try:
        from opentelemetry import propagate  # optional dependency
    except ImportError:
        return None

    def inject(headers: dict[str, str]) -> None:
        propagate.inject(headers)

    return inject


_INJECT_TRACE = _otel_injector()


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context per process for every client: httpx otherwise builds one per client
    (loading the CA bundle: 20 ms on an idle machine, 0.7 s measured on a loaded one), which
    makes many short-lived clients slow. An SSLContext is safe to share between threads."""
    return httpx.create_ssl_context()


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Op:
    method: str
    path: str
    kind: Kind
    timeout_s: float
    json: Any = None
    params: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    # A cached read that may be hedged to the second-best region.
    hedge: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """A 2xx answer, decoded."""

    status: int
    body: Any
    headers: httpx.Headers
    meta: Meta


@dataclass(slots=True)
class CallState:
    op: Op
    deadline: float
    request_id: str
    attempts: int = 0
    retries: int = 0
    # Some attempt of this write may have been applied.
    unknown: bool = False
    last_error: errors.TxError | None = None
    budget_spent: bool = False
    regions: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step = Op | Sleep
# A plan yields the calls and sleeps it needs and is sent each call's answer (or thrown its
# error); both clients run the same plans.
Plan = Generator[Step, Answer | None, Any]


class Core:
    def __init__(
        self,
        *,
        endpoints: Mapping[str, str],
        token: str,
        prefer: str | None,
        timeout: float,
        hedge: bool,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        budget: RetryBudget | None = None,
        backoff: Backoff | None = None,
        session_token: str | None = None,
        session: Session | None = None,
    ) -> None:
        if timeout < limits.CALL_TIMEOUT_S_MIN:
            raise ValueError(f"timeout must be at least {limits.CALL_TIMEOUT_S_MIN} s")
        self.selector = RegionSelector(endpoints, prefer, clock=clock)
        if session is not None and session_token is not None:
            raise ValueError("give session or session_token, not both")
        self.session = session if session is not None else Session(session_token)
        self.clock = clock
        self.timeout_s = timeout
        self.hedge = hedge
        self.budget = budget or RetryBudget(clock=clock)
        self.backoff = backoff or Backoff(rng=rng)
        self._auth = f"Bearer {token}"
        self._latencies: deque[float] = deque(maxlen=limits.HEDGE_SAMPLES_MAX)
        # A sync client's threads record and read the latencies at once.
        self._latencies_lock = threading.Lock()

    # -- building ------------------------------------------------------------------------------

    def call_timeout(self, timeout: float | None) -> float:
        t = self.timeout_s if timeout is None else timeout
        if t < limits.CALL_TIMEOUT_S_MIN:
            raise ValueError(f"timeout must be at least {limits.CALL_TIMEOUT_S_MIN} s")
        return t

    def start(self, op: Op) -> CallState:
        return CallState(op, self.clock() + op.timeout_s, "txc-" + uuid.uuid4().hex[:24])

    def remaining_s(self, st: CallState) -> float:
        return st.deadline - self.clock()

    def request(self, st: CallState, region: str) -> tuple[str, dict[str, str], float]:
        """URL, headers and the attempt's timeout (the call's remaining time)."""
        remaining = max(self.remaining_s(st), limits.CALL_TIMEOUT_S_MIN)
        st.attempts += 1
        st.regions.append(region)
        headers = {
            "Authorization": self._auth,
            "Accept": "application/json",
            "User-Agent": f"txclient/{VERSION}",
            # One id per call, one suffix per attempt: the router's logs show the retries of
            # one call together, and each attempt apart.
            HEADER_REQUEST_ID: f"{st.request_id}.{st.attempts}",
            HEADER_REQUEST_TIMEOUT: str(max(1, int(remaining * 1000))),
        }
        token = self.session.token
        if token:
            headers[HEADER_TOKEN] = token
        if st.op.idempotency_key is not None:
            headers[HEADER_IDEMPOTENCY_KEY] = st.op.idempotency_key
        if _INJECT_TRACE is not None:
            _INJECT_TRACE(headers)
        return self.selector.url(region) + st.op.path, headers, remaining

    def timeouts(self, remaining_s: float) -> httpx.Timeout:
        # The connect phase is bounded on its own: a region that does not take the connection
        # within a second is skipped rather than allowed to eat the whole deadline.
        return httpx.Timeout(remaining_s, connect=min(remaining_s, limits.CONNECT_TIMEOUT_S_MAX))

    # -- answers -------------------------------------------------------------------------------

    def on_response(
        self, st: CallState, region: str, resp: httpx.Response, elapsed_s: float
    ) -> Answer | float:
        """The answer, or the seconds to sleep before the next attempt; raises when done."""
        status = resp.status_code
        rid = resp.headers.get(HEADER_REQUEST_ID)
        self.session.observe(resp.headers.get(HEADER_TOKEN))
        body: Any = None
        parsed = True
        if resp.content:
            try:
                body = resp.json()
            except ValueError:
                parsed = False
        if 200 <= status < 300:
            if not parsed:
                raise _stamped(
                    errors.UnexpectedResponse(
                        "the answer is not JSON", status=status, request_id=rid, region=region
                    ),
                    st,
                )
            self.budget.on_success()
            if st.op.hedge:
                with self._latencies_lock:
                    self._latencies.append(elapsed_s)
            meta = Meta(
                status=status,
                region=region,
                request_id=rid,
                served_by=resp.headers.get(HEADER_SERVED_BY),
                consistency_token=resp.headers.get(HEADER_TOKEN),
                replayed=resp.headers.get(HEADER_REPLAYED, "").lower() == "true",
                attempts=st.attempts,
                regions=tuple(st.regions),
            )
            return Answer(status, body, resp.headers, meta)
        retry_after = parse_retry_after(resp.headers.get(HEADER_RETRY_AFTER))
        err = self._error(status, body if isinstance(body, Mapping) else None, rid, retry_after)
        err.region = region
        return self._after_failure(st, region, verdict_for_status(status, retry_after), err)

    def _error(
        self,
        status: int,
        problem: Mapping[str, Any] | None,
        rid: str | None,
        retry_after: float | None,
    ) -> errors.TxError:
        if problem is not None and isinstance(problem.get("code"), str):
            return errors.from_problem(
                problem, status=status, request_id=rid, retry_after=retry_after, region=None
            )
        # No problem+json (a proxy, a load balancer): classify by status alone.
        cls: type[errors.TxError] = {
            429: errors.RateLimited,
            503: errors.RegionUnavailable,
            504: errors.OutcomeUnknown,
        }.get(status, errors.UnexpectedResponse)
        return cls(
            f"HTTP {status} without a problem+json body",
            status=status,
            request_id=rid,
            retry_after=retry_after,
        )

    def on_transport_error(self, st: CallState, region: str, exc: httpx.TransportError) -> float:
        """The seconds to sleep before the next attempt; raises when done."""
        verdict: Verdict
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            verdict = NOT_SENT
        elif isinstance(exc, httpx.TimeoutException):
            verdict = TIMED_OUT
        else:
            verdict = MAYBE_SENT
        err: errors.TxError
        detail = f"{type(exc).__name__} talking to {region}: {exc}"
        if verdict is NOT_SENT:
            err = errors.RegionUnavailable(f"{detail}: not sent", region=region)
        elif st.op.kind == "read":
            err = (errors.DeadlineExceeded if verdict is TIMED_OUT else errors.RegionUnavailable)(
                detail, region=region
            )
        else:
            err = errors.OutcomeUnknown(
                f"{detail}: no answer", region=region, idempotency_key=st.op.idempotency_key
            )
        err.__cause__ = exc
        return self._after_failure(st, region, verdict, err)

    def _after_failure(
        self, st: CallState, region: str, verdict: Verdict, err: errors.TxError
    ) -> float:
        st.last_error = err
        if verdict.move:
            self.selector.mark_down(region)
        if not verdict.retry:
            # Definite: a refusal is the key's stored first outcome, even after unknown
            # attempts (the router replays it for every retry with the same body).
            raise _stamped(err, st)
        if verdict.unknown and st.op.kind == "open":
            raise _stamped(
                errors.OutcomeUnknown(
                    f"the account open may or may not have happened ({err.code}); it has no "
                    "idempotency key, so it is not retried",
                    status=err.status,
                    request_id=err.request_id,
                    region=region,
                ),
                st,
            ) from err
        if verdict.unknown and st.op.kind == "write":
            st.unknown = True
        wait = self.backoff.delay_s(st.retries, verdict.retry_after_s)
        if st.attempts >= limits.ATTEMPTS_MAX or self.clock() + wait >= st.deadline:
            raise self.final_error(st)
        if not self.budget.try_spend():
            st.budget_spent = True
            log.debug(
                "txclient: retry budget spent; %s %s not retried (%s)",
                st.op.method,
                st.op.path,
                err.code,
            )
            raise self.final_error(st)
        st.retries += 1
        log.debug(
            "txclient: retry %d of %s %s after %s from %s in %.3f s (request %s): %s",
            st.retries,
            st.op.method,
            st.op.path,
            err.code if err.status is None else f"{err.status} {err.code}",
            region,
            wait,
            st.request_id,
            err.detail,
        )
        return wait

    def final_error(self, st: CallState) -> errors.TxError:
        return _stamped(self._final_error(st), st)

    def _final_error(self, st: CallState) -> errors.TxError:
        last = st.last_error
        assert last is not None
        if st.unknown:
            if isinstance(last, errors.OutcomeUnknown):
                last.idempotency_key = st.op.idempotency_key
                return last
            out = errors.OutcomeUnknown(
                f"the outcome is unknown at the deadline (last: {last.code}); retry with the "
                "same idempotency key to learn it",
                status=last.status,
                request_id=last.request_id,
                retry_after=last.retry_after,
                region=last.region,
                idempotency_key=st.op.idempotency_key,
            )
            out.__cause__ = last
            return out
        return last

    # -- hedging -------------------------------------------------------------------------------

    def hedge_delay_s(self) -> float:
        with self._latencies_lock:
            ordered = sorted(self._latencies)
        if len(ordered) < limits.HEDGE_SAMPLES_MIN:
            return limits.HEDGE_DELAY_S_DEFAULT
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        return max(p95, limits.HEDGE_DELAY_S_MIN)

    def hedge_regions(self) -> list[str]:
        """The best and second-best regions when both are up, else just the best."""
        ranked = self.selector.ranked()
        up = [r for r in ranked if not self.selector.is_down(r)]
        return up[:2] if len(up) >= 2 else ranked[:1]

    # -- probes --------------------------------------------------------------------------------

    def on_probe(self, region: str, rtt_s: float | None) -> None:
        if rtt_s is None:
            self.selector.probe_failed(region)
        else:
            self.selector.observe_rtt(region, rtt_s)


def _stamped(err: errors.TxError, st: CallState) -> errors.TxError:
    err.attempts = st.attempts
    err.regions = tuple(st.regions)
    return err


# -- operations (one place builds each request and reads its answer) ----------------------------


def account_open_op(
    core: Core,
    currency: str,
    home_region: str | None,
    overdraft_limit: int,
    metadata: Mapping[str, Any] | None,
    timeout: float | None,
) -> Op:
    body: dict[str, Any] = {"currency": currency, "overdraft_limit": overdraft_limit}
    if home_region is not None:
        body["home_region"] = home_region
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return Op("POST", "/v1/accounts", "open", core.call_timeout(timeout), json=body)


def account_get_op(
    core: Core, account_id: str, consistency: str, timeout: float | None, hedge: bool | None
) -> Op:
    if consistency not in CONSISTENCY_LEVELS:
        raise ValueError(f"consistency must be one of {sorted(CONSISTENCY_LEVELS)}")
    hedged = (core.hedge if hedge is None else hedge) and consistency == "cached"
    return Op(
        "GET",
        f"/v1/accounts/{_segment(account_id)}",
        "read",
        core.call_timeout(timeout),
        params={"consistency": consistency},
        hedge=hedged,
    )


def entries_op(
    core: Core, account_id: str, limit: int, cursor: str | None, timeout: float | None
) -> Op:
    if not 1 <= limit <= limits.ENTRIES_PAGE_MAX:
        raise ValueError(f"limit must be 1 to {limits.ENTRIES_PAGE_MAX}")
    params = {"limit": str(limit)}
    if cursor is not None:
        params["cursor"] = cursor
    return Op(
        "GET",
        f"/v1/accounts/{_segment(account_id)}/entries",
        "read",
        core.call_timeout(timeout),
        params=params,
    )


def events_op(core: Core, after: str | None, limit: int, timeout: float | None) -> Op:
    if not 1 <= limit <= limits.EVENTS_PAGE_MAX:
        raise ValueError(f"limit must be 1 to {limits.EVENTS_PAGE_MAX}")
    params = {"limit": str(limit)}
    if after is not None:
        params["after"] = after
    return Op("GET", "/v1/events", "read", core.call_timeout(timeout), params=params)


def webhook_create_op(core: Core, url: str, events: Sequence[str], timeout: float | None) -> Op:
    # "open": no idempotency key, so an unknown outcome is not retried (no duplicate endpoint).
    return Op(
        "POST",
        "/v1/webhooks",
        "open",
        core.call_timeout(timeout),
        json={"url": url, "events": list(events)},
    )


def webhooks_list_op(core: Core, timeout: float | None) -> Op:
    return Op("GET", "/v1/webhooks", "read", core.call_timeout(timeout))


def webhook_delete_op(core: Core, webhook_id: str, timeout: float | None) -> Op:
    return Op("DELETE", f"/v1/webhooks/{_segment(webhook_id)}", "open", core.call_timeout(timeout))


def transfer_body(
    source: str, destination: str, amount: int, currency: str, reference: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": source,
        "destination": destination,
        "amount": amount,
        "currency": currency,
    }
    if reference is not None:
        body["reference"] = reference
    return body


def transfer_op(
    core: Core,
    body: dict[str, Any],
    idempotency_key: str | None,
    timeout: float | None,
) -> Op:
    key = idempotency_key if idempotency_key is not None else new_idempotency_key()
    _check_key(key)
    return Op(
        "POST",
        "/v1/transfers",
        "write",
        core.call_timeout(timeout),
        json=body,
        idempotency_key=key,
    )


def transfer_get_op(core: Core, transfer_id: str, timeout: float | None) -> Op:
    return Op("GET", f"/v1/transfers/{_segment(transfer_id)}", "read", core.call_timeout(timeout))


def parse_transfer(ans: Answer) -> Transfer:
    return Transfer.from_json(ans.body, ans.meta, replayed=ans.meta.replayed)


def _segment(value: str) -> str:
    # Ids are ASCII tokens (acc_..., tr_...): anything that could escape the path segment is a
    # caller's bug, refused before it reaches the wire.
    if not value or any(c in value for c in "/?#%") or not value.isprintable():
        raise ValueError(f"not an id: {value!r}")
    return value


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= limits.IDEMPOTENCY_KEY_LEN_MAX or not key.isprintable():
        raise ValueError("idempotency_key must be 1 to 255 printable characters")


# -- batches ----------------------------------------------------------------------------------

BatchResult = Transfer | errors.TxError

_BATCH_ITEM_FIELDS = frozenset(
    {"source", "destination", "amount", "currency", "reference", "idempotency_key"}
)


def batch_items(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The items as sent: each with its own key (generated when the caller gave none)."""
    out = []
    for n, item in enumerate(items):
        extra = set(item) - _BATCH_ITEM_FIELDS
        if extra:
            raise ValueError(f"transfer_batch item {n}: unknown fields {sorted(extra)}")
        doc = {k: v for k, v in item.items() if v is not None}
        key = doc.get("idempotency_key")
        if key is None:
            doc["idempotency_key"] = key = new_idempotency_key()
        if not isinstance(key, str):
            raise ValueError(f"transfer_batch item {n}: idempotency_key must be a string")
        _check_key(key)
        out.append(doc)
    return out


def batch_plan(core: Core, items: list[dict[str, Any]], timeout: float | None) -> Plan:
    """Send the items (``BATCH_ITEMS_MAX`` per request) until each has a definite answer or the
    deadline: the whole request is retried by the call loop on transport errors, 429, 503 and
    504 (every item carries its own key, so a resend is a replay); items answered 429/503/504
    are sent again, alone, in the next round. An item whose outcome is still unknown at the
    deadline gets an ``OutcomeUnknown`` carrying its key."""
    t = core.call_timeout(timeout)
    deadline = core.clock() + t
    results: list[BatchResult | None] = [None] * len(items)
    unknown = [False] * len(items)
    for start in range(0, len(items), limits.BATCH_ITEMS_MAX):
        pending = list(range(start, min(start + limits.BATCH_ITEMS_MAX, len(items))))
        for round_ in range(limits.ATTEMPTS_MAX):
            remaining = deadline - core.clock()
            if remaining < limits.CALL_TIMEOUT_S_MIN:
                break
            op = Op(
                "POST",
                "/v1/transfers/batch",
                "write",
                remaining,
                json={"transfers": [items[i] for i in pending]},
            )
            try:
                ans = yield op
            except (errors.OutcomeUnknown, errors.RateLimited, errors.RegionUnavailable) as exc:
                for i in pending:
                    unknown[i] = unknown[i] or isinstance(exc, errors.OutcomeUnknown)
                    results[i] = _item_unknown(items[i], exc) if unknown[i] else exc
                pending = []
                break
            assert ans is not None
            pending = _batch_round(ans, items, pending, results, unknown)
            if not pending:
                break
            wait = core.backoff.delay_s(round_)
            if core.clock() + wait >= deadline or not core.budget.try_spend():
                break
            yield Sleep(wait)
        for i in pending:
            # Out of time or budget with these still answered 429/503/504 (already recorded).
            assert results[i] is not None
    return [r if r is not None else _never_sent(items[i]) for i, r in enumerate(results)]


def _batch_round(
    ans: Answer,
    items: list[dict[str, Any]],
    pending: list[int],
    results: list[BatchResult | None],
    unknown: list[bool],
) -> list[int]:
    doc = ans.body
    got = doc.get("results") if isinstance(doc, Mapping) else None
    if not isinstance(got, list) or len(got) != len(pending):
        raise errors.UnexpectedResponse(
            f"the batch answer must hold one result per item ({len(pending)})",
            status=ans.status,
            request_id=ans.meta.request_id,
            region=ans.meta.region,
        )
    again = []
    for i, res in zip(pending, got, strict=True):
        if not isinstance(res, Mapping) or not isinstance(res.get("status"), int):
            raise errors.UnexpectedResponse(
                "a batch result has no status", request_id=ans.meta.request_id
            )
        status = int(res["status"])
        if status == 201:
            results[i] = Transfer.from_json(
                res.get("transfer"), ans.meta, replayed=bool(res.get("replayed"))
            )
            continue
        problem = res.get("error")
        err = errors.from_problem(
            problem if isinstance(problem, Mapping) else {},
            status=status,
            request_id=ans.meta.request_id,
            retry_after=None,
            region=ans.meta.region,
        )
        verdict = verdict_for_status(status, None)
        unknown[i] = unknown[i] or verdict.unknown
        results[i] = _item_unknown(items[i], err) if unknown[i] else err
        if verdict.retry:
            again.append(i)
    return again


def _item_unknown(item: Mapping[str, Any], cause: errors.TxError) -> errors.OutcomeUnknown:
    out = errors.OutcomeUnknown(
        f"the outcome of this item is unknown ({cause.code}); retry it with its idempotency key",
        status=cause.status,
        request_id=cause.request_id,
        region=cause.region,
        idempotency_key=str(item["idempotency_key"]),
    )
    out.__cause__ = cause
    return out


def _never_sent(item: Mapping[str, Any]) -> errors.TxError:
    return errors.DeadlineExceeded(
        f"not sent before the deadline (key {item['idempotency_key']})", status=None
    )
