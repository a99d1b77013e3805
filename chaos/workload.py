"""The bank workload: concurrent transfers and reads through every region's router.

Setup opens, for one tenant, a funding account per region (it may go far below zero, so money
is never minted: every balance starts at zero and the sum stays zero) and a few customer
accounts per region, each funded from its region's funding account. Then ``clients`` workers
loop until the deadline: mostly transfers between random customers (same shard or cross-region,
any router), some reads at every consistency level, each worker keeping its own consistency
token. A transfer's idempotency key is also its ``reference``, so the checker can find every
stored transfer's key.

Retries are those of a careful client: an unknown outcome (timeout, dropped connection, 504) or
a "not started" answer (429, 503) is retried with the same key, through the next region's
router, with jittered exponential backoff, for at most ``RETRY_FOR_S``. What is still
unanswered then is recorded as unknown (``info``), never as failed.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_delay,
    wait_random_exponential,
)

from chaos.history import Account, History, ReadLevel, ReadOp, TransferOp
from consistency import ids, tokens
from router.client import RETRY_LATER_STATUSES, UNKNOWN_STATUSES, Client, Response

CURRENCY: Final = "EUR"
# Far below zero, so funding never fails; bounded like every overdraft (consistency.limits).
FUNDING_OVERDRAFT: Final = 10**15
# A client waits this long for one answer: longer than the router's write deadline (5 s), so a
# slow write comes back as the router's own 504 rather than as a client timeout.
REQUEST_TIMEOUT_S: Final = 8.0
# One operation's retries (same key) stop after this long; what is unanswered is unknown.
RETRY_FOR_S: Final = 6.0
RETRY_WAIT_MIN_S: Final = 0.05
RETRY_WAIT_MAX_S: Final = 1.0
# Setup must finish on a healthy cluster; each of its calls retries this long.
SETUP_RETRY_FOR_S: Final = 30.0
# Each worker's operations are bounded by count as well as by time.
OPS_PER_CLIENT_MAX: Final = 100_000
READ_LEVELS: Final[tuple[ReadLevel, ...]] = ("strong", "session", "cached")


@dataclass(frozen=True)
class WorkloadConfig:
    clients: int = 6
    accounts_per_region: int = 4
    # Low enough that some transfers meet insufficient funds (G3 is exercised, not assumed).
    initial_balance: int = 1_000
    amount_max: int = 300
    read_fraction: float = 0.3
    # Of the transfers, the share whose destination is homed in another region.
    cross_fraction: float = 0.5


class SetupError(RuntimeError):
    """The workload could not open or fund its accounts on the healthy cluster."""


def _unresolved(resp: Response) -> bool:
    return resp.status in UNKNOWN_STATUSES or resp.status in RETRY_LATER_STATUSES


class Bank:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        routers: dict[str, str],
        bearer: str,
        tenant: str,
        config: WorkloadConfig,
        rng: random.Random,
        clock: Callable[[], float],
        history: History | None = None,
    ) -> None:
        self.regions = sorted(routers)
        self.clients = {r: Client(session, url, bearer) for r, url in routers.items()}
        self.config = config
        self.rng = rng
        self.clock = clock
        self.history = history if history is not None else History()
        self.history.tenant = tenant
        self.customers: list[Account] = []

    # -- setup --------------------------------------------------------------------------------

    async def _call(
        self,
        send: Callable[[str], Awaitable[Response]],
        vias: Sequence[str],
        retry_for_s: float,
        on_answer: Callable[[str, Response], None] | None = None,
    ) -> Response:
        """``send`` through ``vias`` in turn until an answer that settles it, or the bound."""
        attempts = 0

        async def once() -> Response:
            nonlocal attempts
            via = vias[attempts % len(vias)]
            attempts += 1
            resp = await send(via)
            if on_answer is not None:
                on_answer(via, resp)
            return resp

        retrying = AsyncRetrying(
            stop=stop_after_delay(retry_for_s),
            wait=wait_random_exponential(min=RETRY_WAIT_MIN_S, max=RETRY_WAIT_MAX_S),
            retry=retry_if_result(_unresolved),
            # Out of time: the last answer stands (the caller classifies it), no exception.
            retry_error_callback=_last_answer,
        )
        resp: Response = await retrying(once)
        return resp

    async def _open(self, region: str, overdraft: int, funding: bool) -> Account:
        client = self.clients[region]
        resp = await self._call(
            lambda _via: client.create_account(CURRENCY, region, overdraft),
            [region],
            SETUP_RETRY_FOR_S,
        )
        if resp.status != 201:
            raise SetupError(f"open account in {region}: {resp.status} {resp.body!r}")
        acc = Account(resp.body["id"], region, resp.body["shard"], overdraft, funding)
        self.history.accounts[acc.id] = acc
        return acc

    async def setup(self) -> None:
        for region in self.regions:
            funding = await self._open(region, FUNDING_OVERDRAFT, funding=True)
            for _ in range(self.config.accounts_per_region):
                acc = await self._open(region, 0, funding=False)
                self.customers.append(acc)
                op = await self.transfer(
                    -1,
                    funding.id,
                    acc.id,
                    self.config.initial_balance,
                    [region],
                    {},
                    SETUP_RETRY_FOR_S,
                )
                if op.outcome != "ok":
                    raise SetupError(f"funding {acc.id}: {op.outcome} {op.code}")

    # -- operations ---------------------------------------------------------------------------

    async def transfer(
        self,
        process: int,
        source: str,
        destination: str,
        amount: int,
        vias: Sequence[str],
        token: dict[int, int],
        retry_for_s: float = RETRY_FOR_S,
    ) -> TransferOp:
        key = f"chaos-{uuid.uuid4().hex}"
        op = TransferOp(process, key, source, destination, amount, self.clock())
        self.history.transfers.append(op)
        indeterminate = False

        def on_answer(via: str, resp: Response) -> None:
            nonlocal indeterminate
            op.attempts += 1
            op.via.append(via)
            indeterminate = indeterminate or resp.status in UNKNOWN_STATUSES

        resp = await self._call(
            lambda via: self.clients[via].transfer(key, source, destination, amount, CURRENCY, key),
            vias,
            retry_for_s,
            on_answer,
        )
        op.complete_t = self.clock()
        if resp.status == 201:
            op.outcome = "ok"
            op.transfer_id = resp.body["id"]
            op.status = resp.body["status"]
            seen = _token_versions(resp.token)
            for acc in (source, destination):
                parsed = ids.parse_account_id(acc)
                if parsed is not None and parsed in seen:
                    op.versions[acc] = seen[parsed]
                    token[parsed] = max(token.get(parsed, 0), seen[parsed])
        elif _unresolved(resp) and indeterminate:
            op.outcome = "info"
            op.code = resp.code or resp.error or str(resp.status)
        else:
            # A definite refusal (4xx), or only "not started" answers (429/503): not applied.
            # A refusal after an unknown attempt is still definite: the key's first outcome is
            # stored with it and every retry of the same body gets that outcome back.
            op.outcome = "fail"
            op.code = resp.code or str(resp.status)
        return op

    async def read(
        self, process: int, account: str, level: ReadLevel, via: str, token: dict[int, int]
    ) -> ReadOp:
        parsed = ids.parse_account_id(account)
        assert parsed is not None
        sent = tokens.encode(token, []) if level == "session" and token else None
        op = ReadOp(
            process,
            account,
            level,
            via,
            self.clock(),
            token_version=token.get(parsed, 0) if sent else 0,
        )
        self.history.reads.append(op)
        resp = await self.clients[via].get_account(account, level, sent)
        op.complete_t = self.clock()
        if resp.status == 200:
            op.outcome = "ok"
            op.version = int(resp.body["version"])
            op.balance = int(resp.body["balance"])
            op.served_by = resp.served_by
            token[parsed] = max(token.get(parsed, 0), op.version)
        else:
            # A read changes nothing: any failure is simply a failed read.
            op.outcome = "fail"
            op.code = resp.code or resp.error or str(resp.status)
        return op

    async def worker(self, process: int, deadline: float, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        token: dict[int, int] = {}
        for _ in range(OPS_PER_CLIENT_MAX):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            # Each attempt starts at a random router; retries go round the others.
            start = rng.randrange(len(self.regions))
            vias = self.regions[start:] + self.regions[:start]
            if rng.random() < self.config.read_fraction:
                acc = rng.choice(self.customers)
                await self.read(process, acc.id, rng.choice(READ_LEVELS), vias[0], token)
                continue
            src = rng.choice(self.customers)
            cross = rng.random() < self.config.cross_fraction
            pool = [a for a in self.customers if a.id != src.id and (a.shard != src.shard) == cross]
            dst = rng.choice(pool or [a for a in self.customers if a.id != src.id])
            amount = rng.randint(1, self.config.amount_max)
            await self.transfer(process, src.id, dst.id, amount, vias, token)

    async def run(self, duration_s: float, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(self.worker(i, deadline, stop) for i in range(self.config.clients)))


def _last_answer(state: RetryCallState) -> Response:
    assert state.outcome is not None
    resp: Response = state.outcome.result()
    return resp


def _token_versions(text: str | None) -> dict[int, int]:
    try:
        return tokens.decode(text)
    except tokens.TokenError:
        return {}
