"""What a whole-region fault strikes (chaos.nemesis._region_hits), on hand-made shard views."""

from __future__ import annotations

from typing import Any

import pytest

from chaos import nemesis


async def test_a_region_fault_hits_every_shard_with_a_node_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    views: dict[str, dict[str, Any]] = {
        "a-1": {"primary": "a-1@a", "primary_region": "a", "standbys": [{"region": "c"}]},
        "b-1": {"primary": "b-1@b", "primary_region": "b", "standbys": [{"region": "a"}]},
        "c-1": {"primary": "c-1@c", "primary_region": "c", "standbys": [{"region": "b"}]},
    }
    monkeypatch.setattr(nemesis, "_shards_now", lambda _ctx: views)
    ctx: Any = None  # _shards_now, the only user of the context here, is replaced
    assert await nemesis._region_hits(ctx, "a") == (["a-1", "b-1"], ["a-1"])
    assert await nemesis._region_hits(ctx, "c") == (["a-1", "c-1"], ["c-1"])
    assert await nemesis._region_hits(ctx, "nowhere") == ([], [])
