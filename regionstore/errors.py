"""Operational failures of the shard store, as the router must tell them apart.

Business outcomes (insufficient funds, replays, stale epochs, ...) are *values* returned by the
store (``TransferCode``, ``CreateAccountCode``); these exceptions are only for operational
failures, and each class says what the caller may conclude about a write::

    StoreError                    base class: catch this to catch any store failure
    ├── StoreUnavailable          the operation certainly had no effect: nothing was sent (pool
    │                             acquire timed out, server unreachable), the server rolled the
    │                             statement back (deadlock, cancellation, read-only standby), or
    │                             it was a read. Safe to retry, possibly elsewhere.
    ├── StoreOutcomeUnknown       a write was sent and then the connection broke, the deadline
    │                             passed, or the commit was not confirmed by the synchronous
    │                             standby: it may or may not have committed. The router answers
    │                             504 ``outcome_unknown``; the client retries with the same key.
    └── StoreInvariantViolation   the database refused a call that should never be made (bad
                                  arguments, a CHECK constraint, a broken ledger assertion).
                                  Nothing was committed; this is a bug to page on, not to retry.

Every exception raised from a psycopg error chains it (``raise X from exc``).
"""

from __future__ import annotations


class StoreError(Exception):
    """Any failure of the shard store; see the module docstring for the tree."""


class StoreUnavailable(StoreError):
    """The operation certainly did not take effect (for a write: it did not commit)."""


class StoreOutcomeUnknown(StoreError):
    """A write was sent and its outcome is unknown: it may or may not have committed."""


class StoreInvariantViolation(StoreError):
    """The database refused the call as a broken invariant; nothing was committed."""
