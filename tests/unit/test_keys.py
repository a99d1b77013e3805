"""Key rotation with overlap (infra.keys) against a verifier that re-reads the key set on a
fake clock: no valid token is refused at any step, a retired key stops verifying."""

from __future__ import annotations

import stat
from pathlib import Path

import jwt
import pytest

from infra.keys import PUBLISH_WAIT_S, RETIRE_AFTER_S, KeyRing, KeyRingError
from router.auth import JWKS_CHECK_INTERVAL_S, AuthError, KeySetFile, Verifier

ISS, AUD, ADMIN_AUD = "txr-local", "txrouter", "txrouter-admin"


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 0.0


def _mint(ring: KeyRing) -> str:
    return ring.mint("t1", ["accounts:read"], 600, issuer=ISS, audience=AUD)


def test_rotation_overlap_and_retirement(tmp_path: Path) -> None:
    clocks = Clocks()
    seen_during_wait: list[tuple[list[str], str]] = []

    def sleep(seconds: float) -> None:
        # What the routers can see while rotate waits: both keys published, the old one signs.
        assert seconds == PUBLISH_WAIT_S
        assert seconds >= JWKS_CHECK_INTERVAL_S
        clocks.mono += seconds
        ks.get("any")  # a router's next check within the wait
        seen_during_wait.append((ks.kids(), jwt.get_unverified_header(_mint(ring))["kid"]))

    ring = KeyRing(tmp_path / "jwt", clock=lambda: clocks.wall, sleep=sleep)
    first = ring.create()
    ks = KeySetFile(ring.jwks_path, clock=lambda: clocks.mono)
    v = Verifier(ks, issuer=ISS, audience=AUD, admin_audience=ADMIN_AUD)
    old_token = _mint(ring)
    assert v.verify(old_token).tenant == "t1"

    second = ring.rotate()
    assert second != first
    assert seen_during_wait == [(sorted([first, second]), first)]
    new_token = _mint(ring)
    assert jwt.get_unverified_header(new_token)["kid"] == second
    # Overlap: tokens of both keys verify.
    assert v.verify(new_token).tenant == "t1"
    assert v.verify(old_token).tenant == "t1"
    infos = {k.kid: k for k in ring.list_keys()}
    assert infos[second].signing
    assert infos[first].retire_after == clocks.wall + RETIRE_AFTER_S

    # Not due yet: retire keeps it.
    assert ring.retire() == []
    clocks.wall += RETIRE_AFTER_S
    assert ring.retire() == [first]
    assert not (ring.dir / f"{first}.pem").exists()
    # Within the check interval the verifier still uses what it has (and its cache) ...
    assert v.verify(old_token).tenant == "t1"
    # ... and after it, the retired key's token is refused, cached or not.
    clocks.mono += JWKS_CHECK_INTERVAL_S
    with pytest.raises(AuthError, match="unknown key"):
        v.verify(old_token)
    assert v.verify(new_token).tenant == "t1"


def test_a_leaked_key_is_retired_at_once_but_never_the_signing_key(tmp_path: Path) -> None:
    clocks = Clocks()
    ring = KeyRing(tmp_path / "jwt", clock=lambda: clocks.wall, sleep=lambda _s: None)
    first = ring.create()
    with pytest.raises(KeyRingError, match="signing key"):
        ring.retire(first)
    second = ring.rotate()
    assert ring.retire(first) == [first]
    assert [k.kid for k in ring.list_keys()] == [second]
    with pytest.raises(KeyRingError, match="no key"):
        ring.retire("nope")


def test_a_later_rotation_drops_keys_that_are_due(tmp_path: Path) -> None:
    clocks = Clocks()
    ring = KeyRing(tmp_path / "jwt", clock=lambda: clocks.wall, sleep=lambda _s: None)
    first = ring.create()
    second = ring.rotate()
    clocks.wall += RETIRE_AFTER_S + 1
    third = ring.rotate()
    assert sorted(k.kid for k in ring.list_keys()) == sorted([second, third])
    assert first not in ring.jwks_path.read_text()


def test_private_keys_are_owner_only_and_the_key_set_is_public_only(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "jwt", sleep=lambda _s: None)
    kid = ring.create()
    ring.rotate()
    assert stat.S_IMODE(ring.dir.stat().st_mode) == 0o700
    for pem in ring.dir.glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE((ring.dir / "keyring.json").stat().st_mode) == 0o600
    text = ring.jwks_path.read_text()
    assert '"d"' not in text
    assert "PRIVATE" not in text
    assert kid in text
    with pytest.raises(KeyRingError, match="already exists"):
        ring.create()


def test_a_broken_key_set_file_keeps_the_last_good_one(tmp_path: Path) -> None:
    mono = [0.0]
    ring = KeyRing(tmp_path / "jwt", sleep=lambda _s: None)
    ring.create()
    ks = KeySetFile(ring.jwks_path, clock=lambda: mono[0])
    v = Verifier(ks, issuer=ISS, audience=AUD, admin_audience=ADMIN_AUD)
    tok = _mint(ring)
    ring.jwks_path.write_text("{half a file")
    mono[0] += JWKS_CHECK_INTERVAL_S
    assert v.verify(tok).tenant == "t1"
