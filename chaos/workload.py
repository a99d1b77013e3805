"""The bank workload: concurrent transfers and reads through every region's router.

Setup opens, for one tenant, a funding account per region (it may go far below zero, so money
is never minted: every balance starts at zero and the sum stays zero) and a few customer
accounts per region, each funded from its region's funding account. Then ``clients`` workers
loop until the deadline: mostly transfers between random customers (same shard or cross-region,
any router), some reads at every consistency level, each worker keeping its own consistency
token. A transfer's idempotency key is also its ``reference``, so the checker can find every
stored transfer's key.

Every call goes through ``txclient``, as a payments team's service would call txrouter: each
worker is one session (one consistency token, sent on every call) with one client per region
(an operation starts at a random region's router; the client moves to the next region when that
one does not answer) and one retry budget. The client retries an unknown outcome (timeout,
dropped connection, 504) and a "not started" answer (429, 503) with the same key, with
full-jitter backoff, for at most ``CALL_TIMEOUT_S``; what is still unknown then is recorded as
unknown (``info``), never as failed.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from chaos.history import Account, History, ReadLevel, ReadOp, TransferOp
from consistency import ids, tokens
from txclient import AsyncClient, RetryBudget, Session, errors

CURRENCY: Final = "EUR"
# Far below zero, so funding never fails; bounded like every overdraft (consistency.limits).
FUNDING_OVERDRAFT: Final = 10**15
# One operation's deadline, every retry (same key) included: longer than the router's write
# deadline (5 s), so a slow write comes back as the router's own 504 and is retried at least
# once; what is unanswered after it is unknown.
CALL_TIMEOUT_S: Final = 12.0
# A read is retried within this (reads change nothing; a failed read is just a failed read).
READ_TIMEOUT_S: Final = 8.0
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


class Worker:
    """One process of the workload: one session and one retry budget, a client per region."""

    def __init__(self, routers: dict[str, str], bearer: str, timeout_s: float) -> None:
        self.session = Session()
        budget = RetryBudget()
        regions = sorted(routers)
        self.clients = {}
        for i, r in enumerate(regions):
            # Pinned to r; when r does not answer, on round the others in order (the order of
            # the endpoints breaks ties between unmeasured regions). No RTT probe: the order
            # is the workload's choice, and 18 clients probing would load the machine under
            # test for nothing.
            ring = regions[i:] + regions[:i]
            self.clients[r] = AsyncClient(
                {x: routers[x] for x in ring},
                bearer,
                prefer=r,
                timeout=timeout_s,
                session=self.session,
                budget=budget,
                probe=False,
            )

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.aclose()


class Bank:
    def __init__(
        self,
        routers: dict[str, str],
        bearer: str,
        tenant: str,
        config: WorkloadConfig,
        rng: random.Random,
        clock: Callable[[], float],
        history: History | None = None,
    ) -> None:
        self.regions = sorted(routers)
        self.routers = dict(routers)
        self.bearer = bearer
        self.config = config
        self.rng = rng
        self.clock = clock
        self.history = history if history is not None else History()
        self.history.tenant = tenant
        self.customers: list[Account] = []

    def worker(self, timeout_s: float = CALL_TIMEOUT_S) -> Worker:
        return Worker(self.routers, self.bearer, timeout_s)

    # -- setup --------------------------------------------------------------------------------

    async def _open(self, w: Worker, region: str, overdraft: int, funding: bool) -> Account:
        try:
            a = await w.clients[region].create_account(
                CURRENCY, home_region=region, overdraft_limit=overdraft
            )
        except errors.TxError as exc:
            raise SetupError(f"open account in {region}: {exc}") from exc
        acc = Account(a.id, region, a.shard, overdraft, funding)
        self.history.accounts[acc.id] = acc
        return acc

    async def setup(self) -> None:
        w = self.worker(SETUP_RETRY_FOR_S)

        async def one_region(region: str) -> list[Account]:
            funding = await self._open(w, region, FUNDING_OVERDRAFT, funding=True)
            customers = []
            for _ in range(self.config.accounts_per_region):
                acc = await self._open(w, region, 0, funding=False)
                customers.append(acc)
                op = await self.transfer(
                    w, -1, funding.id, acc.id, self.config.initial_balance, region
                )
                if op.outcome != "ok":
                    raise SetupError(f"funding {acc.id}: {op.outcome} {op.code}")
            return customers

        try:
            # The regions' set-ups are independent (each funds its own customers at home): run
            # them side by side, and keep the customers in region order for the seeded workload.
            # A TaskGroup: one region's failure cancels the others before the clients close.
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(one_region(r)) for r in self.regions]
            except ExceptionGroup as group:
                raise group.exceptions[0] from group
            for task in tasks:
                self.customers.extend(task.result())
        finally:
            await w.aclose()

    # -- operations ---------------------------------------------------------------------------

    async def transfer(
        self, w: Worker, process: int, source: str, destination: str, amount: int, via: str
    ) -> TransferOp:
        key = f"chaos-{uuid.uuid4().hex}"
        op = TransferOp(process, key, source, destination, amount, self.clock())
        self.history.transfers.append(op)
        try:
            t = await w.clients[via].transfer(
                source=source,
                destination=destination,
                amount=amount,
                currency=CURRENCY,
                reference=key,
                idempotency_key=key,
            )
        except errors.OutcomeUnknown as exc:
            op.complete_t = self.clock()
            _attempts(op, exc.regions)
            op.outcome = "info"
            op.code = exc.code
            return op
        except errors.TxError as exc:
            # A definite refusal (4xx), or only "not started" answers (429/503, connection
            # refused): not applied. A refusal after an unknown attempt is still definite: the
            # key's first outcome is stored with it and every retry gets that outcome back.
            op.complete_t = self.clock()
            _attempts(op, exc.regions)
            op.outcome = "fail"
            op.code = exc.code
            return op
        op.complete_t = self.clock()
        _attempts(op, t.meta.regions)
        op.outcome = "ok"
        op.transfer_id = t.id
        op.status = t.status
        seen = _token_versions(t.meta.consistency_token)
        for acc in (source, destination):
            parsed = ids.parse_account_id(acc)
            if parsed is not None and parsed in seen:
                op.versions[acc] = seen[parsed]
        return op

    async def read(
        self, w: Worker, process: int, account: str, level: ReadLevel, via: str
    ) -> ReadOp:
        parsed = ids.parse_account_id(account)
        assert parsed is not None
        # The client sends its session's token on every read; only a session read is bound
        # by it (the checker's floor for the read).
        held = w.session.versions().get(parsed, 0) if level == "session" else 0
        op = ReadOp(process, account, level, via, self.clock(), token_version=held)
        self.history.reads.append(op)
        try:
            a = await w.clients[via].get_account(account, consistency=level, timeout=READ_TIMEOUT_S)
        except errors.TxError as exc:
            # A read changes nothing: any failure is simply a failed read.
            op.complete_t = self.clock()
            op.outcome = "fail"
            op.code = exc.code
            return op
        op.complete_t = self.clock()
        op.outcome = "ok"
        op.version = a.version
        op.balance = a.balance
        op.served_by = a.meta.served_by
        return op

    async def _worker(self, w: Worker, process: int, deadline: float, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        try:
            for _ in range(OPS_PER_CLIENT_MAX):
                if stop.is_set() or time.monotonic() >= deadline:
                    return
                # Each operation starts at a random router; the client moves on from there.
                via = rng.choice(self.regions)
                if rng.random() < self.config.read_fraction:
                    acc = rng.choice(self.customers)
                    await self.read(w, process, acc.id, rng.choice(READ_LEVELS), via)
                    continue
                src = rng.choice(self.customers)
                cross = rng.random() < self.config.cross_fraction
                pool = [
                    a for a in self.customers if a.id != src.id and (a.shard != src.shard) == cross
                ]
                dst = rng.choice(pool or [a for a in self.customers if a.id != src.id])
                amount = rng.randint(1, self.config.amount_max)
                await self.transfer(w, process, src.id, dst.id, amount, via)
        finally:
            await w.aclose()

    async def run(self, duration_s: float, stop: asyncio.Event) -> None:
        # Every worker's clients exist before the clock starts: the run is all operations.
        workers = [self.worker() for _ in range(self.config.clients)]
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(self._worker(w, i, deadline, stop) for i, w in enumerate(workers)))


def _attempts(op: TransferOp, regions: tuple[str, ...]) -> None:
    op.attempts = len(regions)
    op.via = list(regions)


def _token_versions(text: str | None) -> dict[int, int]:
    try:
        return tokens.decode(text)
    except tokens.TokenError:
        return {}
