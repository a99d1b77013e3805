"""Serving the app: aiohttp's runner, with malformed HTTP answered as problem+json.

aiohttp answers a request it cannot parse (a bad request line, a broken header, a bad chunk)
from its protocol handler, before any middleware runs, with a ``text/plain`` body. Every other
error of the API is ``application/problem+json`` with a stable code (API.md), so the protocol
handler is replaced by one that renders the same answer as a problem. aiohttp has no public
hook for the handler class; the two subclasses below override only what they must, and the
version range in pyproject.toml pins the aiohttp 3 API they rely on.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE


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


class _ProblemRequestHandler(RequestHandler):
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
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same server, same settings; only the protocol handler it builds differs.
        server.__class__ = _ProblemServer
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
        site = web.TCPSite(runner, host, port, reuse_port=True)
        loop.run_until_complete(site.start())
        loop.run_forever()
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        loop.run_until_complete(runner.cleanup())
        loop.close()
