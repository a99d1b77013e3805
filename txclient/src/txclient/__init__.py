"""txclient: the Python client of the txrouter API (API.md, "Python client").

It owns the client side of the contract: typed results (``models``) and errors (``errors``),
idempotency keys and safe retries under a deadline and a retry budget (``retry``), region
choice by measured RTT with failover (``regions``), and the session's consistency token
(``session``). It must never import the server's packages (router, regionstore, consistency,
infra, bench, chaos): a user installs it alone, with httpx as its only dependency.

    from txclient import Client, errors
    with Client(endpoints={"eu-west": "http://127.0.0.1:7420"}, token=TOKEN) as c:
        a = c.create_account("EUR", home_region="eu-west")
        try:
            t = c.transfer(source=src, destination=a.id, amount=100, currency="EUR")
        except errors.InsufficientFunds:
            ...
        except errors.OutcomeUnknown as exc:
            ...  # retry later with exc.idempotency_key

``AsyncClient`` has the same methods as coroutines (``entries`` is an async iterator).
"""

from txclient import errors
from txclient._async import AsyncClient
from txclient._core import BatchResult, Consistency
from txclient._sync import Client
from txclient.models import Account, Entry, Event, EventsPage, Meta, Transfer, Webhook
from txclient.retry import Backoff, RetryBudget
from txclient.session import Session

__all__ = [
    "Account",
    "AsyncClient",
    "Backoff",
    "BatchResult",
    "Client",
    "Consistency",
    "Entry",
    "Event",
    "EventsPage",
    "Meta",
    "RetryBudget",
    "Session",
    "Transfer",
    "Webhook",
    "errors",
]
