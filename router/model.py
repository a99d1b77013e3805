"""Domain values of the request path: what a handler hands to the write path and gets back.

msgspec Structs, not frozen dataclasses: several are built per transfer, and a Struct costs a
fraction of a frozen dataclass's ``__init__`` (issue 11). Nothing here knows about HTTP.
"""

from __future__ import annotations

import msgspec

from consistency.topology import Shard
from regionstore.store import TransferResult


class TransferRequest(msgspec.Struct, frozen=True, gc=False):
    """One validated transfer as the client asked for it (account ids as integers)."""

    source: int
    destination: int
    amount: int
    currency: str
    reference: str | None


class PostedTransfer(msgspec.Struct, frozen=True):
    """The store's answer for one transfer, with where it was posted."""

    result: TransferResult
    shard: Shard
    source_slot: int
    # Set for a cross-shard transfer: the shard of the destination at leg 1.
    destination_shard: str | None = None
