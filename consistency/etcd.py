"""A small etcd v3 client over etcd's JSON gateway (``/v3/kv/*``, ``/v3/watch``), on aiohttp.

Keys and values travel base64-encoded and 64-bit integers as strings, as the gateway does.
Every call has an explicit deadline; an endpoint that fails is skipped for the next one, so a
client listing all members keeps working while a majority is up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

import aiohttp
import orjson

from consistency.errors import CasConflict, EtcdError, EtcdUnavailable, LeaseExpired

# One unary call to one member; an election under --wan realistic takes about a second, so a
# shorter bound would give up on a cluster that is merely choosing a leader.
CALL_TIMEOUT_S: Final = 3.0
# A watch stream carries no data while nothing changes; progress notifications arrive every few
# minutes at most, so the read timeout is off and the caller relies on reconnects instead.
WATCH_CONNECT_TIMEOUT_S: Final = 3.0
# A mirror whose watch broke retries with jittered exponential backoff within these bounds.
MIRROR_BACKOFF_S_MIN: Final = 0.2
MIRROR_BACKOFF_S_MAX: Final = 5.0


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: str) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


class EtcdClient:
    """A client for a list of endpoints (``http://host:port``), tried in order."""

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def close(self) -> None:
        # Detached before the await: a call that runs meanwhile then opens a session of its
        # own (closed by the next close) instead of one this close would orphan.
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        last: BaseException | None = None
        for ep in self._endpoints:
            try:
                async with self._sess().post(ep + path, json=body, timeout=self._timeout) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise EtcdError(f"etcd {path} answered {resp.status}: {data[:200]!r}")
                    decoded: dict[str, Any] = orjson.loads(data)
                    return decoded
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = exc
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {last!r}") from last

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """``(value, mod_revision)`` of ``key``, or None when it does not exist."""
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        if not kvs:
            return None
        return _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])

    async def get_prefix(
        self, prefix: str, *, serializable: bool = False
    ) -> tuple[int, dict[str, bytes]]:
        """The store revision and every key under ``prefix``, read at one revision.

        ``serializable``: answered by the member asked, from what it has applied, without a
        round of the leader's quorum (no raft messages, no WAN): for a poll that tolerates a
        view milliseconds old, and that a member cut off from the majority may serve stale."""
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        if serializable:
            body["serializable"] = True
        data = await self._call("/v3/kv/range", body)
        revision = int(data["header"]["revision"])
        out = {
            _unb64(kv["key"]).decode(): _unb64(kv.get("value", "")) for kv in data.get("kvs") or []
        }
        return revision, out

    async def put(self, key: str, value: bytes) -> int:
        data = await self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(data["header"]["revision"])

    async def cas(self, key: str, expected_mod_revision: int, puts: Mapping[str, bytes]) -> int:
        """Write ``puts`` atomically if ``key`` still has ``expected_mod_revision`` (0 = absent).

        Raises :class:`CasConflict` when another writer got there first.
        """
        compare = {
            "key": _b64(key),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": str(expected_mod_revision),
        }
        success = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()]
        data = await self._call("/v3/kv/txn", {"compare": [compare], "success": success})
        if not data.get("succeeded", False):
            raise CasConflict(f"{key} changed since revision {expected_mod_revision}")
        return int(data["header"]["revision"])

    async def put_all_if_absent(self, key: str, puts: Mapping[str, bytes]) -> bool:
        try:
            await self.cas(key, 0, puts)
        except CasConflict:
            return False
        return True

    async def put_with_lease(self, key: str, value: bytes, lease_id: int) -> int:
        """Put ``key`` attached to ``lease_id``: it disappears when the lease expires."""
        data = await self._call(
            "/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)}
        )
        return int(data["header"]["revision"])

    async def delete(self, key: str) -> None:
        """Delete exactly ``key`` (absent is fine)."""
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def get_prefix_kvs(self, prefix: str) -> tuple[int, dict[str, tuple[bytes, int]]]:
        """Like :meth:`get_prefix` with each key's mod_revision: ``{key: (value, mod_rev)}``."""
        data = await self._call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        )
        out = {
            _unb64(kv["key"]).decode(): (_unb64(kv.get("value", "")), int(kv["mod_revision"]))
            for kv in data.get("kvs") or []
        }
        return int(data["header"]["revision"]), out

    # -- leases and locks -------------------------------------------------------------------
    # A lease is etcd's liveness token: keys attached to it vanish when its holder stops
    # renewing it (a crashed controller's verdicts and locks go away by themselves).

    async def lease_grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds (etcd may round it up to its minimum); its id."""
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl_s), "ID": "0"})
        if data.get("error"):
            raise EtcdError(f"lease grant: {data['error']}")
        return int(data["ID"])

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew ``lease_id`` once; the TTL it now has. Raises :class:`LeaseExpired` when the
        lease is gone (expired or revoked): whatever was attached to it is gone too."""
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        ttl = int((data.get("result") or {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease_id:x} expired")
        return ttl

    async def lease_revoke(self, lease_id: int) -> None:
        """Drop ``lease_id`` and every key attached to it (an expired lease is no error)."""
        try:
            await self._call("/v3/kv/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as exc:
            if isinstance(exc, EtcdUnavailable):
                raise
            # "requested lease not found": it already expired, which is what we wanted.

    async def try_lock(self, key: str, holder: bytes, lease_id: int) -> bytes | None:
        """Take the lock ``key`` for ``holder`` under ``lease_id`` if nobody holds it.

        One transaction: create the key if it does not exist (create_revision 0), else read
        it. Returns None when taken, else the current holder. The lock lasts while the lease
        is renewed, so a holder that dies frees it after the lease's TTL.
        """
        compare = {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        success = [
            {"request_put": {"key": _b64(key), "value": _b64(holder), "lease": str(lease_id)}}
        ]
        failure = [{"request_range": {"key": _b64(key)}}]
        data = await self._call(
            "/v3/kv/txn", {"compare": [compare], "success": success, "failure": failure}
        )
        if data.get("succeeded", False):
            return None
        for r in data.get("responses") or []:
            kvs = (r.get("response_range") or {}).get("kvs") or []
            if kvs:
                return _unb64(kvs[0].get("value", ""))
        # Released between the compare and the read: report it as held; the caller retries.
        return b""

    async def unlock(self, key: str, holder: bytes) -> bool:
        """Delete the lock ``key`` if ``holder`` still holds it (never someone else's)."""
        compare = {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(holder)}
        success = [{"request_delete_range": {"key": _b64(key)}}]
        data = await self._call("/v3/kv/txn", {"compare": [compare], "success": success})
        return bool(data.get("succeeded", False))

    async def delete_prefix(self, prefix: str) -> None:
        await self._call(
            "/v3/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        )

    async def member_list(self) -> list[dict[str, Any]]:
        data = await self._call("/v3/cluster/member/list", {})
        members: list[dict[str, Any]] = data.get("members", [])
        return members

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[int]:
        """Yield the revision of every change under ``prefix`` from ``start_revision`` on.

        Ends (by raising :class:`EtcdError`) when the stream breaks; the caller reconnects.
        A compacted start revision yields the compaction revision once and ends: the caller
        reloads the whole prefix, which is always safe.
        """
        try:
            async for revision, _changes in self.watch_changes(prefix, start_revision):
                yield revision
        except WatchCompacted as exc:
            yield exc.revision

    async def watch_changes(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[tuple[int, list[tuple[str, bytes | None]]]]:
        """Yield ``(revision, [(key, value or None when deleted), ...])`` for every change
        under ``prefix`` from ``start_revision`` on, in revision order.

        Ends (by raising :class:`EtcdError`) when the stream breaks, and with
        :class:`WatchCompacted` when ``start_revision`` was compacted away.
        """
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(_prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=WATCH_CONNECT_TIMEOUT_S)
        last: BaseException | None = None
        for ep in self._endpoints:
            try:
                async with self._sess().post(ep + "/v3/watch", json=body, timeout=timeout) as resp:
                    if resp.status != 200:
                        raise EtcdError(f"etcd watch answered {resp.status}")
                    async for line in resp.content:
                        line = line.strip()
                        if not line:
                            continue
                        msg = orjson.loads(line)
                        if "error" in msg:
                            raise EtcdError(f"watch error: {msg['error']}")
                        result = msg.get("result", {})
                        if result.get("compact_revision") not in (None, "0", 0):
                            raise WatchCompacted(int(result["compact_revision"]))
                        events = result.get("events")
                        if events:
                            yield (
                                int(result["header"]["revision"]),
                                [
                                    (
                                        _unb64(ev["kv"]["key"]).decode(),
                                        None
                                        if ev.get("type") == "DELETE"
                                        else _unb64(ev["kv"].get("value", "")),
                                    )
                                    for ev in events
                                ],
                            )
                    return
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                last = exc
        raise EtcdUnavailable(f"watch failed on every endpoint: {last!r}") from last


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted away: reload the prefix and watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"watch start revision compacted (now {revision})")
        self.revision = revision


class PrefixMirror:
    """Every key under one prefix, kept current by a single watch instead of polling reads.

    Each read through etcd's JSON gateway costs the members about a millisecond of CPU (more
    when linearizable): a loop that re-reads a prefix every quarter second was most of an idle
    cluster's etcd load. The mirror loads the prefix once, then applies the watch's events;
    when the stream breaks it is marked unsynced (readers get :class:`EtcdUnavailable`, as a
    failed read would have raised) until a reload succeeds.
    """

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._kv: dict[str, bytes] = {}
        self._revision = 0
        self._synced = False
        self._task: asyncio.Task[None] | None = None

    async def snapshot(self) -> dict[str, bytes]:
        """The keys and values as last seen; loads them first if the mirror is not synced."""
        if not self._synced:
            await self._reload()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name=f"mirror {self._prefix}")
        return dict(self._kv)

    async def _reload(self) -> None:
        self._revision, self._kv = await self._client.get_prefix(self._prefix)
        self._synced = True

    async def _follow(self) -> None:
        delay = MIRROR_BACKOFF_S_MIN
        while True:
            # A broken stream (EtcdError) and an ended one are handled alike, below.
            with contextlib.suppress(EtcdError):
                async for revision, changes in self._client.watch_changes(
                    self._prefix, self._revision + 1
                ):
                    delay = MIRROR_BACKOFF_S_MIN
                    for key, value in changes:
                        if value is None:
                            self._kv.pop(key, None)
                        else:
                            self._kv[key] = value
                    self._revision = revision
            # The stream ended or broke: what we hold may miss changes from here on.
            self._synced = False
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, MIRROR_BACKOFF_S_MAX)
            with contextlib.suppress(EtcdError):
                await self._reload()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
