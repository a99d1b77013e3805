"""The router's admin listener: ``GET /metrics`` on its own port (``RouterConfig.admin_port``).

Metrics name shards, regions, routes and rates: useful to an attacker mapping the system, so
they are served only where the operator's scrapers reach (a separate port that a deployment
keeps off the public network), never on the public API port. Every worker binds the admin port
with SO_REUSEPORT like the public one, and answers for itself (``txr_router_worker_info``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from router.handlers import ops
from router.resources import CONFIG

_MAIN = web.AppKey("main_app", web.Application)


async def _metrics(request: web.Request) -> web.Response:
    return await ops.metrics_response(request.app[_MAIN])


async def _admin_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.admin_port is None:
        yield
        return
    admin = web.Application()
    admin[_MAIN] = app
    admin.router.add_get("/metrics", _metrics, allow_head=False)
    runner = web.AppRunner(admin, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.admin_port, reuse_port=True)
    await site.start()
    yield
    await runner.cleanup()


def install(app: web.Application) -> None:
    app.cleanup_ctx.append(_admin_ctx)
