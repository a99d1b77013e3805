"""Helpers every handler uses: scopes, JSON responses, consistency tokens."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from consistency import tokens
from router.auth import ADMIN_SCOPES, AuthError, Principal, WrongAudience
from router.errors import Forbidden, Unauthorized, Unprocessable
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
