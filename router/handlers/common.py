"""Helpers every handler uses: scopes, JSON responses, consistency tokens."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from consistency import tokens
from router.auth import ADMIN_SCOPES, AuthError, Principal, WrongAudience
from router.errors import Forbidden, Unauthorized, Unprocessable
from router.limits import REQUEST_TIMEOUT_DIGITS_MAX
from router.resolver import Deadline
from router.resources import CONFIG, VERIFIER

SERVED_BY_KEY = web.RequestKey("served_by", str)


def authorize(request: web.Request, scope: str) -> Principal:
    # Scope admin is only ever granted by an operator token (its own audience, router.auth).
    try:
        principal = request.app[VERIFIER].verify_header(
            request.headers.get("Authorization"), admin=scope in ADMIN_SCOPES
        )
    except WrongAudience as exc:
        raise Forbidden(str(exc)) from None
    except AuthError as exc:
        raise Unauthorized(str(exc)) from None
    if scope not in principal.scopes:
        raise Forbidden(f"this token lacks the '{scope}' scope")
    return principal


def client_token(request: web.Request) -> dict[int, int]:
    try:
        return tokens.decode(request.headers.get("X-Consistency-Token"))
    except tokens.TokenError as exc:
        raise Unprocessable(f"X-Consistency-Token: {exc}") from None


def request_deadline(request: web.Request, bound_s: float) -> Deadline:
    """The request's deadline: min(``Request-Timeout``, the router's own ``bound_s``).

    The header is a positive integer of milliseconds (API.md); anything else is 422
    invalid_request before any work, so a client never gets a deadline it did not ask for.
    """
    raw = request.headers.get("Request-Timeout")
    if raw is None:
        return Deadline(bound_s)
    value = raw.strip()
    # isascii: str.isdigit() also accepts other scripts' digits, which int() may refuse.
    if (
        not (value.isascii() and value.isdigit() and len(value) <= REQUEST_TIMEOUT_DIGITS_MAX)
        or int(value) == 0
    ):
        raise Unprocessable(
            "Request-Timeout must be a positive integer of milliseconds "
            f"(at most {REQUEST_TIMEOUT_DIGITS_MAX} digits)"
        )
    return Deadline(min(int(value) / 1000, bound_s))


def json_response(
    request: web.Request,
    body: Any,
    *,
    status: int = 200,
    versions: Iterable[tuple[int, int]] | None = None,
    served_by: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    out = dict(headers or {})
    if versions is not None:
        out["X-Consistency-Token"] = tokens.encode(client_token(request), versions)
    if served_by is not None:
        request[SERVED_BY_KEY] = f"{request.app[CONFIG].region}/{served_by}"
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=out
    )
