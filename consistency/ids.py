"""Account and transfer ids, which carry their slot so routing needs only ``slot -> shard``.

An account id is a 60-bit integer: 12 bits of slot and 48 random bits. It is shown to clients
as ``acc_`` and 15 lowercase hex digits, the first three being the slot. The integer form is the
primary key in the shard database and gives the fixed, ascending lock order.

A transfer id is ``tr_`` + 3 hex digits of the *source* account's slot + 32 hex digits of a
time-ordered UUID (version 7 layout), so ``GET /v1/transfers/{id}`` finds the source shard
without a lookup and ids sort by creation time within a slot.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Final

from consistency.limits import SLOT_COUNT

_ACCOUNT_RE: Final = re.compile(r"acc_([0-9a-f]{15})")
_TRANSFER_RE: Final = re.compile(r"tr_([0-9a-f]{3})([0-9a-f]{32})")
# An account id is (slot << RANDOM_BITS) | 48 random bits: the one statement of the layout
# (txr.slot_of in sql/functions/fence.sql is its SQL twin; tests/unit/test_sql_limits checks it).
RANDOM_BITS: Final = 48
# Account ids per slot: SQL that groups ids by slot divides by this (customer ids are >= 0).
IDS_PER_SLOT: Final = 1 << RANDOM_BITS

assert SLOT_COUNT == 1 << 12, "ids reserve exactly 12 bits for the slot"


def new_account_id(slot: int) -> int:
    """A fresh account id in ``slot`` (48 random bits; a clash is retried by the caller)."""
    assert 0 <= slot < SLOT_COUNT
    rand = int.from_bytes(os.urandom(6), "big")
    return (slot << RANDOM_BITS) | rand


def account_slot(account_id: int) -> int:
    return account_id >> RANDOM_BITS


def slot_id_range(slot: int) -> tuple[int, int]:
    """``[low, high)``: the account ids of ``slot``. SQL selects a slot's rows with this range
    (``id >= low AND id < high``), so the bit layout is written here only; a negative id (a
    transit account) is in no slot's range, as it has no slot."""
    assert 0 <= slot < SLOT_COUNT
    return slot << RANDOM_BITS, (slot + 1) << RANDOM_BITS


def format_account_id(account_id: int) -> str:
    return f"acc_{account_id:015x}"


def parse_account_id(text: object) -> int | None:
    """The integer id, or None when ``text`` is not a well-formed account id."""
    if not isinstance(text, str):
        return None
    m = _ACCOUNT_RE.fullmatch(text)
    return int(m.group(1), 16) if m else None


def new_transfer_id() -> uuid.UUID:
    """A time-ordered UUID (v7 layout): 48 bits of Unix milliseconds, then randomness."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def format_transfer_id(slot: int, transfer_uuid: uuid.UUID) -> str:
    assert 0 <= slot < SLOT_COUNT
    return f"tr_{slot:03x}{transfer_uuid.hex}"


def parse_transfer_id(text: object) -> tuple[int, uuid.UUID] | None:
    """``(source slot, uuid)``, or None when ``text`` is not a well-formed transfer id."""
    if not isinstance(text, str):
        return None
    m = _TRANSFER_RE.fullmatch(text)
    if not m:
        return None
    return int(m.group(1), 16), uuid.UUID(hex=m.group(2))
