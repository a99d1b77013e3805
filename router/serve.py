"""Serving the app: aiohttp's runner, with malformed HTTP answered as problem+json.

aiohttp answers a request it cannot parse (a bad request line, a broken header, a bad chunk)
from its protocol handler, before any middleware runs, with a ``text/plain`` body. Every other
error of the API is ``application/problem+json`` with a stable code (API.md), so the protocol
handler is replaced by one that renders the same answer as a problem. aiohttp has no public
hook for the handler class; the two subclasses below override only what they must, and the
version range in pyproject.toml pins the aiohttp 3 API they rely on.

The same handler caps the connections one router process holds (``CONNECTIONS_MAX``): past it a
new connection is answered at once with 503 ``region_unavailable`` and ``Retry-After`` and
closed, before it can hold a parser, a task or a handler. Slow clients are bounded by time
elsewhere (the keep-alive timer bounds the headers, ``read_body`` the body); the cap bounds
how many of them one router process carries at once.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE
from router.limits import CONNECTIONS_MAX, LISTEN_BACKLOG, OVERLOAD_RETRY_AFTER_S


def problem_for(status: int) -> web.Response:
    """A problem+json answer for a request aiohttp refused before routing it."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    client_error = 400 <= status < 500
    code = "invalid_request" if client_error else "region_unavailable"
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": phrase,
        "status": status,
        # The parser's own message names its internals (and may echo the bytes sent): not sent.
        "detail": "the request is not valid HTTP/1.1" if client_error else "the router failed",
        "code": code,
    }
    resp = web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE)
    resp.force_close()
    return resp


def _over_capacity_bytes() -> bytes:
    body = orjson.dumps(
        {
            "type": PROBLEM_TYPE_BASE + "region_unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "this router holds as many connections as it may; retry shortly",
            "code": "region_unavailable",
        }
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Retry-After: {max(1, round(OVERLOAD_RETRY_AFTER_S))}\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_OVER_CAPACITY: bytes = _over_capacity_bytes()


class _ProblemRequestHandler(RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        cap = getattr(server, "connections_max", CONNECTIONS_MAX)
        if server is not None and len(server.connections) >= cap:
            # Never registered with the server nor given a task: refused in one write.
            tcp = cast(asyncio.Transport, transport)
            tcp.write(_OVER_CAPACITY)
            tcp.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is None:
            return  # refused in connection_made: nothing was set up
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The base class logs the error and refuses when a response is already on the wire.
        super().handle_error(request, status, exc, message)
        return problem_for(status)


class _ProblemServer(web.Server):
    connections_max: int = CONNECTIONS_MAX

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    def __init__(
        self, app: web.Application, *, connections_max: int = CONNECTIONS_MAX, **kwargs: Any
    ) -> None:
        if connections_max < 1:
            raise ValueError("connections_max must be at least 1")
        super().__init__(app, **kwargs)
        self._connections_max = connections_max

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same server, same settings; only the protocol handler it builds differs.
        server.__class__ = _ProblemServer
        assert isinstance(server, _ProblemServer)
        server.connections_max = self._connections_max
        return server


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop,
    shutdown_timeout_s: float,
    keepalive_timeout_s: float,
) -> None:
    """Serve until SIGTERM or SIGINT (like ``web.run_app``), then clean up the app."""
    asyncio.set_event_loop(loop)
    runner = ProblemAppRunner(
        app,
        handle_signals=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=keepalive_timeout_s,
    )
    try:
        loop.run_until_complete(runner.setup())
        # Workers of one region share the port; the kernel balances new connections.
        site = web.TCPSite(runner, host, port, reuse_port=True, backlog=LISTEN_BACKLOG)
        loop.run_until_complete(site.start())
        loop.run_forever()
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        loop.run_until_complete(runner.cleanup())
        loop.close()
