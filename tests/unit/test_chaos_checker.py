"""The chaos checker on hand-made histories: a clean one passes, and each anomaly is caught.

Each case starts from one consistent history and final state (two accounts funded from a
funding account, one same-shard and one cross-shard transfer, reads at every level) and breaks
exactly one thing, so a checker that passes everything fails here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from chaos.checker import CheckResult, FinalAccount, FinalState, check
from chaos.history import Account, History, ReadOp, TransferOp
from regionstore.audit import StoredTransfer
from router.events.model import event_id

BOUND_S = 1.0
FUND, A, B = "acc_000000000000001", "acc_001000000000002", "acc_002000000000003"


def _t(key: str, src: str, dst: str, amount: int, tid: str, at: float) -> TransferOp:
    return TransferOp(
        process=0,
        key=key,
        source=src,
        destination=dst,
        amount=amount,
        invoke_t=at,
        complete_t=at + 0.01,
        outcome="ok",
        transfer_id=tid,
        status="settled",
        attempts=1,
    )


def _stored(op: TransferOp, status: str = "settled") -> StoredTransfer:
    assert op.transfer_id is not None
    return StoredTransfer(op.transfer_id, op.key, op.source, op.destination, op.amount, status, "s")


def _world() -> tuple[History, FinalState]:
    h = History(tenant="t")
    h.accounts = {
        FUND: Account(FUND, "r1", "s1", 10**15, funding=True),
        A: Account(A, "r1", "s1", 0),
        B: Account(B, "r2", "s2", 0),
    }
    fund_a = _t("k1", FUND, A, 100, "tr_1", 0.0)
    fund_a.versions = {FUND: 2, A: 2}
    a_b = _t("k2", A, B, 30, "tr_2", 1.0)
    a_b.versions = {A: 3, B: 2}
    refused = dataclasses.replace(
        _t("k3", B, A, 500, "x", 2.0), outcome="fail", transfer_id=None, code="insufficient_funds"
    )
    unknown = dataclasses.replace(
        _t("k4", A, B, 5, "x", 3.0), outcome="info", transfer_id=None, code="outcome_unknown"
    )
    h.transfers = [fund_a, a_b, refused, unknown]
    h.reads = [
        ReadOp(1, A, "strong", "r1", 1.5, complete_t=1.6, outcome="ok", version=3, balance=70),
        ReadOp(
            1,
            A,
            "session",
            "r2",
            1.7,
            token_version=3,
            complete_t=1.8,
            outcome="ok",
            version=3,
            balance=70,
        ),
        # Cached, within the lag bound of the last write to A: an older version is allowed.
        ReadOp(2, A, "cached", "r2", 1.2, complete_t=1.3, outcome="ok", version=2, balance=100),
    ]
    final = FinalState(
        accounts={
            FUND: FinalAccount(-100, 2),
            A: FinalAccount(70, 3),
            B: FinalAccount(30, 2),
        },
        transfers=[_stored(fund_a), _stored(a_b)],
    )
    return h, final


def _run(h: History, f: FinalState) -> CheckResult:
    return check(h, f, cached_bound_s=BOUND_S)


def test_a_consistent_history_passes() -> None:
    r = _run(*_world())
    assert r.ok, r.anomalies
    assert (r.acked, r.failed, r.unknown, r.reads) == (2, 1, 1, 3)
    assert r.total_balance == 0


def test_unknown_outcome_may_have_happened() -> None:
    h, f = _world()
    unknown = h.transfers[3]
    f.transfers.append(StoredTransfer("tr_4", unknown.key, A, B, 5, "settled", "s2"))
    f.accounts[A] = FinalAccount(65, 4)
    f.accounts[B] = FinalAccount(35, 3)
    r = _run(h, f)
    assert r.ok, r.anomalies
    assert r.unknown_applied == 1


def _break(mutate: Callable[[History, FinalState], None]) -> CheckResult:
    h, f = _world()
    mutate(h, f)
    r = _run(h, f)
    assert not r.ok
    return r


def test_lost_ack() -> None:
    def lose(h: History, f: FinalState) -> None:
        f.transfers = [t for t in f.transfers if t.id != "tr_2"]
        f.accounts[A] = FinalAccount(100, 2)
        f.accounts[B] = FinalAccount(0, 1)

    r = _break(lose)
    assert r.lost == 1
    assert r.balance_mismatches == 0


def test_double_apply_of_one_key() -> None:
    def dup(h: History, f: FinalState) -> None:
        f.transfers.append(StoredTransfer("tr_2b", "k2", A, B, 30, "settled", "s1"))
        f.accounts[A] = FinalAccount(40, 4)
        f.accounts[B] = FinalAccount(60, 3)

    assert _break(dup).duplicated == 1


def test_leg_applied_twice_shows_as_a_balance_mismatch() -> None:
    def twice(h: History, f: FinalState) -> None:
        # The inbox let leg 2 in twice: the destination got 30 more than stored transfers say.
        f.accounts[B] = FinalAccount(60, 3)

    r = _break(twice)
    assert r.balance_mismatches == 1
    assert not r.conserved


def test_failed_but_applied() -> None:
    def applied(h: History, f: FinalState) -> None:
        f.transfers.append(StoredTransfer("tr_3", "k3", B, A, 500, "settled", "s2"))

    assert _break(applied).failed_but_applied == 1


def test_phantom_transfer() -> None:
    def phantom(h: History, f: FinalState) -> None:
        f.transfers.append(StoredTransfer("tr_9", "never-sent", A, B, 1, "settled", "s1"))

    assert _break(phantom).phantom == 1


def test_broken_total() -> None:
    def mint(h: History, f: FinalState) -> None:
        f.accounts[FUND] = FinalAccount(-90, 2)

    r = _break(mint)
    assert not r.conserved
    assert r.total_balance == 10


def test_reconcile_discrepancy_breaks_conservation() -> None:
    def transit(h: History, f: FinalState) -> None:
        f.reconcile_problems = ["s1/s2: transit accounts net to 5, 0 in flight"]

    assert not _break(transit).conserved


def test_money_in_flight_is_counted() -> None:
    h, f = _world()
    f.transfers[1] = dataclasses.replace(f.transfers[1], status="pending")
    f.accounts[B] = FinalAccount(0, 1)
    f.in_flight = 30
    r = _run(h, f)
    assert r.conserved
    # ...but a transfer still pending after the drain is an anomaly of its own.
    assert r.unsettled == 1
    assert not r.ok


def test_below_floor() -> None:
    def overdraw(h: History, f: FinalState) -> None:
        h.reads.append(
            ReadOp(3, A, "strong", "r1", 4.0, complete_t=4.1, outcome="ok", version=3, balance=-1)
        )

    assert _break(overdraw).below_floor == 1


@pytest.mark.parametrize(
    ("level", "invoke_t", "token_version", "version"),
    [
        # A session read older than the token it sent.
        ("session", 1.7, 3, 2),
        # A strong read that misses a write acknowledged before it began.
        ("strong", 1.5, 0, 2),
        # A cached read older than a write acknowledged longer than the bound before it.
        ("cached", 1.01 + BOUND_S + 0.1, 0, 2),
    ],
)
def test_stale_read(level: str, invoke_t: float, token_version: int, version: int) -> None:
    def stale(h: History, f: FinalState) -> None:
        h.reads.append(
            ReadOp(
                4,
                A,
                level,
                "r2",
                invoke_t,  # type: ignore[arg-type]
                token_version=token_version,
                complete_t=invoke_t + 0.1,
                outcome="ok",
                version=version,
                balance=100,
            )
        )

    r = _break(stale)
    assert r.stale_reads == 1
    assert r.stale_reads_by_level == {level: 1}


def test_unexpected_reversal() -> None:
    def reverse(h: History, f: FinalState) -> None:
        f.transfers[1] = dataclasses.replace(f.transfers[1], status="reversed")
        f.accounts[A] = FinalAccount(100, 4)
        f.accounts[B] = FinalAccount(0, 1)

    r = _break(reverse)
    assert r.unexpected_reversals == 1
    assert r.balance_mismatches == 0


def test_write_on_a_shard_that_does_not_own_the_slot() -> None:
    def foreign(h: History, f: FinalState) -> None:
        f.foreign_slot_transfers = 1

    assert _break(foreign).stale_epoch_writes == 1


def test_history_events_pair_invoke_and_completion() -> None:
    h, _ = _world()
    events = list(h.events())
    assert len(events) == 2 * h.ops()
    assert [e["type"] for e in events[:2]] == ["invoke", "ok"]
    times = [e["invoke_t"] if e["type"] == "invoke" else e["complete_t"] for e in events]
    assert times == sorted(times)


@pytest.mark.parametrize(("served_by", "stale"), [("r2/cache", True), ("r2/standby", False)])
def test_session_read_from_the_cache_is_bounded_by_the_lag_bound(
    served_by: str, stale: bool
) -> None:
    """A session read that meets its (old) token is still a cached read when the cache served
    it: older than a write acknowledged more than the bound before, it is stale."""
    h, f = _world()
    h.reads.append(
        ReadOp(
            5,
            A,
            "session",
            "r2",
            1.01 + BOUND_S + 0.1,
            token_version=2,
            complete_t=2.3,
            outcome="ok",
            version=2,
            balance=100,
            served_by=served_by,
        )
    )
    r = _run(h, f)
    assert r.stale_reads == (1 if stale else 0), r.anomalies


# -- events (router.events): the stream and the webhook receiver against the stored transfers


def _ev(etype: str, obj: str) -> dict[str, object]:

    return {"id": event_id(etype, obj), "type": etype, "created_at": "t", "data": {"id": obj}}


def _with_events() -> tuple[History, FinalState]:
    h, f = _world()
    f.events = [
        _ev("account.created", FUND),
        _ev("transfer.settled", "tr_1"),
        _ev("transfer.pending", "tr_2"),
        _ev("transfer.settled", "tr_2"),
    ]
    f.delivered = {str(e["id"]) for e in f.events}
    return h, f


def test_events_consistent_with_the_shards_pass() -> None:
    r = _run(*_with_events())
    assert r.ok, r.anomalies
    assert r.events == 4


def test_a_committed_transfer_without_its_final_event_is_caught() -> None:
    h, f = _with_events()
    assert f.events is not None
    f.events = [e for e in f.events if e["id"] != _ev("transfer.settled", "tr_2")["id"]]
    r = _run(h, f)
    assert not r.ok
    assert r.events_missing == 1


def test_an_event_of_a_transfer_no_shard_holds_is_caught() -> None:
    h, f = _with_events()
    assert f.events is not None
    assert f.delivered is not None
    f.events.append(_ev("transfer.settled", "tr_refused"))
    f.delivered.add(str(f.events[-1]["id"]))
    r = _run(h, f)
    assert not r.ok
    assert r.events_phantom == 1


def test_a_repeated_event_id_and_an_undelivered_event_are_caught() -> None:
    h, f = _with_events()
    assert f.events is not None
    assert f.delivered is not None
    f.events.append(dict(f.events[1]))
    r = _run(h, f)
    assert r.events_repeated == 1
    assert not r.ok
    h, f = _with_events()
    assert f.delivered is not None
    f.delivered.discard(str(_ev("account.created", FUND)["id"]))
    r = _run(h, f)
    assert r.webhook_undelivered == 1
    assert not r.ok


def test_events_stored_against_their_accounts_commit_order_are_caught() -> None:
    h, f = _with_events()
    assert f.events is not None
    # tr_2's settle before its pending.
    f.events[2], f.events[3] = f.events[3], f.events[2]
    r = _run(h, f)
    assert not r.ok
    assert r.events_out_of_order == 1
    h, f = _with_events()
    assert f.events is not None
    # A transfer of FUND before FUND's account.created.
    f.events[1] = {**f.events[1], "data": {"id": "tr_1", "source": FUND, "destination": "x"}}
    f.events[0], f.events[1] = f.events[1], f.events[0]
    r = _run(h, f)
    assert r.events_out_of_order == 1
    h, f = _with_events()
    r = _run(h, f)
    assert r.events_out_of_order == 0
