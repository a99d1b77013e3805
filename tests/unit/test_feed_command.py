"""The feed's own packing of its script calls (``router.feedsink.evalsha_command``, keys packed
once per batch for every region) is byte for byte what the Redis client packs for the same
call, whatever the keys and arguments hold (non-ASCII text, large values, empty ones)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from router.feedsink import PackedKeys, evalsha_command

SHA = hashlib.sha1(b"return 1", usedforsecurity=False).hexdigest()
_keys = st.lists(st.text(min_size=1, max_size=40), max_size=8)
_args = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.binary(max_size=9000),
    ),
    max_size=8,
)


@given(keys=_keys, shared=_keys, args=_args)
def test_the_feed_packs_a_call_as_the_client_does(
    keys: list[str], shared: list[str], args: list[str | int | bytes]
) -> None:
    client = Connection()
    want = b"".join(
        client.pack_command("EVALSHA", SHA, len(keys) + len(shared), *keys, *shared, *args)
    )
    got = b"".join(evalsha_command(SHA, keys, args, PackedKeys.of(shared)))
    assert got == want


def test_no_shared_keys_is_a_plain_call() -> None:
    client = Connection()
    want = b"".join(client.pack_command("EVALSHA", SHA, 1, "k", "a", 7))
    assert b"".join(evalsha_command(SHA, ["k"], ["a", 7])) == want
