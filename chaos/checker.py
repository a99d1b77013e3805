"""The chaos checker: a client history against the final state of the databases (pure).

Given what the clients saw (chaos/history.py) and what the shards hold after every fault has
healed and every cross-shard transfer has settled, it counts the anomalies each guarantee of
DESIGN.md section 1 forbids:

- ``lost`` (G1): an acknowledged transfer that no shard holds.
- ``duplicated`` (G2): more than one transfer stored under one idempotency key (the workload
  sends the key as the transfer's ``reference`` too, so the stored rows name their key).
- ``failed_but_applied`` (G7): an operation the client was told certainly did not happen, stored.
  An unknown outcome (``info``) may or may not be stored: never an anomaly, as Jepsen's ``:info``.
- ``phantom``: a stored transfer of the tenant that no client ever asked for.
- ``balance_mismatches`` (G2, G4): an account whose final balance or version differs from what
  the stored transfers imply (a leg applied twice or lost shows here).
- ``conserved`` (G4): the accounts sum to minus the money in flight, and ``txr reconcile`` is
  clean; ``unsettled``: transfers still pending after the drain.
- ``below_floor`` (G3): a balance, read or final, below minus its overdraft limit.
- ``stale_reads`` (G6): a session read older than the token it sent; a strong read older than a
  write acknowledged before it began; a read served by the cache (cached, or session) older
  than a write acknowledged more than the lag bound before it began.
- ``stale_epoch_writes`` (G5): transfers stored on a shard that does not own their slot.

Never imports router, regionstore, infra or bench: the runner hands it plain data.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from chaos.history import History, ReadOp, TransferOp
from consistency.saga import TransferStatus

# Examples of each anomaly kept in the report: enough to debug, bounded for a long run.
EXAMPLES_MAX: Final = 20


class Stored(Protocol):
    """A transfer as its source shard holds it (regionstore.audit.StoredTransfer)."""

    @property
    def id(self) -> str: ...
    @property
    def reference(self) -> str | None: ...
    @property
    def source(self) -> str: ...
    @property
    def destination(self) -> str: ...
    @property
    def amount(self) -> int: ...
    @property
    def status(self) -> str: ...


@dataclass(frozen=True)
class FinalAccount:
    balance: int
    version: int


@dataclass
class FinalState:
    """What the shards hold after heal, settle and final strong reads."""

    accounts: dict[str, FinalAccount]
    transfers: list[Stored]
    # Money debited at a source and not yet credited at its destination (reconcile's figure).
    in_flight: int = 0
    reconcile_problems: list[str] = field(default_factory=list)
    foreign_slot_transfers: int = 0
    # The tenant's events as the pull API returned them from the start (None: not read), and
    # the event ids the test webhook receiver got (at least once: repeats are fine there).
    events: list[dict[str, Any]] | None = None
    delivered: set[str] | None = None


@dataclass
class CheckResult:
    ops: int = 0
    transfers: int = 0
    reads: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    unknown_applied: int = 0
    lost: int = 0
    duplicated: int = 0
    failed_but_applied: int = 0
    phantom: int = 0
    balance_mismatches: int = 0
    unsettled: int = 0
    unexpected_reversals: int = 0
    conserved: bool = True
    total_balance: int = 0
    in_flight: int = 0
    below_floor: int = 0
    stale_reads: int = 0
    stale_reads_by_level: dict[str, int] = field(default_factory=dict)
    stale_epoch_writes: int = 0
    # Events (router.events): a stored transfer whose final state has no event, an event of a
    # transfer no shard holds (refused or never committed), an id twice in the stream, and an
    # event of the stream the webhook receiver never got.
    events: int = 0
    events_missing: int = 0
    events_phantom: int = 0
    events_repeated: int = 0
    # Events of one account stored against its commit order, as far as the stream itself
    # shows it: a transfer's final state before its pending, or a transfer of an account before
    # that account's account.created.
    events_out_of_order: int = 0
    webhook_undelivered: int = 0
    anomalies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.conserved
            and not self.lost
            and not self.duplicated
            and not self.failed_but_applied
            and not self.phantom
            and not self.balance_mismatches
            and not self.unsettled
            and not self.unexpected_reversals
            and not self.below_floor
            and not self.stale_reads
            and not self.stale_epoch_writes
            and not self.events_missing
            and not self.events_phantom
            and not self.events_repeated
            and not self.events_out_of_order
            and not self.webhook_undelivered
        )

    def note(self, text: str) -> None:
        if len(self.anomalies) < EXAMPLES_MAX:
            self.anomalies.append(text)


def check(history: History, final: FinalState, *, cached_bound_s: float) -> CheckResult:
    r = CheckResult(ops=history.ops(), transfers=len(history.transfers), reads=len(history.reads))
    _check_transfers(history, final, r)
    _check_balances(history, final, r)
    _check_reads(history, cached_bound_s, r)
    if final.events is not None:
        check_events(final, r)
    r.stale_epoch_writes = final.foreign_slot_transfers
    if final.foreign_slot_transfers:
        r.note(f"{final.foreign_slot_transfers} transfers stored on a shard not owning the slot")
    return r


# The event type router.events.model derives for a transfer in each state.
_FINAL_EVENT: Final[dict[str, str]] = {s: f"transfer.{s.value}" for s in TransferStatus}


def check_events(final: FinalState, r: CheckResult) -> None:
    """The event stream against the stored transfers (and the receiver against the stream)."""
    events = final.events or []
    r.events = len(events)
    seen: set[str] = set()
    by_transfer: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e["id"] in seen:
            r.events_repeated += 1
            r.note(f"event repeated in the stream: {e['id']} ({e['type']})")
        seen.add(e["id"])
        if str(e["type"]).startswith("transfer."):
            by_transfer[str(e["data"]["id"])].add(str(e["type"]))
    stored = {t.id: t for t in final.transfers}
    for t in final.transfers:
        want = _FINAL_EVENT.get(t.status)
        if want is not None and want not in by_transfer.get(t.id, set()):
            r.events_missing += 1
            r.note(f"no {want} event for stored transfer {t.id}")
    for tid, types in by_transfer.items():
        if tid not in stored:
            r.events_phantom += len(types)
            r.note(f"events {sorted(types)} for transfer {tid}, which no shard holds")
    _check_event_order(events, r)
    if final.delivered is not None:
        missing = seen - final.delivered
        r.webhook_undelivered = len(missing)
        if missing:
            r.note(f"{len(missing)} events never delivered to the webhook, e.g. {min(missing)}")


def _check_event_order(events: list[dict[str, Any]], r: CheckResult) -> None:
    opened: dict[str, int] = {}
    pending: dict[str, int] = {}
    for i, e in enumerate(events):
        data = e["data"]
        if e["type"] == "account.created":
            opened.setdefault(str(data["id"]), i)
        elif e["type"] == "transfer.pending":
            pending.setdefault(str(data["id"]), i)
    for i, e in enumerate(events):
        data, etype = e["data"], str(e["type"])
        if not etype.startswith("transfer."):
            continue
        tid = str(data["id"])
        if etype != "transfer.pending" and pending.get(tid, -1) > i:
            r.events_out_of_order += 1
            r.note(f"{etype} of {tid} stored before its transfer.pending")
        for acc in (data.get("source"), data.get("destination")):
            if acc is not None and opened.get(str(acc), -1) > i:
                r.events_out_of_order += 1
                r.note(f"{etype} of {tid} stored before account.created of {acc}")


def _check_transfers(history: History, final: FinalState, r: CheckResult) -> None:
    by_key: dict[str, TransferOp] = {op.key: op for op in history.transfers}
    stored_by_key: dict[str | None, list[Stored]] = defaultdict(list)
    for t in final.transfers:
        stored_by_key[t.reference].append(t)
    stored_ids = {t.id for t in final.transfers}

    for op in history.transfers:
        if op.outcome == "ok":
            r.acked += 1
            if op.transfer_id not in stored_ids:
                r.lost += 1
                r.note(f"lost: {op.key} acked as {op.transfer_id}, not stored on any shard")
        elif op.outcome == "fail":
            r.failed += 1
            if stored_by_key.get(op.key):
                r.failed_but_applied += 1
                r.note(f"failed but applied: {op.key} answered {op.code}, yet stored")
        else:
            r.unknown += 1
            if stored_by_key.get(op.key):
                r.unknown_applied += 1

    for key, rows in stored_by_key.items():
        if key is None or key not in by_key:
            r.phantom += len(rows)
            r.note(f"phantom: {[t.id for t in rows]} stored under unknown key {key!r}")
            continue
        if len(rows) > 1:
            r.duplicated += len(rows) - 1
            r.note(f"duplicated: key {key} stored {len(rows)} times: {[t.id for t in rows]}")
        for t in rows:
            if t.status == TransferStatus.PENDING:
                r.unsettled += 1
                r.note(f"unsettled: {t.id} still pending after the drain")
            elif t.status == TransferStatus.REVERSED:
                # Every destination of the workload exists and takes the currency: a
                # reversal means leg 2 was refused for no reason.
                r.unexpected_reversals += 1
                r.note(f"reversed: {t.id} was reversed although its destination accepts it")


def _check_balances(history: History, final: FinalState, r: CheckResult) -> None:
    # What the stored transfers imply for each account: the balance, and the version (one
    # ledger entry per leg that touches it, starting at 1).
    balance: dict[str, int] = defaultdict(int)
    version: dict[str, int] = defaultdict(lambda: 1)
    for t in final.transfers:
        if t.status == TransferStatus.REVERSED:
            version[t.source] += 2
            continue
        balance[t.source] -= t.amount
        version[t.source] += 1
        if t.status == TransferStatus.SETTLED:
            balance[t.destination] += t.amount
            version[t.destination] += 1

    total = 0
    for acc_id, acc in history.accounts.items():
        got = final.accounts.get(acc_id)
        if got is None:
            r.balance_mismatches += 1
            r.note(f"account {acc_id} missing from the final reads")
            continue
        total += got.balance
        if got.balance != balance[acc_id] or got.version != version[acc_id]:
            r.balance_mismatches += 1
            r.note(
                f"account {acc_id}: balance {got.balance} version {got.version}, stored "
                f"transfers imply {balance[acc_id]} / {version[acc_id]}"
            )
        if got.balance < -acc.overdraft_limit:
            r.below_floor += 1
            r.note(f"below floor: {acc_id} ends at {got.balance}")

    r.total_balance = total
    r.in_flight = final.in_flight
    r.conserved = total + final.in_flight == 0 and not final.reconcile_problems
    if total + final.in_flight != 0:
        r.note(f"not conserved: accounts sum to {total} with {final.in_flight} in flight")
    for p in final.reconcile_problems[:EXAMPLES_MAX]:
        r.note(f"reconcile: {p}")


class _AckedVersions:
    """Per account, the versions acknowledged by ok transfers, by completion time."""

    def __init__(self, ops: Iterable[TransferOp]) -> None:
        points: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for op in ops:
            if op.outcome == "ok":
                for acc, ver in op.versions.items():
                    points[acc].append((op.complete_t, ver))
        self._times: dict[str, list[float]] = {}
        self._max: dict[str, list[int]] = {}
        for acc, pts in points.items():
            pts.sort()
            self._times[acc] = [t for t, _ in pts]
            running, out = 0, []
            for _, v in pts:
                running = max(running, v)
                out.append(running)
            self._max[acc] = out

    def before(self, account: str, t: float) -> int:
        """The highest version of ``account`` acknowledged strictly before ``t`` (0: none)."""
        times = self._times.get(account)
        if not times:
            return 0
        i = bisect.bisect_left(times, t)
        return self._max[account][i - 1] if i else 0


def _check_reads(history: History, cached_bound_s: float, r: CheckResult) -> None:
    acked = _AckedVersions(history.transfers)
    stale: dict[str, int] = defaultdict(int)
    for op in history.reads:
        if op.outcome != "ok" or op.version is None:
            continue
        acc = history.accounts.get(op.account)
        if acc is not None and op.balance is not None and op.balance < -acc.overdraft_limit:
            r.below_floor += 1
            r.note(f"below floor: read of {op.account} saw {op.balance}")
        floor = _required_version(op, acked, cached_bound_s)
        if op.version < floor:
            stale[op.level] += 1
            r.note(
                f"stale {op.level} read of {op.account} via {op.via} at {op.invoke_t:.3f}s: "
                f"version {op.version} < {floor} ({op.served_by})"
            )
    r.stale_reads_by_level = dict(stale)
    r.stale_reads = sum(stale.values())


def _required_version(op: ReadOp, acked: _AckedVersions, cached_bound_s: float) -> int:
    """The oldest version ``op`` may return: a strong read is linearizable; a session read is
    at least its token; whatever the cache serves is within the lag bound."""
    if op.level == "strong":
        return acked.before(op.account, op.invoke_t)
    floor = acked.before(op.account, op.invoke_t - cached_bound_s)
    if op.level == "session":
        served_by_cache = (op.served_by or "").endswith("/cache")
        return max(op.token_version, floor if served_by_cache else 0)
    return floor
