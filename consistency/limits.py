"""Bounds shared by every package, each with the reason for its value.

Names carry their unit last (TigerBeetle style). Router-only bounds live in ``router.limits``.
"""

from __future__ import annotations

from typing import Final

# 4096 slots: enough to spread accounts evenly over dozens of shards and to move load in small
# steps, yet small enough that the whole slot map fits in one etcd value (about 60 KiB at worst).
SLOT_COUNT: Final = 4096

# Per-transfer amount bounds (API.md). 10^15 minor units is 10 trillion in a 2-decimal currency:
# larger than any single payment, small enough that thousands of them cannot overflow a bigint.
AMOUNT_MIN: Final = 1
AMOUNT_MAX: Final = 10**15

# An overdraft limit is bounded like an amount so a floor can never overflow a bigint.
OVERDRAFT_LIMIT_MAX: Final = 10**15

# A balance above this is refused as ``balance_limit`` instead of overflowing bigint (2^63 - 1);
# the gap leaves room for one more maximal transfer to be checked without overflow.
BALANCE_ABS_MAX: Final = 2**62

# Idempotency keys: 1-255 printable ASCII characters (API.md).
IDEMPOTENCY_KEY_LEN_MAX: Final = 255

# Free-text reference on a transfer; bounded so a row stays small.
REFERENCE_LEN_MAX: Final = 140

# Account metadata: a small JSON object, bounded in keys and encoded size.
METADATA_KEYS_MAX: Final = 32
METADATA_BYTES_MAX: Final = 4096

# Tenant ids come from the JWT ``sub``; bounded and restricted so they are safe in logs and keys.
TENANT_LEN_MAX: Final = 64

# A consistency token remembers at most this many accounts; older ones drop off first.
TOKEN_ACCOUNTS_MAX: Final = 32

# Entries listing page size (API.md: 1-500).
ENTRIES_PAGE_MIN: Final = 1
ENTRIES_PAGE_MAX: Final = 500
ENTRIES_PAGE_DEFAULT: Final = 50

# Transfers in one call of the batch procedure. The procedure locks every account of the batch
# up front, so a batch bounds how many row locks one transaction holds.
BATCH_ITEMS_MAX: Final = 256
