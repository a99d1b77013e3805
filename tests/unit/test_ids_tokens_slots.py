"""Pure rules: ids carry their slot, tokens merge forward, slot maps cover every slot once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consistency import ids, tokens
from consistency.errors import TopologyError
from consistency.limits import SLOT_COUNT, TOKEN_ACCOUNTS_MAX
from consistency.topology import SlotMap, SlotRange


@given(st.integers(0, SLOT_COUNT - 1))
def test_account_id_round_trips_and_keeps_its_slot(slot: int) -> None:
    acc = ids.new_account_id(slot)
    assert ids.account_slot(acc) == slot
    text = ids.format_account_id(acc)
    assert ids.parse_account_id(text) == acc
    assert acc < 2**63, "fits a PostgreSQL bigint"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        1,
        1.5,
        "",
        "acc_",
        "acc_123",
        "acc_0123456789abcdeF",
        "ACC_0123456789abcde",
        "acc_0123456789abcdef0",
        "acc_0123456789abcd\n",
        " acc_0123456789abcde",
        ["acc"],
    ],
)
def test_malformed_account_ids_are_refused(bad: object) -> None:
    assert ids.parse_account_id(bad) is None


def test_transfer_id_round_trips_and_is_time_ordered() -> None:
    a = ids.new_transfer_id()
    b = ids.new_transfer_id()
    assert a.version == 7
    assert a.bytes[:6] <= b.bytes[:6]
    text = ids.format_transfer_id(4095, a)
    assert ids.parse_transfer_id(text) == (4095, a)
    assert ids.parse_transfer_id(text.upper()) is None
    assert ids.parse_transfer_id(text[:-1]) is None


def test_token_merges_forward_and_is_bounded() -> None:
    t1 = tokens.encode({}, [(1, 5), (2, 7)])
    seen = tokens.decode(t1)
    assert seen == {1: 5, 2: 7}
    # A response carrying an older version never lowers what the client had seen.
    t2 = tokens.encode(seen, [(1, 3), (3, 1)])
    assert tokens.decode(t2) == {1: 5, 2: 7, 3: 1}
    many = tokens.encode({}, [(i, 1) for i in range(TOKEN_ACCOUNTS_MAX + 10)])
    assert len(tokens.decode(many)) == TOKEN_ACCOUNTS_MAX


@pytest.mark.parametrize("bad", ["%%%", "e30", "x" * 3000, "W1td", "eyJhIjpbWyJ4IiwxXV19"])
def test_malformed_tokens_raise(bad: str) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.decode(bad)


def test_even_slot_map_covers_every_slot_once() -> None:
    m = SlotMap.even(["a", "b", "c"])
    counts = {name: len(m.slots_of(name)) for name in "abc"}
    assert sum(counts.values()) == SLOT_COUNT
    assert max(counts.values()) - min(counts.values()) <= 1
    shard, epoch = m.lookup(SLOT_COUNT - 1)
    assert (shard, epoch) == ("c", 1)
    table, epochs = m.table()
    table[7] = "c"
    epochs[7] = 2
    moved = SlotMap.from_table(table, epochs)
    assert moved.lookup(7) == ("c", 2)
    assert moved.lookup(6) == ("a", 1)
    assert SlotMap.from_json(moved.to_json()) == moved
    # A moved slot leaves its old shard's slots and joins the new one's, in ascending order.
    for name in "abc":
        assert moved.slots_of(name) == tuple(
            i for i in range(SLOT_COUNT) if moved.lookup(i)[0] == name
        )
    assert 7 in moved.slots_of("c")
    assert 7 not in moved.slots_of("a")
    assert moved.slots_of("nobody") == ()


def test_slot_map_refuses_gaps_and_overlaps() -> None:
    with pytest.raises(TopologyError):
        SlotMap((SlotRange(0, 10, "a", 1),))
    with pytest.raises(TopologyError):
        SlotMap((SlotRange(0, SLOT_COUNT - 1, "a", 1), SlotRange(5, 5, "b", 1)))


def test_the_slot_bit_layout_is_written_in_ids_only() -> None:
    # Issue 17: nobody but consistency/ids.py shifts an account id by the slot's bit offset
    # (its SQL twin, txr.slot_of, is checked by test_sql_limits); everyone else asks ids.
    root = Path(__file__).resolve().parents[2]
    shift = re.compile(rf"(<<|>>)\s*{ids.RANDOM_BITS}\b")
    own = root / "consistency" / "ids.py"
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for top in ("consistency", "regionstore", "router", "infra", "bench", "chaos", "tests")
        for path in sorted((root / top).rglob("*.py"))
        if path != own
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if shift.search(line)
    ]
    assert offenders == []
