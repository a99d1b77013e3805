"""router.feedsink.OrderedScript against a real redis-server of our own: calls pipelined on one
connection, answered in order, and every way a connection can fail under calls in flight."""

from __future__ import annotations

import asyncio
import time
from typing import Final

import pytest
import redis
from redis.exceptions import NoScriptError

from router.feedsink import FEED_CALLS_IN_FLIGHT_MAX, OrderedScript
from router.redisconn import CacheUnavailable
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.integration

# Appends its argument to a list and answers the list's length: the order in which Redis ran
# the calls, checked against the order they were sent in.
SCRIPT: Final = "return redis.call('RPUSH', KEYS[1], ARGV[1])"
TIMEOUT_S: Final = 1.0
KEY: Final = "ordered"


async def _answers(futures: list[asyncio.Future[object]]) -> list[object]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT_S * 5))


async def test_calls_in_flight_are_answered_in_order(redis_server: RedisServer) -> None:
    calls = OrderedScript(redis_server.url, SCRIPT, what="redis", timeout_s=TIMEOUT_S)
    try:
        n = FEED_CALLS_IN_FLIGHT_MAX * 3
        # More calls than may be in flight: send waits for a free place, never reorders.
        sends = [asyncio.ensure_future(calls.send([KEY], [i])) for i in range(n)]
        futures = [await s for s in sends]
        assert await _answers(futures) == list(range(1, n + 1))
        with redis.Redis.from_url(redis_server.url) as r:
            assert [int(x) for x in r.lrange(KEY, 0, -1)] == list(range(n))
    finally:
        await calls.aclose()


async def test_a_paused_redis_fails_every_call_in_flight_then_recovers(
    redis_server: RedisServer,
) -> None:
    calls = OrderedScript(redis_server.url, SCRIPT, what="redis", timeout_s=TIMEOUT_S)
    try:
        assert await (await calls.send([KEY], ["a"])) == 1
        redis_server.pause()
        try:
            t0 = time.monotonic()
            futures = [await calls.send([KEY], [i]) for i in range(5)]
            for f in futures:
                with pytest.raises(CacheUnavailable):
                    await asyncio.wait_for(f, TIMEOUT_S * 5)
            # The first unanswered read times out; the rest fail with it, not one by one.
            assert time.monotonic() - t0 < TIMEOUT_S * 3
        finally:
            redis_server.resume()
        # A new connection: calls go through again.
        assert int(await (await calls.send([KEY], ["b"]))) >= 2
    finally:
        await calls.aclose()


async def test_a_restarted_redis_gets_the_script_again(redis_server: RedisServer) -> None:
    calls = OrderedScript(redis_server.url, SCRIPT, what="redis", timeout_s=TIMEOUT_S)
    try:
        assert await (await calls.send([KEY], ["a"])) == 1
        redis_server.restart()
        # The first call finds the connection closed (or is refused): never a wrong answer.
        first = await calls.send([KEY], ["b"])
        try:
            got = await asyncio.wait_for(first, TIMEOUT_S * 5)
        except CacheUnavailable:
            got = None
        second = await (await calls.send([KEY], ["c"]))
        assert second == (1 if got is None else got + 1)
    finally:
        await calls.aclose()


async def test_flushed_scripts_fail_one_call_and_are_loaded_again(
    redis_server: RedisServer,
) -> None:
    calls = OrderedScript(redis_server.url, SCRIPT, what="redis", timeout_s=TIMEOUT_S)
    try:
        assert await (await calls.send([KEY], ["a"])) == 1
        with redis.Redis.from_url(redis_server.url) as r:
            r.script_flush()
        with pytest.raises(CacheUnavailable) as refused:
            await (await calls.send([KEY], ["b"]))
        assert isinstance(refused.value.__cause__, NoScriptError)
        assert await (await calls.send([KEY], ["c"])) == 2
    finally:
        await calls.aclose()


async def test_a_call_cancelled_before_it_is_sent_leaves_the_others_in_step(
    redis_server: RedisServer,
) -> None:
    calls = OrderedScript(redis_server.url, SCRIPT, what="redis", timeout_s=TIMEOUT_S * 5)
    try:
        assert await (await calls.send([KEY], ["connected"])) == 1
        redis_server.pause()
        try:
            # Every place in flight taken (Redis is paused, nothing answers): the next call
            # waits for a place, and is cancelled there.
            held = [await calls.send([KEY], [i]) for i in range(FEED_CALLS_IN_FLIGHT_MAX)]
            waiting = asyncio.ensure_future(calls.send([KEY], ["never"]))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        finally:
            redis_server.resume()
        n = FEED_CALLS_IN_FLIGHT_MAX
        assert await _answers(held) == list(range(2, n + 2))
        # The cancelled call never ran, and its place came back.
        more = [await calls.send([KEY], ["x"]) for _ in range(n)]
        assert await _answers(more) == list(range(n + 2, 2 * n + 2))
    finally:
        await calls.aclose()
