"""The states of a transfer (DESIGN.md section 6), one vocabulary for every package.

A same-shard transfer is ``settled`` when it commits. A cross-shard one is ``pending`` from
leg 1 (debit + transit credit + outbox message) until leg 2 lands (``settled``) or the
destination refuses and the source posts the reversal (``reversed``). The shard's schema allows
exactly these three (migration 0001's CHECK), the outbox rows carry the same words as their
``state``, and the API answers them as ``status``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class TransferStatus(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    REVERSED = "reversed"


# The final states: a transfer in one never changes again.
FINAL_STATUSES: Final = frozenset({TransferStatus.SETTLED, TransferStatus.REVERSED})
# By stored value, for readers of rows (a dict lookup, cheaper than the enum's constructor on
# the batch path; an unknown value is a KeyError, never a silent string).
STATUS_OF: Final = {s.value: s for s in TransferStatus}
