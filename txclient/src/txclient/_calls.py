"""Every public call of both clients, once: the request it sends (``_core``'s operations) and how
its answer becomes the result, as a plan (``_core.Plan``: it yields its requests and is sent
their answers) that ``Client`` runs with blocking I/O and ``AsyncClient`` with asyncio. And
``Facade``, what the two clients share besides the calls: the core, the session and the region.
The facades keep only their signatures, their I/O and their lifecycle.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import httpx

from txclient import errors, limits
from txclient._core import (
    Answer,
    Core,
    Op,
    Step,
    account_get_op,
    account_open_op,
    entries_op,
    events_op,
    parse_transfer,
    transfer_body,
    transfer_get_op,
    transfer_op,
    webhook_create_op,
    webhook_delete_op,
    webhooks_list_op,
)
from txclient.models import Account, EntriesPage, EventsPage, Transfer, Webhook
from txclient.retry import Backoff, RetryBudget
from txclient.session import Session

_T = TypeVar("_T")
# A plan whose result is a ``_T``.
Call: TypeAlias = Generator[Step, Answer | None, _T]


def _ask(op: Op) -> Generator[Step, Answer | None, Answer]:
    ans = yield op
    # A runner sends every Op its answer (or throws its error); None answers only a Sleep.
    assert ans is not None
    return ans


def create_account(
    core: Core,
    currency: str,
    home_region: str | None,
    overdraft_limit: int,
    metadata: Mapping[str, Any] | None,
    timeout: float | None,
) -> Call[Account]:
    op = account_open_op(core, currency, home_region, overdraft_limit, metadata, timeout)
    ans = yield from _ask(op)
    return Account.from_json(ans.body, ans.meta)


def get_account(
    core: Core, account_id: str, consistency: str, timeout: float | None, hedge: bool | None
) -> Call[Account]:
    # The op says whether it may be hedged; the runner hedges it.
    ans = yield from _ask(account_get_op(core, account_id, consistency, timeout, hedge))
    return Account.from_json(ans.body, ans.meta)


def entries_page(
    core: Core, account_id: str, page_size: int, cursor: str | None, timeout: float | None
) -> Call[EntriesPage]:
    ans = yield from _ask(entries_op(core, account_id, page_size, cursor, timeout))
    return EntriesPage.from_json(ans.body)


def transfer(
    core: Core,
    source: str,
    destination: str,
    amount: int,
    currency: str,
    reference: str | None,
    idempotency_key: str | None,
    timeout: float | None,
) -> Call[Transfer]:
    body = transfer_body(source, destination, amount, currency, reference)
    return parse_transfer((yield from _ask(transfer_op(core, body, idempotency_key, timeout))))


def get_transfer(core: Core, transfer_id: str, timeout: float | None) -> Call[Transfer]:
    return parse_transfer((yield from _ask(transfer_get_op(core, transfer_id, timeout))))


def events_page(
    core: Core, after: str | None, limit: int, timeout: float | None
) -> Call[EventsPage]:
    return EventsPage.from_json((yield from _ask(events_op(core, after, limit, timeout))).body)


def create_webhook(
    core: Core, url: str, events: Sequence[str], timeout: float | None
) -> Call[Webhook]:
    return Webhook.from_json((yield from _ask(webhook_create_op(core, url, events, timeout))).body)


def webhooks(core: Core, timeout: float | None) -> Call[list[Webhook]]:
    body = (yield from _ask(webhooks_list_op(core, timeout))).body
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise errors.UnexpectedResponse("field 'data' is not a list")
    return [Webhook.from_json(w) for w in data]


def delete_webhook(core: Core, webhook_id: str, timeout: float | None) -> Call[None]:
    yield from _ask(webhook_delete_op(core, webhook_id, timeout))


def pool_limits() -> httpx.Limits:
    """Each client's connection pool."""
    return httpx.Limits(
        max_connections=limits.POOL_CONNECTIONS_MAX,
        max_keepalive_connections=limits.POOL_KEEPALIVE_MAX,
    )


class Facade:
    """The session and region side of both clients (their constructors' arguments are
    documented on them)."""

    def __init__(
        self,
        endpoints: Mapping[str, str],
        token: str,
        *,
        prefer: str | None,
        timeout: float,
        hedge: bool,
        session_token: str | None,
        session: Session | None,
        budget: RetryBudget | None,
        backoff: Backoff | None,
    ) -> None:
        self._core = Core(
            endpoints=endpoints,
            token=token,
            prefer=prefer,
            timeout=timeout,
            hedge=hedge,
            budget=budget,
            backoff=backoff,
            session_token=session_token,
            session=session,
        )

    @property
    def region(self) -> str:
        """The region this client sends to now."""
        return self._core.selector.best()

    @property
    def regions(self) -> list[str]:
        """Every region, best first."""
        return self._core.selector.ranked()

    @property
    def session(self) -> Session:
        return self._core.session

    @property
    def consistency_token(self) -> str | None:
        """The newest token of this session (sent on every call)."""
        return self._core.session.token

    @property
    def budget(self) -> RetryBudget:
        return self._core.budget

    def rtt_s(self, region: str) -> float | None:
        return self._core.selector.rtt_s(region)
