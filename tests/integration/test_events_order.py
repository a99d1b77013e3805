"""The publisher's order and position under a partial publish failure, and its paged recovery,
against the test cluster's real NATS JetStream cluster and PostgreSQL shard.

A failure in the middle of a pipelined call is made real: the stream's maximum message size is
lowered for a moment, so the server rejects one event of the call (and only that one) while
the others are stored. Every account's events must then be in the stream as a prefix of its
commit order, and after the republish from the first event not stored, all of them, in commit
order, each once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import nats
import pytest

from regionstore.store import ShardStore
from router.events import model, publisher, stream
from router.events.jetstream import JetStreamPublisher
from router.events.publisher import EventSink, Position, PublishError
from tests.fixtures.api import Api, new_tenant
from tests.fixtures.events import account, account_created, transfer_settled
from tests.integration.test_events import all_events, wait_events

pytestmark = pytest.mark.integration

# Bodies of the ordinary events of this test stay far below this; the one that must fail is
# made larger with a long reference.
LOWERED_MAX_MSG_BYTES: Final = 4096
BIG_REFERENCE_CHARS: Final = 6000
STORE_OPEN_TIMEOUT_S: Final = 10.0
# The test's tenant's events reach the stream through the pull API within this.
READ_WAIT_S: Final = 30.0


def _per_account(events: Sequence[dict[str, Any] | model.Event]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        if isinstance(e, model.Event):
            eid, accounts = e.id, e.accounts
        else:
            d = e["data"]
            eid = e["id"]
            accounts = (
                (d["id"],)
                if e["type"] == model.ACCOUNT_CREATED
                else (d["source"], d["destination"])
            )
        for a in accounts:
            out.setdefault(a, []).append(eid)
    return out


async def _stored(api: Api, tenant: str, want: int) -> list[dict[str, Any]]:
    """The tenant's events in stream order, once ``want`` of them are there (or the wait ends)."""
    deadline = time.monotonic() + READ_WAIT_S
    while True:
        evs = await all_events(api, tenant)
        if len(evs) >= want or time.monotonic() > deadline:
            return evs
        await asyncio.sleep(0.2)


async def test_partial_publish_failure_keeps_every_accounts_commit_order(
    api: Api, local_cluster: Any
) -> None:
    tenant = new_tenant()
    a, b, c, d = (account(n) for n in (11, 12, 13, 14))
    # Commit order; event 4 (a -> b) is the one the stream refuses. Events after it touch its
    # accounts (a, b) and others (c, d), some in the same pipelined wave it is in.
    events = [
        account_created(tenant, a, 1),
        account_created(tenant, b, 1),
        account_created(tenant, c, 2),
        account_created(tenant, d, 2),
        transfer_settled(tenant, a, b, 3, reference="x" * BIG_REFERENCE_CHARS),
        transfer_settled(tenant, c, d, 4),
        transfer_settled(tenant, a, c, 5),
        transfer_settled(tenant, b, d, 6),
        transfer_settled(tenant, c, d, 7),
        transfer_settled(tenant, d, a, 8),
    ]
    failing = 4
    url = local_cluster.refresh_status()["regions"]["us-east"]["nats"]
    nc = await nats.connect(url)
    js = nc.jetstream()
    pub = JetStreamPublisher([url], name="test-events-order")
    full = stream.stream_config(replicas=3)
    try:
        await js.update_stream(dataclasses.replace(full, max_msg_size=LOWERED_MAX_MSG_BYTES))
        try:
            with pytest.raises(PublishError) as failed:
                await pub.publish(events)
        finally:
            await js.update_stream(full)
        assert failed.value.stored == failing
        # The events before the refused one are stored, so there are at least that many; the
        # publisher never sent the events of a or b that follow it; c -> d (the same wave as
        # the refused one) is stored.
        seen = await _stored(api, tenant, failing + 1)
        seen_ids = [e["id"] for e in seen]
        assert events[failing].id not in seen_ids
        assert len(seen_ids) == len(set(seen_ids))
        commit_order = _per_account(events)
        for acc, got in _per_account(seen).items():
            assert got == commit_order[acc][: len(got)], f"{acc}: not a prefix of commit order"
        for later in events[failing + 1 :]:
            if set(later.accounts) & set(events[failing].accounts):
                assert later.id not in seen_ids, "an event of the refused one's account went ahead"
        assert events[5].id in seen_ids
        # What the decoder does next: everything from the first event not stored, again.
        result = await pub.publish(events[failed.value.stored :])
        assert result.stored == len(events) - failing
        assert result.duplicates >= 1
        evs = await _stored(api, tenant, len(events))
        got_ids = [e["id"] for e in evs]
        assert sorted(got_ids) == sorted(e.id for e in events), "an event skipped or repeated"
        assert _per_account(evs) == commit_order
    finally:
        await pub.close()
        await nc.close()


async def test_recovery_after_a_new_slot_reads_and_publishes_in_pages(
    api: Api, local_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovery scan of a shard, in pages of two rows (the cluster's relay runs the same
    code with its bound): every account and transfer committed since the saved position is
    published, each once, accounts first, no page larger than the bound."""
    tenant = new_tenant()
    since = dt.datetime.now(dt.UTC)
    src = await api.funded(tenant, "us-east", 1_000)
    accs = [src] + [await api.open_account(tenant, "us-east") for _ in range(3)]
    transfers = []
    for dst in accs[1:] * 2:
        r = await api.transfer(tenant, "us-east", src, dst, 1)
        assert r.status == 201, r.body
        transfers.append(r.body["id"])
    want = {("account.created", x) for x in accs} | {("transfer.settled", t) for t in transfers}
    await wait_events(api, tenant, want)

    monkeypatch.setattr(publisher, "RECOVERY_PAGE_ROWS", 2)
    calls: list[list[model.Event]] = []
    url = local_cluster.refresh_status()["regions"]["us-east"]["nats"]
    real = JetStreamPublisher([url], name="test-events-recovery")

    class Recording:
        """The real publisher, recording each call (no fake: every call reaches NATS)."""

        async def publish(self, events: Sequence[model.Event]) -> publisher.Published:
            calls.append(list(events))
            return await real.publish(events)

        async def healthy(self) -> bool:
            return await real.healthy()

        async def load_position(self, shard: str) -> Position | None:
            return await real.load_position(shard)

        async def save_position(self, shard: str, position: Position) -> None:
            await real.save_position(shard, position)

        async def close(self) -> None:
            await real.close()

    store = ShardStore(local_cluster.primary_admin_dsn["us-east-1"], name="us-east-1")
    await store.open(timeout_s=STORE_OPEN_TIMEOUT_S)
    # A shard name of the test's own for the position key: the cluster's us-east-1 decoder
    # keeps its own. The events' ids are the same as the decoder's: duplicates in the stream.
    key = "test-recovery-" + uuid.uuid4().hex[:8]
    rec = Recording()
    try:
        margin = dt.timedelta(seconds=publisher.COMMIT_TIME_MARGIN_S)
        await rec.save_position(
            key, Position("old-slot", 0, int((since + margin).timestamp() * 1e6))
        )

        async def the_store() -> ShardStore:
            return store

        sink = EventSink(rec, shard=key, region="us-east", home_region="us-east", store=the_store)
        sink.begin(0, "new-slot", 1)
        await sink.recover_gap()
        pos = await real.load_position(key)
    finally:
        await store.close()
        await rec.close()
    assert calls, "the recovery published nothing"
    mine = [[e for e in call if e.tenant == tenant] for call in calls]
    flat = [e for call in mine for e in call]
    ids_ = [e.id for e in flat]
    assert len(ids_) == len(set(ids_)), "a row was read in two pages"
    got = {(e.type, e.data["id"]) for e in flat}
    assert want <= got, f"rows missed by the paging: {sorted(want - got)}"
    # Two rows a page: at most two account events, or two transfers' events (a saga's leg 1
    # has two: pending and its final state), per call.
    assert all(len(call) <= 2 * 2 for call in calls)
    kinds = [e.type == model.ACCOUNT_CREATED for e in flat]
    assert kinds == sorted(kinds, reverse=True), "a transfer's event before an account's"
    assert pos is not None
    assert pos.repl_slot == "new-slot"
