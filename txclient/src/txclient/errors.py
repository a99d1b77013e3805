"""The client's exceptions: one class per problem ``code`` of the API, under ``TxError``.

    TxError(code, status, request_id, retry_after)
     +-- InvalidRequest          400/413/422 invalid_request
     +-- Unauthorized            401 unauthorized
     +-- Forbidden               403 forbidden
     +-- NotFound                404 not_found   (also another tenant's object)
     +-- MethodNotAllowed        405 method_not_allowed
     +-- IdempotencyKeyReused    409 idempotency_key_reused
     +-- InsufficientFunds       422 insufficient_funds
     +-- CurrencyMismatch        422 currency_mismatch
     +-- BalanceLimit            422 balance_limit
     +-- RateLimited             429 rate_limited        (retried, Retry-After honoured)
     +-- RegionUnavailable       503 region_unavailable  (retried in the next region); also
     |                               raised with status None when no region took the connection
     +-- OutcomeUnknown          504 outcome_unknown     (retried with the same key); carries
     |                               ``idempotency_key``: retry later with it to learn the outcome
     +-- DeadlineExceeded        (client side) a read ran out of its deadline
     +-- UnexpectedResponse      (client side) an answer that is not the API's (no problem+json)

A code this version does not know becomes a plain ``TxError`` with that code. Decisions are
taken on classes or ``code``, never on ``detail`` (a human sentence that may change).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class TxError(Exception):
    """An API error (a problem+json answer) or a client-side failure of one call."""

    code_default: ClassVar[str] = "error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        region: str | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.code_default
        # None when no HTTP answer arrived (connection refused, deadline).
        self.status = status
        self.request_id = request_id
        # Seconds the server asked us to wait (Retry-After), when it did.
        self.retry_after = retry_after
        # The region whose router gave the answer.
        self.region = region
        self.problem: dict[str, Any] = dict(problem or {})
        # Filled in by the client: how many attempts the call made, and in which regions.
        self.attempts = 0
        self.regions: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f" via {self.region}" if self.region else ""
        rid = f" request {self.request_id}" if self.request_id else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.detail}{where}{rid}"


class InvalidRequest(TxError):
    code_default = "invalid_request"


class UrlNotAllowed(InvalidRequest):
    """A webhook URL the router may not call (private, loopback, link-local, metadata...)."""

    code_default = "url_not_allowed"


class Unauthorized(TxError):
    code_default = "unauthorized"


class Forbidden(TxError):
    code_default = "forbidden"


class AccountLimitReached(Forbidden):
    """The tenant holds as many accounts as its limit allows (``txr limits``)."""

    code_default = "account_limit_reached"


class LimitExceeded(InvalidRequest):
    """A per-tenant count bound of the request's kind is reached (e.g. 16 webhooks)."""

    code_default = "limit_exceeded"


class NotFound(TxError):
    code_default = "not_found"


class MethodNotAllowed(TxError):
    code_default = "method_not_allowed"


class IdempotencyKeyReused(TxError):
    code_default = "idempotency_key_reused"


class InsufficientFunds(TxError):
    code_default = "insufficient_funds"


class CurrencyMismatch(TxError):
    code_default = "currency_mismatch"


class BalanceLimit(TxError):
    code_default = "balance_limit"


class RateLimited(TxError):
    code_default = "rate_limited"


class RegionUnavailable(TxError):
    code_default = "region_unavailable"


class OutcomeUnknown(TxError):
    """The write may or may not have happened. Retrying with ``idempotency_key`` (the same
    body) returns its outcome once the cluster answers; ``None`` for an account open, which has
    no key (look for the account before opening another)."""

    code_default = "outcome_unknown"

    def __init__(self, detail: str, *, idempotency_key: str | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.idempotency_key = idempotency_key


class DeadlineExceeded(TxError):
    code_default = "deadline_exceeded"


class UnexpectedResponse(TxError):
    code_default = "unexpected_response"


BY_CODE: dict[str, type[TxError]] = {
    cls.code_default: cls
    for cls in (
        InvalidRequest,
        UrlNotAllowed,
        Unauthorized,
        Forbidden,
        AccountLimitReached,
        LimitExceeded,
        NotFound,
        MethodNotAllowed,
        IdempotencyKeyReused,
        InsufficientFunds,
        CurrencyMismatch,
        BalanceLimit,
        RateLimited,
        RegionUnavailable,
        OutcomeUnknown,
    )
}


def from_problem(
    problem: Mapping[str, Any],
    *,
    status: int,
    request_id: str | None,
    retry_after: float | None,
    region: str | None,
) -> TxError:
    """The exception for one problem+json object (a whole answer or one batch item's)."""
    code = problem.get("code")
    code = code if isinstance(code, str) and code else None
    detail = problem.get("detail")
    text = detail if isinstance(detail, str) else str(problem.get("title", "error"))
    cls = BY_CODE.get(code, TxError) if code else UnexpectedResponse
    return cls(
        text,
        code=code or "unexpected_response",
        status=status,
        request_id=request_id,
        retry_after=retry_after,
        region=region,
        problem=problem,
    )
