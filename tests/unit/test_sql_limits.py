"""The SQL functions' literal bounds are the ones consistency/limits.py names (one truth)."""

from __future__ import annotations

import re

from consistency import limits
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
