"""How the router package talks to a Redis: one bounded connection pool per use, and the one
mapping of "Redis did not answer" to ``CacheUnavailable``.

Every Redis client of the package (the region cache, the change-feed sink, the rate limiter)
is built here, so the timeouts and the reconnect rule are set in one place, and every caller
maps exactly ``REDIS_ERRORS``. Imports redis and nothing of this project.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError


def reconnect_once() -> Retry:
    # A pooled connection to a Redis that restarted fails once with "connection closed": retry
    # that on a fresh connection at once. Safe for the callers that pass reconnect=True: every
    # write of theirs is forward-only (a repeat is refused or identical); timeouts are not
    # retried (they bound request latency).
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def pooled_client(
    url: str, *, connections: int, timeout_s: float, reconnect: bool = True
) -> aioredis.Redis:
    """A client over a blocking pool of at most ``connections`` connections: a caller past
    them waits up to ``timeout_s`` for a free one, and connect, read and write are each bounded
    by ``timeout_s`` too."""
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=reconnect_once() if reconnect else None,
        )
    )


class CacheUnavailable(Exception):
    """Redis did not answer (down, restarting, timed out); nothing is known to be written."""


# What a Redis client call raises when Redis did not answer: the client's own errors (its
# timeouts included) and the socket's (TimeoutError is an OSError). Every caller of Redis maps
# exactly these, through RedisGuard, and nothing else.
REDIS_ERRORS: Final = (RedisError, OSError)


class RedisGuard:
    """``with guard:`` turns a Redis failure (REDIS_ERRORS) into CacheUnavailable, after
    ``on_error`` (a metric) when given. The one mapping of Redis client failures.

    A plain class, not a generator context manager: the request path keeps one guard per
    operation and re-enters it, so a cache call allocates nothing for its error mapping.
    """

    __slots__ = ("_on_error", "_what")

    def __init__(self, what: str, on_error: Callable[[], None] | None = None) -> None:
        self._what = what
        self._on_error = on_error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        # Never swallows: anything else propagates as it is.
        if exc is None or not isinstance(exc, REDIS_ERRORS):
            return
        if self._on_error is not None:
            self._on_error()
        raise unavailable(self._what, exc) from exc


def unavailable(what: str, exc: BaseException) -> CacheUnavailable:
    """The CacheUnavailable for ``exc`` (the guard raises it; a pipelined call whose answer is
    a future holds it, router.feedsink)."""
    err = CacheUnavailable(f"{what}: {exc!r}")
    err.__cause__ = exc
    return err


def redis_unavailable(what: str) -> RedisGuard:
    """A guard for one call site (``with redis_unavailable("redis eu-west"): ...``)."""
    return RedisGuard(what)
