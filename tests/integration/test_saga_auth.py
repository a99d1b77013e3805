"""Leg 2 applies only what leg 1 signed; the relays' role is the only one that runs the saga;
retention prunes what no retry or delivery can need; an older database migrates (issue 16).

Real PostgreSQL (tests/fixtures/pg.py): shard A is database ``txr``, shard B ``txr_b``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from psycopg import errors as pg_errors

from consistency import limits
from consistency.ids import new_account_id
from regionstore import admin, migrate, saga_keys
from regionstore.store import (
    InboundCode,
    OutboxMessage,
    SettleCode,
    ShardStore,
    TransferCode,
)
from router.relays.outbox import OutboxRelay
from tests.fixtures.pg import (
    SHARD_A,
    SHARD_B,
    SHARD_B_SLOT_MIN,
    SHARD_EPOCH,
    SLOT_EPOCH,
    STORE_OPEN_TIMEOUT_S,
    PgShard,
    StaticResolver,
)
from tests.integration.test_saga_store import (
    TIMEOUT_S,
    assert_clean,
    balance,
    deliver_leg2,
    drain,
    funded,
    item,
    new_account,
    new_tenant,
    post1,
    relay,
    status,
    stores,
)

pytestmark = pytest.mark.integration

__all__ = ["stores"]  # the fixture, re-used

# The release this branch started from: its migrations and function files are how an existing
# database was built (tests below migrate one of those with this tree).
LEGACY_COMMIT: Final = "2a70ec7"
REPO: Final = Path(__file__).resolve().parents[2]


async def _pending(stores: dict[str, ShardStore]) -> tuple[str, int, int, OutboxMessage]:
    """A cross-shard leg 1 (A -> B) whose message is claimed (so no relay delivers it)."""
    await drain(stores)
    return await _leg1(stores)


async def _leg1(stores: dict[str, ShardStore]) -> tuple[str, int, int, OutboxMessage]:
    """``_pending`` without draining first (a message claimed before stays claimed)."""
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant = new_tenant()
    src = await funded(a, tenant, 1000)
    dst = await new_account(b, tenant)
    it = item(tenant, src, dst, 100)
    res = await post1(a, it)
    assert res.code is TransferCode.OK
    (msg,) = await a.claim_outbox(limit=10, lease_s=60, timeout_s=TIMEOUT_S)
    assert msg.transfer_id == it.transfer_id
    assert msg.mac is not None
    assert msg.key_id is not None
    return tenant, src, dst, msg


async def _apply(store: ShardStore, msg: OutboxMessage, **change: Any) -> InboundCode:
    return (await deliver_leg2(store, msg, **change)).code


def _signed_fields(msg: OutboxMessage) -> tuple[Any, ...]:
    """txr.saga_mac's arguments for a message of shard A."""
    return (
        msg.key_id,
        msg.transfer_id,
        SHARD_A,
        msg.tenant,
        msg.source,
        msg.destination,
        msg.amount,
        msg.currency,
        msg.created_at,
    )


def _inbox_rows(dsn: str, transfer_id: uuid.UUID) -> int:
    return _count(dsn, "SELECT count(*) FROM txr.inbox WHERE transfer_id = %s", (transfer_id,))


async def test_forged_or_altered_leg2_is_refused_and_changes_nothing(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant, src, dst, msg = await _pending(stores)
    other = await new_account(b, tenant)
    assert msg.mac is not None
    flipped = bytes([msg.mac[0] ^ 1]) + msg.mac[1:]
    forgeries: list[dict[str, Any]] = [
        {"mac": None},
        {"mac": flipped},
        {"mac": b"\x00" * 32},
        {"amount": msg.amount * 10},
        {"destination": other},
        {"tenant": new_tenant()},
        {"currency": "USD"},
        {"created_at": msg.created_at + timedelta(microseconds=1)},
        {"key_id": (msg.key_id or 0) + 1},
        # A genuine id with another's signature: the MAC covers the id too.
        {"transfer_id": uuid.uuid4()},
    ]
    for change in forgeries:
        assert await _apply(b, msg, **change) is InboundCode.UNAUTHENTICATED, change
    # The source shard names the transit account leg 2 debits: signed too.
    got = await deliver_leg2(b, msg, source_shard=SHARD_B)
    assert got.code is InboundCode.UNAUTHENTICATED
    # Nothing was recorded or moved: no inbox row, no credit, still in flight and balanced.
    assert _inbox_rows(pg_shard.b_admin_dsn, msg.transfer_id) == 0
    assert await balance(b, dst, tenant) == 0
    assert await balance(b, other, tenant) == 0
    assert await status(a, msg.transfer_id, tenant) == ("pending", None)
    await assert_clean(pg_shard)

    # A receipt leg 2 never gave cannot settle or reverse the transfer.
    for refusal, receipt in ((None, None), ("not_found", b"\x01" * 32)):
        settle = await a.settle_outbound(
            SHARD_EPOCH, msg.transfer_id, refusal_code=refusal, receipt=receipt, timeout_s=TIMEOUT_S
        )
        assert settle.code is SettleCode.UNAUTHENTICATED
    assert await status(a, msg.transfer_id, tenant) == ("pending", None)
    assert await balance(a, src, tenant) == 900

    # The genuine message, delivered twice at once, applies exactly once.
    r = relay(stores)
    done = await asyncio.gather(r.deliver(msg), r.deliver(msg))
    assert sorted(d.outcome for d in done) == ["already", "settled"]
    assert await balance(b, dst, tenant) == 100
    assert await status(a, msg.transfer_id, tenant) == ("settled", None)
    await assert_clean(pg_shard)


async def test_a_receipt_binds_the_answer(stores: dict[str, ShardStore], pg_shard: PgShard) -> None:
    """Leg 2 applied: its receipt settles, but the same receipt cannot reverse (which would
    hand the source its money back while the destination keeps the credit)."""
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant, src, dst, msg = await _pending(stores)
    got = await deliver_leg2(b, msg)
    assert got.code is InboundCode.APPLIED
    assert got.receipt is not None
    for refusal, shard in (("not_found", SHARD_B), (None, "elsewhere")):
        bad = await a.settle_outbound(
            SHARD_EPOCH,
            msg.transfer_id,
            refusal_code=refusal,
            leg2_shard=shard,
            receipt=got.receipt,
            timeout_s=TIMEOUT_S,
        )
        assert bad.code is SettleCode.UNAUTHENTICATED, (refusal, shard)
    assert await balance(a, src, tenant) == 900
    ok = await a.settle_outbound(
        SHARD_EPOCH,
        msg.transfer_id,
        refusal_code=None,
        leg2_shard=SHARD_B,
        receipt=got.receipt,
        timeout_s=TIMEOUT_S,
    )
    assert ok.code is SettleCode.SETTLED
    assert await balance(b, dst, tenant) == 100
    await assert_clean(pg_shard)


async def _leg2_and_settle(stores: dict[str, ShardStore], msg: OutboxMessage) -> SettleCode:
    """Deliver ``msg`` (A -> B) by hand: leg 2 on B, then the settle on A with its receipt."""
    got = await deliver_leg2(stores[SHARD_B], msg)
    assert got.code is InboundCode.APPLIED, got
    settled = await stores[SHARD_A].settle_outbound(
        SHARD_EPOCH,
        msg.transfer_id,
        refusal_code=None,
        leg2_shard=SHARD_B,
        receipt=got.receipt,
        timeout_s=TIMEOUT_S,
    )
    return settled.code


async def test_saga_key_rotation_keeps_pending_messages_verifying(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    """txr keys rotate-saga: the new key signs on every shard, a message signed with the old
    one before the rotation still verifies and settles, the old key is kept while anything
    pending names it (and for one rotation), and once retired it verifies nothing."""
    dsns = {SHARD_A: pg_shard.admin_dsn, SHARD_B: pg_shard.b_admin_dsn}
    _tenant, _src, _dst, old = await _pending(stores)
    before = saga_keys.signing_key(saga_keys.list_keys(pg_shard.admin_dsn))
    assert old.key_id == before
    done = saga_keys.rotate(dsns)
    new_id = done["key_id"]
    assert before is not None
    assert new_id > before
    assert before in done["kept"]
    for dsn in dsns.values():
        keys = saga_keys.list_keys(dsn)
        assert saga_keys.signing_key(keys) == new_id
        assert before in {k.key_id for k in keys}
    # Leg 1 now signs with the new key; both messages verify, settle, and nothing is left.
    _tenant, _src, _dst, fresh = await _leg1(stores)
    assert fresh.key_id == new_id
    # Retiring now keeps the old key: a pending message names it.
    assert before not in saga_keys.retire(dsns)
    for msg in (old, fresh):
        assert await _leg2_and_settle(stores, msg) is SettleCode.SETTLED
    # Two more rotations: the first keeps `new_id` as its previous key and retires `before`,
    # which nothing pending names any more.
    second = saga_keys.rotate(dsns)
    assert before in second["retired"]
    assert new_id in second["kept"]
    for dsn in dsns.values():
        assert before not in {k.key_id for k in saga_keys.list_keys(dsn)}
    # A message signed with a retired key verifies nothing any more.
    assert await _apply(stores[SHARD_B], old) is InboundCode.UNAUTHENTICATED
    await assert_clean(pg_shard)


def test_a_rotation_that_stopped_after_staging_finishes_with_the_same_key(
    pg_shard: PgShard,
) -> None:
    """A shard that was staged but not activated (the command died between the steps): the
    rerun activates the same key, with the secret the other shard already holds."""
    dsns = {SHARD_A: pg_shard.admin_dsn, SHARD_B: pg_shard.b_admin_dsn}
    ids = {k.key_id for k in saga_keys.list_keys(pg_shard.admin_dsn)}
    staged = max(ids) + 1
    with psycopg.connect(pg_shard.admin_dsn) as conn:
        conn.execute(
            "INSERT INTO txr.saga_keys (key_id, secret, signing) VALUES (%s, %s, false)",
            (staged, b"s" * 32),
        )
    done = saga_keys.rotate(dsns)
    assert done["resumed"]
    assert done["key_id"] == staged
    for dsn in dsns.values():
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT secret, signing FROM txr.saga_keys WHERE key_id = %s", (staged,)
            ).fetchone()
        assert row is not None
        assert (bytes(row[0]), row[1]) == (b"s" * 32, True)


async def test_leg2_past_the_delivery_window_is_refused(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    """A message older than the window could find its inbox row pruned: refused, nothing
    recorded. (The admin re-signs it with the older time, which no login role can do.)"""
    b = stores[SHARD_B]
    tenant, _src, dst, msg = await _pending(stores)
    old = msg.created_at - timedelta(seconds=limits.SAGA_DELIVERY_WINDOW_S + 60)
    with psycopg.connect(pg_shard.admin_dsn) as conn:
        row = conn.execute(
            "SELECT txr.saga_mac(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*_signed_fields(msg)[:-1], old),
        ).fetchone()
    assert row is not None
    assert await _apply(b, msg, created_at=old, mac=bytes(row[0])) is InboundCode.EXPIRED
    assert _inbox_rows(pg_shard.b_admin_dsn, msg.transfer_id) == 0
    assert await balance(b, dst, tenant) == 0
    # The genuine one still goes through.
    assert (await relay(stores).deliver(msg)).outcome == "settled"


@pytest.mark.parametrize(
    "call",
    [
        "SELECT * FROM txr.apply_inbound(1, gen_random_uuid(), 'x', 't', 1, 2, 3, 'EUR', 1,"
        " now(), 1, '\\x00'::bytea)",
        "SELECT * FROM txr.settle_outbound(1, gen_random_uuid(), NULL, NULL, NULL)",
        "SELECT * FROM txr.claim_outbox(1, 1)",
        "SELECT txr.defer_outbox(gen_random_uuid(), 1)",
        "SELECT * FROM txr.prune_retained(1)",
        "SELECT txr.sign_unsigned_outbox()",
        "SELECT secret FROM txr.saga_keys",
    ],
)
def test_the_application_role_cannot_run_the_saga(pg_shard: PgShard, call: str) -> None:
    with psycopg.connect(pg_shard.app_dsn) as conn, pytest.raises(pg_errors.InsufficientPrivilege):
        conn.execute(call.encode())


@pytest.mark.parametrize(
    "call",
    [
        "SELECT secret FROM txr.saga_keys",
        "SELECT txr.saga_mac(1, gen_random_uuid(), 'a', 't', 1, 2, 3, 'EUR', now())",
        "SELECT txr.saga_receipt(1, gen_random_uuid(), 'applied', 'a')",
        "SELECT txr.sign_unsigned_outbox()",
        "SELECT txr_crypto.hmac('x'::bytea, 'k'::bytea, 'sha256')",
        "SELECT * FROM txr.post_slot_move(gen_random_uuid(), 'in', 1, 1, 'x')",
    ],
)
def test_the_relay_role_cannot_sign(pg_shard: PgShard, call: str) -> None:
    with (
        psycopg.connect(pg_shard.relay_dsn) as conn,
        pytest.raises(pg_errors.InsufficientPrivilege),
    ):
        conn.execute(call.encode())


# -- retention -----------------------------------------------------------------------------


def _backdate(dsn: str, table: str, column: str, where: str, seconds: float) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            psycopg.sql.SQL("UPDATE {} SET {} = now() - make_interval(secs => %s) WHERE {}").format(
                psycopg.sql.Identifier("txr", table),
                psycopg.sql.Identifier(column),
                psycopg.sql.SQL(where),
            ),
            (seconds,),
        )


def _count(dsn: str, query: str, params: tuple[Any, ...]) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return int(row[0])


async def test_retention_prunes_only_what_no_retry_or_delivery_needs(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant = new_tenant()
    src = await funded(a, tenant, 1000)
    dst = await new_account(b, tenant)
    await drain(stores)
    settled_it, pending_it, fresh_it = (item(tenant, src, dst, n) for n in (10, 20, 30))
    for it in (settled_it, fresh_it):
        assert (await post1(a, it)).code is TransferCode.OK
    await drain(stores)
    assert (await post1(a, pending_it)).code is TransferCode.OK
    # Hold the pending one: claimed with a long lease, as by a relay that is slow.
    await a.claim_outbox(limit=10, lease_s=120, timeout_s=TIMEOUT_S)
    old_ids = [settled_it.transfer_id, pending_it.transfer_id]
    a_dsn, b_dsn = pg_shard.admin_dsn, pg_shard.b_admin_dsn
    key_age = limits.IDEMPOTENCY_KEY_RETENTION_S + 60
    with psycopg.connect(a_dsn) as conn:
        conn.execute(
            "UPDATE txr.idempotency_keys SET created_at = now() - make_interval(secs => %s)"
            " WHERE transfer_id = ANY(%s)",
            (key_age, old_ids),
        )
        conn.execute(
            "UPDATE txr.outbox SET settled_at = now() - make_interval(secs => %s),"
            " created_at = now() - make_interval(secs => %s) WHERE transfer_id = ANY(%s)"
            " AND state <> 'pending'",
            (limits.OUTBOX_RETENTION_S + 60, limits.OUTBOX_RETENTION_S + 60, old_ids),
        )
    with psycopg.connect(b_dsn) as conn:
        # Past the delivery window but not the inbox retention: kept.
        conn.execute(
            "UPDATE txr.inbox SET created_at = now() - make_interval(secs => %s)"
            " WHERE transfer_id = %s",
            (limits.SAGA_DELIVERY_WINDOW_S + 60, fresh_it.transfer_id),
        )
        conn.execute(
            "UPDATE txr.inbox SET created_at = now() - make_interval(secs => %s)"
            " WHERE transfer_id = %s",
            (limits.INBOX_RETENTION_S + 60, settled_it.transfer_id),
        )

    # Run by the relays' outbox loop (no timer of its own): one round prunes.
    pruned: dict[str, dict[str, int]] = {}
    for name in (SHARD_A, SHARD_B):
        pruned[name] = await relay(stores, name).prune()
    assert pruned[SHARD_A]["idempotency_keys"] >= 2
    assert pruned[SHARD_A]["outbox"] >= 1
    assert pruned[SHARD_B]["inbox"] >= 1

    def gone(dsn: str, table: str, tid: uuid.UUID) -> bool:
        query = psycopg.sql.SQL("SELECT count(*) FROM {} WHERE transfer_id = %s").format(
            psycopg.sql.Identifier("txr", table)
        )
        with psycopg.connect(dsn) as conn:
            row = conn.execute(query, (tid,)).fetchone()
        return row == (0,)

    assert gone(a_dsn, "idempotency_keys", settled_it.transfer_id)
    assert gone(a_dsn, "outbox", settled_it.transfer_id)
    assert gone(b_dsn, "inbox", settled_it.transfer_id)
    # A pending message is never pruned, however old its key; fresh rows stay.
    assert not gone(a_dsn, "outbox", pending_it.transfer_id)
    assert not gone(a_dsn, "idempotency_keys", fresh_it.transfer_id)
    assert not gone(a_dsn, "outbox", fresh_it.transfer_id)
    assert not gone(b_dsn, "inbox", fresh_it.transfer_id)
    # The history stays: transfers and entries are never pruned; the ledger still balances.
    assert await status(a, settled_it.transfer_id, tenant) == ("settled", None)
    await drain_after_lease(stores, a_dsn)
    await assert_clean(pg_shard)


async def drain_after_lease(stores: dict[str, ShardStore], admin_dsn: str) -> None:
    """End the long lease the test took, then deliver everything."""
    with psycopg.connect(admin_dsn) as conn:
        conn.execute(
            "SELECT txr.defer_outbox(transfer_id, 0) FROM txr.outbox WHERE state = 'pending'"
        )
    await drain(stores)


async def test_retention_batches_are_bounded(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    a = stores[SHARD_A]
    tenant = new_tenant()
    src = await funded(a, tenant, 1000)
    bank = await new_account(a, tenant)
    its = [item(tenant, src, bank, 1) for _ in range(3)]
    for it in its:
        assert (await post1(a, it)).code is TransferCode.OK
    _backdate(
        pg_shard.admin_dsn,
        "idempotency_keys",
        "created_at",
        f"tenant = '{tenant}'",
        limits.IDEMPOTENCY_KEY_RETENTION_S + 60,
    )
    first = await a.prune_retained(batch=1, timeout_s=TIMEOUT_S)
    assert first["idempotency_keys"] == 1
    rest = await a.prune_retained(batch=limits.RETENTION_BATCH_MAX, timeout_s=TIMEOUT_S)
    assert rest["idempotency_keys"] >= 3  # the funding transfer's key too
    for bad in (0, limits.RETENTION_BATCH_MAX + 1):
        with pytest.raises(Exception, match="batch"):
            await a.prune_retained(batch=bad, timeout_s=TIMEOUT_S)


async def test_relay_loop_runs_the_prune(stores: dict[str, ShardStore], pg_shard: PgShard) -> None:
    a = stores[SHARD_A]
    tenant = new_tenant()
    src = await funded(a, tenant, 10)
    _backdate(
        pg_shard.admin_dsn,
        "idempotency_keys",
        "created_at",
        f"tenant = '{tenant}'",
        limits.IDEMPOTENCY_KEY_RETENTION_S + 60,
    )
    assert src
    stop = asyncio.Event()
    r = OutboxRelay(SHARD_A, StaticResolver(stores), region="test", poll_interval_s=0.2)
    task = asyncio.create_task(r.run(stop))
    q = "SELECT count(*) FROM txr.idempotency_keys WHERE tenant = %s"
    try:
        for _ in range(100):
            if _count(pg_shard.admin_dsn, q, (tenant,)) == 0:
                break
            await asyncio.sleep(0.1)
        assert _count(pg_shard.admin_dsn, q, (tenant,)) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)


# -- an older database migrates ------------------------------------------------------------


def _legacy_tree(dest: Path) -> tuple[Path, Path]:
    """The migrations and function files of LEGACY_COMMIT, written under ``dest``."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs the git history for the legacy schema (not a git checkout)")
    out: list[Path] = []
    for sub in ("regionstore/migrations", "regionstore/sql/functions"):
        names = subprocess.run(
            [git, "-C", str(REPO), "ls-tree", "--name-only", f"{LEGACY_COMMIT}:{sub}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        d = dest / sub
        d.mkdir(parents=True)
        for name in names:
            text = subprocess.run(
                [git, "-C", str(REPO), "show", f"{LEGACY_COMMIT}:{sub}/{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (d / name).write_text(text)
        out.append(d)
    return out[0], out[1]


async def test_a_database_of_the_previous_release_migrates(
    pg_shard: PgShard, tmp_path: Path
) -> None:
    """Built by the previous release (functions in numbered migrations, the app role running
    leg 2), with a cross-shard message pending; migrated by this tree: the functions are the
    new ones, the app role lost leg 2, and the message is signed once the key is set and then
    delivers."""
    mig_dir, fn_dir = _legacy_tree(tmp_path)
    db = f"txr_legacy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}".encode())
    legacy_admin = pg_shard.admin_dsn.rsplit("/", 1)[0] + f"/{db}"
    legacy_app = pg_shard.app_dsn.rsplit("/", 1)[0] + f"/{db}"
    legacy_relay = pg_shard.relay_dsn.rsplit("/", 1)[0] + f"/{db}"
    try:
        await asyncio.to_thread(
            migrate.apply_migrations,
            legacy_admin,
            migrations_dir=mig_dir,
            functions_dir=fn_dir,
        )
        admin.init_shard(legacy_admin, epoch=SHARD_EPOCH, slots=range(4000), slot_epoch=SLOT_EPOCH)
        # The old app role could run leg 2 itself.
        with psycopg.connect(legacy_app) as conn:
            row = conn.execute(
                "SELECT has_function_privilege(current_user, p.oid, 'EXECUTE')"
                " FROM pg_proc p WHERE p.proname = 'apply_inbound'"
            ).fetchone()
        assert row == (True,)
        tenant = new_tenant()
        bank, src = new_account_id(1), new_account_id(2)
        with psycopg.connect(legacy_app) as conn:
            for acc, overdraft in ((bank, 10**15), (src, 0)):
                # The old signature (7 arguments), as the previous release's routers called it.
                row = conn.execute(
                    "SELECT code FROM txr.create_account(%s, %s, %s, %s, 'EUR', %s, '{}')",
                    (SHARD_EPOCH, SLOT_EPOCH, acc, tenant, overdraft),
                ).fetchone()
                assert row == ("ok",)
        old = ShardStore(legacy_app, name=SHARD_A, pool_min=1, pool_max=2)
        await old.open(timeout_s=STORE_OPEN_TIMEOUT_S)
        try:
            assert (await post1(old, item(tenant, bank, src, 100))).code is TransferCode.OK
            it = item(tenant, src, new_account_id(SHARD_B_SLOT_MIN), 5)
            assert it.destination_shard == SHARD_B
            assert (await post1(old, it)).code is TransferCode.OK
        finally:
            await old.close()

        applied = await asyncio.to_thread(migrate.apply_migrations, legacy_admin)
        assert "0006_saga_auth_retention.sql" in applied
        assert "saga.sql" in applied
        assert await asyncio.to_thread(migrate.apply_migrations, legacy_admin) == []
        with psycopg.connect(legacy_admin) as conn:
            # One apply_inbound and one settle_outbound: the new signatures only.
            procs = conn.execute(
                "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'txr' AND p.proname IN"
                " ('apply_inbound', 'settle_outbound', 'create_account', 'claim_outbox')"
                " ORDER BY 1"
            ).fetchall()
            assert [p for p, _ in procs] == [
                "apply_inbound",
                "claim_outbox",
                "create_account",
                "settle_outbound",
            ]
            unsigned = conn.execute(
                "SELECT count(*) FROM txr.outbox WHERE state = 'pending' AND mac IS NULL"
            ).fetchone()
            assert unsigned == (1,)
        with (
            psycopg.connect(legacy_app) as conn,
            pytest.raises(pg_errors.InsufficientPrivilege),
        ):
            conn.execute("SELECT * FROM txr.claim_outbox(1, 1)")
        signed = admin.set_saga_identity(legacy_admin, shard=SHARD_A, key_id=1, secret=b"k" * 32)
        assert signed == 1
        relay_store = ShardStore(legacy_relay, name=SHARD_A, pool_min=1, pool_max=2)
        await relay_store.open(timeout_s=STORE_OPEN_TIMEOUT_S)
        try:
            (msg,) = await relay_store.claim_outbox(limit=10, lease_s=1, timeout_s=TIMEOUT_S)
            assert msg.transfer_id == it.transfer_id
            assert msg.mac is not None
            with psycopg.connect(legacy_admin) as conn:
                row = conn.execute(
                    "SELECT txr.saga_mac(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    _signed_fields(msg),
                ).fetchone()
            assert row is not None
            assert bytes(row[0]) == msg.mac
        finally:
            await relay_store.close()
    finally:
        with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)".encode())
