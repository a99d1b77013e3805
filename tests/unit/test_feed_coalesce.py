"""router.relays.feed.coalesce: a region's queued feed batches merged into one call."""

from __future__ import annotations

import asyncio
import datetime as dt

from regionstore.changefeed import BATCH_TXNS_MAX, FeedBatch
from regionstore.changes import AccountChange, CommittedTxn, committed_accounts
from router.relays.feed import coalesce

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def _txn(lsn: int, *changes: tuple[int, int]) -> CommittedTxn:
    return CommittedTxn(
        commit_lsn=lsn,
        end_lsn=lsn + 1,
        commit_time=T0 + dt.timedelta(microseconds=lsn),
        changes=tuple(AccountChange(a, v, {"id": a, "version": v}) for a, v in changes),
    )


def _batch(start: int, end: int, *txns: CommittedTxn, proof: float | None = None) -> FeedBatch:
    proofs = () if proof is None else ((end, proof),)
    return FeedBatch(start, end, txns, proofs, end - start)


def _queue(*batches: FeedBatch) -> asyncio.Queue[FeedBatch]:
    q: asyncio.Queue[FeedBatch] = asyncio.Queue()
    for b in batches:
        q.put_nowait(b)
    return q


def test_contiguous_batches_become_one_call_with_every_change_and_proof() -> None:
    a = _batch(10, 20, _txn(11, (1, 1), (2, 1)), proof=1.0)
    heartbeat = _batch(20, 20, proof=2.0)
    b = _batch(20, 30, _txn(21, (1, 2)), _txn(25, (3, 1)), proof=3.0)
    merged, carry, n = coalesce(a, _queue(heartbeat, b))
    assert (merged.from_lsn, merged.to_lsn, n, carry) == (10, 30, 2, None)
    assert [t.commit_lsn for t in merged.txns] == [11, 21, 25]
    assert [q for _, q in merged.proofs] == [1.0, 2.0, 3.0]
    assert merged.lag_bytes == b.lag_bytes
    # Each account's last change across the merged batches, as the cache must end up.
    assert {k: c.version for k, c in committed_accounts(merged.txns).items()} == {
        1: 2,
        2: 1,
        3: 1,
    }


def test_an_empty_queue_returns_the_batch_itself() -> None:
    a = _batch(10, 20, _txn(11, (1, 1)))
    assert coalesce(a, _queue()) == (a, None, 0)


def test_the_transaction_bound_and_a_gap_stop_the_merge_and_carry_the_next_batch() -> None:
    big = _batch(0, 10, *(_txn(i, (i, 1)) for i in range(BATCH_TXNS_MAX - 1)))
    fits = _batch(10, 20, _txn(11, (1, 2)))
    over = _batch(20, 30, _txn(21, (1, 3)), _txn(22, (2, 3)))
    after = _batch(30, 40)
    q = _queue(fits, over, after)
    merged, carry, n = coalesce(big, q)
    assert (merged.to_lsn, len(merged.txns), n) == (20, BATCH_TXNS_MAX, 1)
    assert carry is over
    assert q.qsize() == 1  # `after` stays queued, behind the carried batch
    # A batch that does not start where the last one ended is never merged into it.
    gap = _batch(50, 60)
    merged, carry, n = coalesce(_batch(0, 10), _queue(gap))
    assert (merged.to_lsn, carry, n) == (10, gap, 0)
