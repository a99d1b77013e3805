"""router.redisconn.RedisGuard, the one mapping of Redis client failures: Redis's errors and the
socket's become CacheUnavailable (counted once); nothing else is caught or counted."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.redisconn import CacheUnavailable, RedisGuard


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("closed"),
        RedisTimeoutError("slow"),
        ResponseError("BUSY"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_redis_failures_become_cache_unavailable_and_are_counted(exc: Exception) -> None:
    errors: list[int] = []
    guard = RedisGuard("redis eu-west", lambda: errors.append(1))
    for _ in range(2):  # one guard, re-entered: each failure counted once
        with pytest.raises(CacheUnavailable, match="redis eu-west") as info, guard:
            raise exc
        assert info.value.__cause__ is exc
    assert errors == [1, 1]


def test_other_errors_pass_through_uncounted() -> None:
    errors: list[int] = []
    guard = RedisGuard("redis", lambda: errors.append(1))
    with pytest.raises(ValueError, match="a bug"), guard:
        raise ValueError("a bug")
    with guard:
        ran = True  # a block that raises nothing is counted as nothing
    assert ran
    assert errors == []
