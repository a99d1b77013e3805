"""The SQL functions' literal bounds are the ones consistency/limits.py names (one truth)."""

from __future__ import annotations

import re

from consistency import ids, limits
from regionstore import migrate


def _functions_text() -> str:
    return "\n".join(p.read_text() for p in migrate.function_files())


def test_post_transfers_literals_match_the_python_limits() -> None:
    text = (migrate.FUNCTIONS_DIR / "ledger.sql").read_text()
    assert f"v_n > {limits.BATCH_ITEMS_MAX}" in text
    assert f"v_amount > {limits.AMOUNT_MAX}" in text
    ceilings = set(re.findall(r"v_[a-z]+\.?[a-z]* \+ v_amount > (\d+)", text))
    assert ceilings == {str(limits.BALANCE_ABS_MAX)}, ceilings


def test_every_function_file_replaces_rather_than_creates() -> None:
    # Applied on every migrate: a plain CREATE FUNCTION would fail the second time.
    text = _functions_text()
    assert migrate.function_files(), "function files are packaged"
    assert not re.search(r"CREATE\s+FUNCTION", text)
    assert len(re.findall(r"CREATE OR REPLACE FUNCTION", text)) >= 2


def test_no_migration_defines_post_transfers() -> None:
    for mig in migrate.available_migrations():
        assert "FUNCTION txr.post_transfers" not in mig.path.read_text(), mig.path.name


def _defined_functions(text: str) -> list[str]:
    return re.findall(r"CREATE OR REPLACE FUNCTION (txr\.\w+)\(", text)


def test_no_migration_defines_a_function() -> None:
    # Migrations are schema only (issue 17): every function lives once, in sql/functions.
    for mig in migrate.available_migrations():
        text = mig.path.read_text()
        assert not re.search(r"CREATE\s+(OR\s+REPLACE\s+)?FUNCTION", text), mig.path.name
        assert not re.search(r"DROP\s+FUNCTION", text), mig.path.name


def test_each_function_is_defined_once() -> None:
    names = _defined_functions(_functions_text())
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for required in ("txr.fence_ok", "txr.slot_of", "txr.apply_inbound", "txr.settle_outbound"):
        assert required in names


def test_the_fence_and_the_slot_are_written_once() -> None:
    # One fence check (txr.fence_ok) and one slot computation (txr.slot_of): nobody else takes
    # the fence lock shared or shifts an id by the slot bits.
    fence = (migrate.FUNCTIONS_DIR / "fence.sql").read_text()
    for path in migrate.function_files():
        text = path.read_text()
        if path.name != "fence.sql":
            assert "pg_advisory_xact_lock_shared" not in text, path.name
            assert f">> {ids.RANDOM_BITS}" not in text, path.name
    assert fence.count("pg_advisory_xact_lock_shared") == 1
    assert f"p_id >> {ids.RANDOM_BITS}" in fence


def test_saga_literals_match_the_python_limits() -> None:
    text = (migrate.FUNCTIONS_DIR / "saga.sql").read_text()
    assert f"p_amount > {limits.AMOUNT_MAX}" in text
    assert set(re.findall(r"[-+] p_amount [<>] -?(\d+)", text)) == {str(limits.BALANCE_ABS_MAX)}
    window = re.findall(r"txr\.delivery_window\(\).*?secs => (\d+)", text, re.S)
    assert window == [str(limits.SAGA_DELIVERY_WINDOW_S)]


def test_retention_literals_match_the_python_limits() -> None:
    text = (migrate.FUNCTIONS_DIR / "retention.sql").read_text()
    body = text.split("CREATE OR REPLACE FUNCTION txr.prune_retained", 1)[1]
    secs = re.findall(r"secs => (\d+)", body)
    # Keys (transfer, account open), then final outbox rows.
    assert secs == [
        str(limits.IDEMPOTENCY_KEY_RETENTION_S),
        str(limits.IDEMPOTENCY_KEY_RETENTION_S),
        str(limits.OUTBOX_RETENTION_S),
    ]
    inbox = re.findall(r"txr\.inbox_retention\(\).*?secs => (\d+)", text, re.S)
    assert inbox == [str(limits.INBOX_RETENTION_S)]
    assert f"p_batch > {limits.RETENTION_BATCH_MAX}" in body
    assert limits.INBOX_RETENTION_S > limits.SAGA_DELIVERY_WINDOW_S + limits.CLOCK_SKEW_MARGIN_S


def test_regionstore_sql_uses_slot_of() -> None:
    # The Python side's SQL (admin, audit, store) asks txr.slot_of too: one slot computation.
    for path in sorted(migrate.FUNCTIONS_DIR.parent.parent.glob("*.py")):
        assert f">> {ids.RANDOM_BITS}" not in path.read_text(), path.name


def test_migration_literals_match_the_python_limits() -> None:
    # Released migrations are never edited; their CHECK literals must still be the limits.
    text = "\n".join(m.path.read_text() for m in migrate.available_migrations())
    assert f"BETWEEN 0 AND {limits.OVERDRAFT_LIMIT_MAX}" in text
    assert f"balance <= {limits.BALANCE_ABS_MAX}" in text
    assert f"balance >= -{limits.BALANCE_ABS_MAX}" in text
    assert f"slot BETWEEN 0 AND {limits.SLOT_COUNT - 1}" in text
