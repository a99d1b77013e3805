"""Pure parts of router.events: event derivation and ids, subjects, cursors, signatures, the
SSRF address rules and the retry schedule; the publisher's waves (each account's events in
commit order) and what a failed call acknowledges."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import uuid

import orjson
import pytest

from consistency import coherence, ids, limits
from regionstore.changes import AccountChange, CommittedTxn, TransferChange
from router import validation
from router.events import model, publisher, pull, stream, webhooks

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def _acc(slot: int, n: int) -> int:
    """Account ``n`` of ``slot`` (the bit layout is consistency.ids's alone)."""
    return ids.slot_id_range(slot)[0] | n


def _account(account_id: int, tenant: str = "acme", *, inserted: bool = True) -> AccountChange:
    row = coherence.account_payload(
        id=account_id,
        tenant=tenant,
        currency="EUR",
        balance=0,
        overdraft_limit=0,
        version=1,
        metadata={},
        created_at=T0,
    )
    return AccountChange(account_id, 1, row, inserted=inserted)


def _transfer(status: str, *, inserted: bool, tid: uuid.UUID | None = None) -> TransferChange:
    return TransferChange(
        {
            "id": str(tid or uuid.uuid4()),
            "tenant": "acme",
            "source": str(_acc(5, 7)),
            "destination": str(_acc(9, 1)),
            "amount": "250",
            "currency": "EUR",
            "reference": None,
            "status": status,
            "created_at": "2026-01-02 03:04:05.678901+00",
            "refusal_code": None,
        },
        inserted,
    )


def _txn(*, accounts=(), transfers=(), slot_move: bool = False) -> CommittedTxn:  # type: ignore[no-untyped-def]
    return CommittedTxn(100, 200, T0, tuple(accounts), tuple(transfers), slot_move)


def _events(txn: CommittedTxn) -> list[model.Event]:
    return model.events_of(txn, shard="eu-west-1", home_region="eu-west")


def test_transfer_states_map_to_event_types() -> None:
    tid = uuid.uuid4()
    assert [e.type for e in _events(_txn(transfers=[_transfer("settled", inserted=True)]))] == [
        "transfer.settled"
    ]
    pending = _events(_txn(transfers=[_transfer("pending", inserted=True, tid=tid)]))
    settled = _events(_txn(transfers=[_transfer("settled", inserted=False, tid=tid)]))
    reversed_ = _events(_txn(transfers=[_transfer("reversed", inserted=False, tid=tid)]))
    assert [e.type for e in pending + settled + reversed_] == [
        "transfer.pending",
        "transfer.settled",
        "transfer.reversed",
    ]
    # One object: the same public id in every event, a different event id per type.
    public = ids.format_transfer_id(5, tid)
    assert {e.data["id"] for e in pending + settled} == {public}
    assert pending[0].id != settled[0].id
    # An update that leaves it pending is no event.
    assert _events(_txn(transfers=[_transfer("pending", inserted=False)])) == []


def test_event_ids_are_stable_and_bodies_deterministic() -> None:
    tid = uuid.uuid4()
    a = _events(_txn(transfers=[_transfer("settled", inserted=True, tid=tid)]))[0]
    b = _events(_txn(transfers=[_transfer("settled", inserted=True, tid=tid)]))[0]
    assert a.id == b.id == model.event_id("transfer.settled", a.data["id"])
    assert a.body() == b.body()
    assert a.id.startswith("evt_")
    assert len(a.id) == 4 + model.EVENT_ID_HEX
    assert a.created_at == "2026-01-02T03:04:05.678901Z"
    assert a.subject == "txr.events.acme.transfer.settled"


def test_accounts_opened_are_events_but_not_transit_updates_or_slot_moves() -> None:
    acc = _acc(3, 42)
    evs = _events(_txn(accounts=[_account(acc)]))
    assert [(e.type, e.data["id"], e.data["shard"], e.data["home_region"]) for e in evs] == [
        ("account.created", ids.format_account_id(acc), "eu-west-1", "eu-west")
    ]
    assert _events(_txn(accounts=[_account(acc, inserted=False)])) == []
    assert _events(_txn(accounts=[_account(-1, model.TRANSIT_TENANT)])) == []
    # A slot move's copies (same transaction as its slot_moves row) are not new events.
    moved = _txn(
        accounts=[_account(acc)], transfers=[_transfer("settled", inserted=True)], slot_move=True
    )
    assert _events(moved) == []


def test_tenant_subject_tokens_are_one_to_one() -> None:
    assert stream.tenant_token("a.b") == "a~b"
    assert stream.tenant_of_token(stream.tenant_token("a.b-c_d")) == "a.b-c_d"
    # "a" and "a.b" cannot share a subject, nor can a filter of one match the other.
    assert stream.subject("a.b", "account.created").split(".")[2] == "a~b"
    assert stream.tenant_filter("a") == "txr.events.a.>"
    for bad in ("", "a b", "a*", "a>", "x" * 65):
        with pytest.raises(ValueError, match="not a tenant"):
            stream.tenant_token(bad)


def test_cursor_round_trip_and_refusals() -> None:
    for seq in (0, 1, 2**40, pull.SEQ_MAX):
        assert pull.decode_cursor(pull.encode_cursor(seq)) == seq
    for raw in ("", "!!", "czE", "ZQ", "ZS0x", "A" * 65, "ZTE4NDQ2NzQ0MDczNzA5NTUxNjE2"):
        with pytest.raises(pull.CursorInvalid):
            pull.decode_cursor(raw)


def test_signature_is_stripes_scheme() -> None:
    import hashlib
    import hmac

    body = b'{"id":"evt_1"}'
    header = webhooks.sign("whsec_x", body, 1700000000)
    expected = hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert webhooks.verify("whsec_x", body, header)
    assert not webhooks.verify("whsec_x", body + b" ", header)
    assert not webhooks.verify("whsec_y", body, header)
    assert not webhooks.verify("whsec_x", body, "v1=" + expected)


@pytest.mark.parametrize(
    ("addr", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.0.0.1", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("169.254.1.1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("fc00::1", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("240.0.0.1", False),
    ],
)
def test_address_rules(addr: str, allowed: bool) -> None:
    assert webhooks.address_allowed(addr, allow_loopback=False) is allowed


def test_loopback_only_when_allowed_and_never_metadata() -> None:
    assert webhooks.address_allowed("127.0.0.1", allow_loopback=True)
    assert webhooks.address_allowed("::1", allow_loopback=True)
    assert not webhooks.address_allowed("10.0.0.1", allow_loopback=True)
    assert not webhooks.address_allowed("169.254.169.254", allow_loopback=True)


def test_resolver_refuses_a_name_with_any_refused_address() -> None:
    async def run() -> None:
        with pytest.raises(webhooks.UrlRefused):
            await webhooks.GuardedResolver(allow_loopback=False).resolve("localhost", 80)
        ok = await webhooks.GuardedResolver(allow_loopback=True).resolve("127.0.0.1", 80)
        assert ok[0]["host"] == "127.0.0.1"
        with pytest.raises(webhooks.UrlRefused):
            await webhooks.check_url("http://localhost:8080/x", allow_loopback=False)

    asyncio.run(run())


def test_backoff_is_jittered_capped_and_retries_span_the_window() -> None:
    rng = random.Random(7)
    for attempt in range(1, 80):
        base = min(webhooks.BACKOFF_S_MAX, webhooks.BACKOFF_S_MIN * 2 ** (attempt - 1))
        d = webhooks.backoff_s(attempt, rng)
        assert base / 2 <= d <= base
    # The window, not an attempt count, ends the retries: with capped delays there are attempts
    # all through 24 h (the longest gap is the cap).
    t, attempt = 0.0, 1
    while t < webhooks.RETRY_WINDOW_S:
        t += webhooks.backoff_s(attempt, rng)
        attempt += 1
    assert webhooks.RETRY_WINDOW_S >= 24 * 3600
    assert webhooks.BACKOFF_S_MAX < webhooks.RETRY_WINDOW_S / 10
    assert attempt > 20


def _ev(i: int, *accounts: str) -> model.Event:
    if len(accounts) == 1:
        return model.Event(f"e{i}", model.ACCOUNT_CREATED, "acme", "", {"id": accounts[0]}, i)
    src, dst = accounts
    return model.Event(
        f"e{i}", model.TRANSFER_SETTLED, "acme", "", {"source": src, "destination": dst}, i
    )


def test_waves_keep_each_accounts_commit_order() -> None:
    rng = random.Random(7)
    accounts = [f"a{n}" for n in range(12)]
    for _ in range(300):
        events: list[model.Event] = []
        lsn = 1
        for i in range(rng.randint(1, 80)):
            lsn += rng.choice((0, 0, 1))  # several events a transaction, as a batch commits
            ev = _ev(i, *rng.sample(accounts, rng.choice((1, 2))))
            events.append(dataclasses.replace(ev, end_lsn=lsn))
        waves = publisher.waves(events)
        assert sorted(i for w in waves for i in w) == list(range(len(events)))
        wave_of = {i: n for n, w in enumerate(waves) for i in w}
        for w in waves:
            assert w == sorted(w)
            touched = {(a, events[i].end_lsn) for i in w for a in events[i].accounts}
            per_account = [a for a, _ in touched]
            assert len(per_account) == len(set(per_account)), "one account, two commits, a wave"
        # Every event is in a later wave than every event of one of its accounts from an
        # earlier commit.
        for j, later in enumerate(events):
            for i in range(j):
                earlier = events[i]
                if earlier.end_lsn < later.end_lsn and set(earlier.accounts) & set(later.accounts):
                    assert wave_of[i] < wave_of[j]


def test_one_transactions_events_share_a_wave_and_recovered_rows_do_not() -> None:
    batch = [dataclasses.replace(_ev(i, "hot", f"b{i}"), end_lsn=50) for i in range(4)]
    assert publisher.waves(batch) == [[0, 1, 2, 3]]
    # Rows re-derived after a new slot carry no transaction: each is its own.
    recovered = [dataclasses.replace(e, end_lsn=0) for e in batch]
    assert publisher.waves(recovered) == [[0], [1], [2], [3]]


def test_waves_of_distinct_accounts_are_one_window_and_split_at_its_bound() -> None:
    n = publisher.PUBLISH_WINDOW_MAX + 5
    events = [_ev(i, f"a{i}") for i in range(n)]
    waves = publisher.waves(events)
    assert [len(w) for w in waves] == [publisher.PUBLISH_WINDOW_MAX, 5]
    # A hot account: one event a wave.
    assert publisher.waves([_ev(i, "hot", f"b{i}") for i in range(3)]) == [[0], [1], [2]]


def test_a_failed_call_acknowledges_only_the_complete_transactions_before_the_gap() -> None:
    txns = [dataclasses.replace(_txn(), end_lsn=lsn) for lsn in (10, 20, 30, 40)]
    # Transaction 20 has no events; 30 has two.
    events = [_ev(10, "a"), _ev(30, "a", "b"), _ev(30, "c"), _ev(40, "d")]
    ack = publisher.acknowledged_through
    assert ack(txns, events, 0) is None
    assert ack(txns, events, 1) == 20
    # One of 30's two events stored: 30 is not complete.
    assert ack(txns, events, 2) == 20
    assert ack(txns, events, 3) == 30
    assert ack(txns, events, 4) == 40


def test_rows_after_a_new_slot_give_events_in_commit_order() -> None:
    src, dst = _acc(5, 7), _acc(9, 1)
    t1, t2 = uuid.uuid4(), uuid.uuid4()
    sec = dt.timedelta(seconds=1)

    def row(tid: uuid.UUID, created: dt.datetime, committed: dt.datetime, saga: bool) -> tuple:  # type: ignore[type-arg]
        return (tid, "acme", src, dst, 5, "EUR", None, "settled", created, None, saga, committed)

    # A saga's leg 1 at T0, a same-shard transfer of the same account at T0+1s, the saga's
    # settle at T0+2s: commit order pending(t1), settled(t2), settled(t1).
    evs = model.events_of_rows(
        [(src, "acme", "EUR", {}, T0 - sec)],
        [row(t1, T0, T0 + 2 * sec, True), row(t2, T0 + sec, T0 + sec, False)],
        shard="eu-west-1",
        home_region="eu-west",
        since=None,
    )
    got = [(e.type, e.data["id"][-32:]) for e in evs]
    assert got == [
        ("account.created", ids.format_account_id(src)[-32:]),
        ("transfer.pending", t1.hex),
        ("transfer.settled", t2.hex),
        ("transfer.settled", t1.hex),
    ]


def test_the_largest_account_event_fits_the_streams_message_bound() -> None:
    """A publish the stream refuses for its size would stall its shard's publisher (it retries
    the same event): the largest metadata validation accepts (every key, every byte escaped)
    must leave the account.created event under the stream's message bound."""
    keys = limits.METADATA_KEYS_MAX
    # "\x01" is six bytes once JSON-escaped; fill the byte bound as far as validation allows.
    per_value = (limits.METADATA_BYTES_MAX // keys - len('"k00":"",')) // 6
    metadata = {f"k{i:02d}": "\x01" * per_value for i in range(keys)}
    accepted = validation.validate_account_create(
        {"currency": "EUR", "metadata": metadata}, ["eu-west"]
    )
    assert accepted.metadata == metadata
    assert len(orjson.dumps(metadata)) > limits.METADATA_BYTES_MAX * 0.9
    acc = _acc(3, 42)
    change = _account(acc)
    assert change.row is not None
    row = dict(change.row, metadata=metadata)
    (ev,) = _events(_txn(accounts=[dataclasses.replace(change, row=row)]))
    assert ev.data["metadata"] == metadata
    assert len(ev.body()) < stream.STREAM_MAX_MSG_BYTES
