"""consistency.reconcile on hand-made snapshots: clean passes, each anomaly is reported."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from consistency.reconcile import reconcile, summarize

Snap = dict[str, Any]


def clean() -> dict[str, Snap]:
    """A pair of shards: t1 A->B settled, t2 A->B in flight (not yet applied), t3 A->B applied
    but not yet marked at A, t4 B->A reversed (refused at A). Every rule holds."""
    a: Snap = {
        "totals": {"EUR": 0},
        "balance_mismatches": [],
        "version_mismatches": [],
        "unbalanced_postings": [],
        "leg_violations": [],
        # t1 (100, settled) + t2 (20, pending) + t3 (5, pending) credited A's transit to B.
        "transit": {"b": {"EUR": 125}},
        "outbox": [
            {
                "transfer_id": "t1",
                "destination_shard": "b",
                "amount": 100,
                "currency": "EUR",
                "state": "settled",
            },
            {
                "transfer_id": "t2",
                "destination_shard": "b",
                "amount": 20,
                "currency": "EUR",
                "state": "pending",
            },
            {
                "transfer_id": "t3",
                "destination_shard": "b",
                "amount": 5,
                "currency": "EUR",
                "state": "pending",
            },
        ],
        "inbox": [
            {
                "transfer_id": "t4",
                "source_shard": "b",
                "result": "not_found",
                "amount": 7,
                "currency": "EUR",
            }
        ],
    }
    b: Snap = {
        "totals": {"EUR": 0},
        "balance_mismatches": [],
        "version_mismatches": [],
        "unbalanced_postings": [],
        "leg_violations": [],
        # t1 and t3 debited B's transit from A; t4 (7) was posted and reversed: net 0.
        "transit": {"a": {"EUR": -105}},
        "outbox": [
            {
                "transfer_id": "t4",
                "destination_shard": "a",
                "amount": 7,
                "currency": "EUR",
                "state": "reversed",
            },
        ],
        "inbox": [
            {
                "transfer_id": "t1",
                "source_shard": "a",
                "result": "applied",
                "amount": 100,
                "currency": "EUR",
            },
            {
                "transfer_id": "t3",
                "source_shard": "a",
                "result": "applied",
                "amount": 5,
                "currency": "EUR",
            },
        ],
    }
    return {"a": a, "b": b}


def test_clean_snapshots_pass() -> None:
    assert reconcile(clean()) == []


def test_empty_and_single_shard_pass() -> None:
    assert reconcile({}) == []
    only = clean()["a"]
    only["transit"] = {}
    only["outbox"] = []
    only["inbox"] = []
    assert reconcile({"a": only}) == []


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Snap]], None]:
    def mutate(s: dict[str, Snap]) -> None:
        node: Any = s
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop_inbox(shard: str, tid: str) -> Callable[[dict[str, Snap]], None]:
    def mutate(s: dict[str, Snap]) -> None:
        s[shard]["inbox"] = [r for r in s[shard]["inbox"] if r["transfer_id"] != tid]

    return mutate


def _append(shard: str, key: str, row: dict[str, Any]) -> Callable[[dict[str, Snap]], None]:
    def mutate(s: dict[str, Snap]) -> None:
        s[shard][key].append(row)

    return mutate


def _result(shard: str, tid: str, result: str) -> Callable[[dict[str, Snap]], None]:
    def mutate(s: dict[str, Snap]) -> None:
        for r in s[shard]["inbox"]:
            if r["transfer_id"] == tid:
                r["result"] = result

    return mutate


def _inbox_row(tid: str, source: str, result: str, amount: int) -> dict[str, Any]:
    return {
        "transfer_id": tid,
        "source_shard": source,
        "result": result,
        "amount": amount,
        "currency": "EUR",
    }


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        # Within a shard.
        (_set(["a", "totals", "EUR"], 3), "a: EUR balances sum to 3"),
        (_append("a", "balance_mismatches", {"account_id": 1}), "a: account balance"),
        (_append("b", "version_mismatches", {"account_id": 2}), "b: account version"),
        (_append("a", "unbalanced_postings", {"transfer_id": "x", "sum": 3}), "posting does not"),
        (_append("a", "leg_violations", {"transfer_id": "t4"}), "cross-shard leg entries"),
        # Transit accounts do not net to the money in flight (money created or lost).
        (_set(["a", "transit", "b", "EUR"], 126), "a<->b: EUR transit accounts net 21"),
        (_set(["b", "transit", "a", "EUR"], -100), "a<->b: EUR transit accounts net 25"),
        # A leg 2 applied twice would debit B's transit twice: caught the same way.
        (_set(["b", "transit", "a", "EUR"], -110), "but 20 is in flight"),
        # Settled without an applied inbox row, or refused although settled.
        (_drop_inbox("b", "t1"), "settled transfer t1 has no inbox row (sent to b)"),
        (_result("b", "t1", "not_found"), "settled transfer t1 was refused at b"),
        # Reversed although the destination applied it (money both returned and delivered).
        (_result("a", "t4", "applied"), "reversed transfer t4 was applied at a"),
        (_drop_inbox("a", "t4"), "reversed transfer t4 has no inbox row (sent to a)"),
        # An inbox row the source never sent.
        (
            _append("b", "inbox", _inbox_row("t9", "a", "applied", 0)),
            "b: inbox row t9 has no outbox row (sent by a)",
        ),
        (
            _append("b", "inbox", _inbox_row("t9", "z", "applied", 0)),
            "inbox row t9 from unknown shard z",
        ),
        # Transit toward a shard nobody snapshotted.
        (_set(["a", "transit", "z"], {"EUR": 5}), "transit toward z holds EUR 5"),
    ],
)
def test_each_anomaly_is_reported(mutate: Callable[[dict[str, Snap]], None], expect: str) -> None:
    snaps = copy.deepcopy(clean())
    mutate(snaps)
    problems = reconcile(snaps)
    assert any(expect in p for p in problems), problems


def test_in_flight_is_per_currency() -> None:
    snaps = clean()
    # The same amounts in USD on one side only: the EUR pair still balances, USD does not.
    snaps["a"]["transit"]["b"]["USD"] = 20
    problems = reconcile(snaps)
    assert problems == ["a<->b: USD transit accounts net 20 but 0 is in flight"]


def test_summarize() -> None:
    got = summarize(clean())
    assert got["a"] == {
        "accounts": 0,
        "pending": 2,
        "in_flight": 25,
        "inbox": 1,
        "sums": {"EUR": 0},
    }
    assert got["b"]["pending"] == 0


def _out(tid: str, dst: str, amount: int, state: str, **kw: str) -> dict[str, Any]:
    return {
        "transfer_id": tid,
        "destination_shard": dst,
        "amount": amount,
        "currency": "EUR",
        "state": state,
        **kw,
    }


def _snap(**kw: Any) -> Snap:
    base: Snap = {
        "totals": {"EUR": 0},
        "balance_mismatches": [],
        "version_mismatches": [],
        "unbalanced_postings": [],
        "leg_violations": [],
        "transit": {},
        "outbox": [],
        "inbox": [],
        "owned_slots": [],
        "account_slots": [],
        "moves": [],
    }
    base.update(kw)
    return base


def moved() -> dict[str, Snap]:
    """Slot 5 (account c, balance 90) moved s -> t by move m1. Before it: p1 funded c with 100
    from f (slot 1, stays on s); c sent y (10) to a, settled. After it: x (30) from a named s
    for c was applied by t and settled at a with its credit moved to a's transit toward t."""
    s = _snap(
        # f -100, transit toward a +10 (y), transit toward t +90 (the move).
        transit={"a": {"EUR": 10}, "t": {"EUR": 90}},
        unbalanced_postings=[
            {"transfer_id": "p1", "sum": -100},
            {"transfer_id": "y", "sum": 10},
            {"transfer_id": "m1", "sum": 90},
        ],
        owned_slots=[1],
        account_slots=[1],
        moves=[
            {
                "move_id": "m1",
                "direction": "out",
                "slot": 5,
                "epoch": 2,
                "peer_shard": "t",
                "amounts": {"EUR": 90},
            }
        ],
    )
    t = _snap(
        # c 120, transit toward s -90 (the move), toward a -30 (x).
        transit={"s": {"EUR": -90}, "a": {"EUR": -30}},
        unbalanced_postings=[
            {"transfer_id": "p1", "sum": 100},
            {"transfer_id": "y", "sum": -10},
            {"transfer_id": "m1", "sum": -90},
        ],
        outbox=[_out("y", "a", 10, "settled", credit_shard="s")],
        inbox=[_inbox_row("x", "a", "applied", 30)],
        owned_slots=[5],
        account_slots=[5],
        moves=[
            {
                "move_id": "m1",
                "direction": "in",
                "slot": 5,
                "epoch": 2,
                "peer_shard": "s",
                "amounts": {"EUR": 90},
            }
        ],
    )
    a = _snap(
        # d 10, e -30, transit toward s -10 (y) +30 -30 (x rerouted), toward t +30.
        transit={"s": {"EUR": -10}, "t": {"EUR": 30}},
        outbox=[_out("x", "t", 30, "settled", rerouted_from="s")],
        inbox=[_inbox_row("y", "s", "applied", 10)],
        owned_slots=[9],
        account_slots=[9],
    )
    return {"s": s, "t": t, "a": a}


def test_a_finished_move_and_a_rerouted_leg_2_pass() -> None:
    assert reconcile(moved()) == []


def test_half_done_move_is_named_with_its_fix() -> None:
    snaps = moved()
    # The source has not posted its half yet: it still holds c and the entries.
    snaps["s"]["moves"] = []
    snaps["s"]["transit"]["t"] = {"EUR": 0}
    snaps["s"]["account_slots"] = [1, 5]
    problems = reconcile(snaps)
    assert any("txr rehome --slot 5 --to t" in p for p in problems), problems
    assert not any("accounts on" in p for p in problems), problems


def test_leg_2_on_a_new_owner_without_the_reroute_is_caught() -> None:
    snaps = moved()
    snaps["a"]["transit"] = {"s": {"EUR": 20}}
    snaps["a"]["outbox"] = [_out("x", "s", 30, "settled")]
    problems = reconcile(snaps)
    assert "a: settled transfer x credits transit toward s but t debited it" in problems
    # a's transit toward s keeps 30 that nothing owes, t's toward a lacks it.
    assert "a<->s: EUR transit accounts net 30 but 0 is in flight" in problems, problems


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (_append("s", "outbox", _out("y", "a", 10, "settled")), "transfer y has outbox rows on"),
        (_append("s", "inbox", _inbox_row("x", "a", "applied", 30)), "has inbox rows on s and t"),
        (_set(["s", "account_slots"], [1, 5]), "slot 5: accounts on s, t"),
        (_set(["s", "owned_slots"], [1, 5]), "slot 5 is owned by s, t"),
        (_set(["t", "account_slots"], [5, 7]), "slot 7: accounts on t, which does not own it"),
        # A moved balance that vanished on the way: the halves and the pair disagree.
        (_set(["t", "moves", 0, "amounts"], {"EUR": 80}), "its halves disagree"),
        (_set(["t", "unbalanced_postings", 0, "sum"], 99), "posting does not sum to zero: p1"),
        # A final row that moved lost the name of the shard holding its transit credit.
        (_set(["t", "outbox", 0, "credit_shard"], None), "credited to transit on t but a"),
    ],
)
def test_move_anomalies_are_reported(
    mutate: Callable[[dict[str, Snap]], None], expect: str
) -> None:
    snaps = copy.deepcopy(moved())
    mutate(snaps)
    problems = reconcile(snaps)
    assert any(expect in p for p in problems), problems


def test_leg_2_on_the_senders_own_shard() -> None:
    """a sent z (4) named s for an account whose slot then moved to a: leg 2 debited a's
    transit toward itself, the settle moved the credit there: every transit account is 0."""
    snaps = moved()
    a = snaps["a"]
    a["transit"]["a"] = {"EUR": -4}
    a["transit"]["s"] = {"EUR": -10 + 4}
    a["outbox"].append(_out("z", "s", 4, "pending"))
    a["inbox"].append(_inbox_row("z", "a", "applied", 4))
    assert reconcile(snaps) == []
    a["transit"]["a"] = {"EUR": -8}  # applied twice
    assert reconcile(snaps) == ["a: EUR transit toward itself holds -8 but -4 is in flight"]
