"""HTTP-facing errors, rendered as ``application/problem+json`` with stable codes.

    ApiError(status, code)
     +-- BadRequest            400 invalid_request  (malformed JSON, headers)
     +-- Unprocessable         422 invalid_request  (well-formed but invalid fields)
     +-- Unauthorized          401 unauthorized
     +-- Forbidden             403 forbidden
     +-- NotFound              404 not_found        (also another tenant's object)
     +-- Conflict              409 idempotency_key_reused
     +-- BusinessRefusal       422 insufficient_funds / currency_mismatch / balance_limit
     +-- RateLimited           429 rate_limited       (with Retry-After)
     +-- RegionUnavailable     503 region_unavailable (with Retry-After)
     +-- OutcomeUnknown        504 outcome_unknown  (a write that may or may not have happened)

Handlers raise these; one middleware renders them, and the request paths' domain outcomes
(router.outcomes) through ``from_outcome``. Nothing else reaches a client: no stack
trace, no SQL, no internal host name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from aiohttp import web

from router import outcomes

PROBLEM_TYPE_BASE = "https://txrouter.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApiError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.extra = extra

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }


class BadRequest(ApiError):
    status = 400
    default_code = "invalid_request"
    title = "Bad request"


class Unprocessable(ApiError):
    status = 422
    default_code = "invalid_request"
    title = "Invalid request"


class Unauthorized(ApiError):
    status = 401
    default_code = "unauthorized"
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="txrouter"'}


class Forbidden(ApiError):
    status = 403
    default_code = "forbidden"
    title = "Forbidden"


class NotFound(ApiError):
    status = 404
    default_code = "not_found"
    title = "Not found"


class MethodNotAllowed(ApiError):
    status = 405
    default_code = "method_not_allowed"
    title = "Method not allowed"


class Conflict(ApiError):
    status = 409
    default_code = "idempotency_key_reused"
    title = "Conflict"


class PayloadTooLarge(ApiError):
    status = 413
    default_code = "invalid_request"
    title = "Payload too large"


class RequestTimeout(ApiError):
    status = 408
    default_code = "invalid_request"
    title = "Request timeout"


class UnsupportedMediaType(ApiError):
    status = 415
    default_code = "invalid_request"
    title = "Unsupported media type"


class BusinessRefusal(ApiError):
    status = 422
    title = "Refused"


class _RetryLater(ApiError):
    """An error the client should retry after ``Retry-After`` seconds, unchanged."""

    def __init__(self, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimited(_RetryLater):
    status = 429
    default_code = "rate_limited"
    title = "Too many requests"


class RegionUnavailable(_RetryLater):
    status = 503
    default_code = "region_unavailable"
    title = "Region unavailable"


class OutcomeUnknown(ApiError):
    status = 504
    default_code = "outcome_unknown"
    title = "Outcome unknown"


def from_outcome(out: outcomes.RouteOutcome) -> ApiError:
    """The problem a request path's outcome (router.outcomes) answers: the one place where
    those become statuses and codes."""
    if isinstance(out, outcomes.TenantOverloaded):
        return RateLimited(out.detail, retry_after_s=out.retry_after_s)
    if isinstance(out, outcomes.NothingWritten):
        return RegionUnavailable(out.detail, retry_after_s=out.retry_after_s)
    if isinstance(out, outcomes.UnknownOutcome):
        return OutcomeUnknown(out.detail)
    if isinstance(out, outcomes.Missing):
        return NotFound(out.detail)
    if isinstance(out, outcomes.Refused):
        return BusinessRefusal(out.detail, code=out.code)
    if isinstance(out, outcomes.KeyReused):
        return Conflict(out.detail)
    assert isinstance(out, outcomes.Invalid), type(out)
    return Unprocessable(out.detail)


def problem_response(err: ApiError) -> web.Response:
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=err.headers(),
    )
