"""The public async client of the router's HTTP API (API.md), for workloads, tools and tests.

It owns request building and answer decoding only; retry policy belongs to the caller, because
only the caller knows whether it holds an idempotency key. It never imports the router's server
side, nor infra/bench/chaos.

An answer that never arrived (connection refused or reset, client timeout) is a ``Response``
with status 0: for a write that is an unknown outcome, exactly like a 504 (G7).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

# Statuses after which a write may or may not have happened: retry with the same key.
UNKNOWN_STATUSES: Final = frozenset({0, 500, 502, 504})
# Statuses that say the router did not start the write (overload, region unavailable): safe to
# retry with the same key, and on their own they mean "not applied".
RETRY_LATER_STATUSES: Final = frozenset({429, 503})
TOKEN_HEADER: Final = "X-Consistency-Token"  # noqa: S105 - a header name


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    # Why no HTTP answer arrived (status 0).
    error: str | None = None

    @property
    def code(self) -> str | None:
        """The problem+json ``code`` of an error answer."""
        if isinstance(self.body, dict):
            code = self.body.get("code")
            return code if isinstance(code, str) else None
        return None

    @property
    def token(self) -> str | None:
        return self.headers.get(TOKEN_HEADER)

    @property
    def served_by(self) -> str | None:
        return self.headers.get("X-Served-By")


class Client:
    """One tenant's bearer token against one router base URL, over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, bearer: str) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._auth = f"Bearer {bearer}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        hdrs = {"Authorization": self._auth, **(headers or {})}
        data = None
        if json is not None:
            data = orjson.dumps(json)
            hdrs["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, self.base_url + path, data=data, headers=hdrs
            ) as resp:
                raw = await resp.read()
                ctype = resp.headers.get("Content-Type", "")
                body: Any = orjson.loads(raw) if raw and "json" in ctype else raw
                return Response(resp.status, body, dict(resp.headers))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            return Response(0, None, {}, f"{type(exc).__name__}: {exc}")

    async def create_account(
        self, currency: str, home_region: str | None = None, overdraft_limit: int = 0
    ) -> Response:
        body: dict[str, Any] = {"currency": currency, "overdraft_limit": overdraft_limit}
        if home_region is not None:
            body["home_region"] = home_region
        return await self.request("POST", "/v1/accounts", json=body)

    async def transfer(
        self,
        key: str,
        source: str,
        destination: str,
        amount: int,
        currency: str,
        reference: str | None = None,
    ) -> Response:
        body: dict[str, Any] = {
            "source": source,
            "destination": destination,
            "amount": amount,
            "currency": currency,
        }
        if reference is not None:
            body["reference"] = reference
        return await self.request(
            "POST", "/v1/transfers", json=body, headers={"Idempotency-Key": key}
        )

    async def get_account(
        self, account: str, consistency: str = "cached", token: str | None = None
    ) -> Response:
        headers = {TOKEN_HEADER: token} if token else None
        return await self.request(
            "GET", f"/v1/accounts/{account}?consistency={consistency}", headers=headers
        )

    async def get_transfer(self, transfer_id: str) -> Response:
        return await self.request("GET", f"/v1/transfers/{transfer_id}")
