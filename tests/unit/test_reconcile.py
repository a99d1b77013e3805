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
        "inbox": [{"transfer_id": "t4", "source_shard": "b", "result": "not_found"}],
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
            {"transfer_id": "t1", "source_shard": "a", "result": "applied"},
            {"transfer_id": "t3", "source_shard": "a", "result": "applied"},
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


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        # Within a shard.
        (_set(["a", "totals", "EUR"], 3), "a: EUR balances sum to 3"),
        (_append("a", "balance_mismatches", {"account_id": 1}), "a: account balance"),
        (_append("b", "version_mismatches", {"account_id": 2}), "b: account version"),
        (_append("a", "unbalanced_postings", {"transfer_id": "x"}), "posting does not sum"),
        (_append("a", "leg_violations", {"transfer_id": "t4"}), "cross-shard leg entries"),
        # Transit accounts do not net to the money in flight (money created or lost).
        (_set(["a", "transit", "b", "EUR"], 126), "a<->b: EUR transit accounts net 21"),
        (_set(["b", "transit", "a", "EUR"], -100), "a<->b: EUR transit accounts net 25"),
        # A leg 2 applied twice would debit B's transit twice: caught the same way.
        (_set(["b", "transit", "a", "EUR"], -110), "but 20 is in flight"),
        # Settled without an applied inbox row, or refused although settled.
        (_drop_inbox("b", "t1"), "settled transfer t1 has no inbox row at b"),
        (_result("b", "t1", "not_found"), "settled transfer t1 was refused at b"),
        # Reversed although the destination applied it (money both returned and delivered).
        (_result("a", "t4", "applied"), "reversed transfer t4 was applied at a"),
        (_drop_inbox("a", "t4"), "reversed transfer t4 has no inbox row at a"),
        # An inbox row the source never sent.
        (
            _append("b", "inbox", {"transfer_id": "t9", "source_shard": "a", "result": "applied"}),
            "b: inbox row t9 has no outbox row at a",
        ),
        (
            _append("b", "inbox", {"transfer_id": "t9", "source_shard": "z", "result": "applied"}),
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
