"""Moving a slot between shards (``txr rehome``) (DESIGN.md sections 7 and 10).

Pure orchestration, like the failover procedures (``consistency.failover_plan``): the caller
hands in :class:`RehomeOps` (slot ownership in the shards, the copy, etcd's slot map) and this
module never imports ``regionstore`` or ``infra``. It raises its own errors: a refused move
(:class:`RehomeRefused`, nothing changed) and a move that stopped and needs an operator or a
re-run (:class:`RehomeError`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Final, Protocol

from consistency.errors import CasConflict, ConsistencyError
from consistency.failover_plan import Progress, StepClock


class RehomeError(ConsistencyError):
    """A slot move stopped part way or found the shards in a state it must not act on."""


class RehomeRefused(RehomeError):
    """A slot move that was not started (or was rolled back): nothing changed."""


# A slot moves once its outbound cross-shard transfers are final (see ``rehome``). Relays
# deliver within a second on a healthy cluster; past this a destination is down, and the move
# is rolled back rather than keeping the slot refused for longer.
REHOME_DRAIN_TIMEOUT_S: Final = 30.0
REHOME_DRAIN_POLL_S: Final = 0.05
# Namespace of the deterministic move ids: a re-run of an interrupted move finds its rows.
_MOVE_ID_NAMESPACE: Final = uuid.UUID("0b3f6f7e-6d1a-4c55-9f38-6a1f3b0b9c51")


def slot_move_id(slot: int, epoch: int) -> str:
    """The id of the move that gives ``slot`` its ``epoch``: the same on every re-run."""
    return str(uuid.uuid5(_MOVE_ID_NAMESPACE, f"slot-move/{slot}/{epoch}"))


class RehomeOps(Protocol):
    """What moving a slot needs; see :func:`rehome`. Every step is idempotent."""

    def slot_owner(self, slot: int) -> tuple[str, int, int]:
        """(shard, slot epoch, slot-map mod_revision) as etcd says."""
        ...

    def unown(self, shard: str, slot: int, epoch: int) -> None:
        """Stop ``shard`` owning ``slot`` (waits for in-flight writes; later ones refused)."""
        ...

    def own(self, shard: str, slot: int, epoch: int) -> None:
        """Own ``slot`` at ``epoch`` on ``shard`` again (rolling a move back)."""
        ...

    def pending_outbound(self, shard: str, slot: int, *, nudge: bool) -> int:
        """The slot's pending outbound transfers on ``shard``; ``nudge`` wakes the relays."""
        ...

    def incoming_move(self, shard: str, slot: int, epoch: int) -> str | None:
        """The source of the move that gave ``shard`` the slot at ``epoch``, if one did."""
        ...

    def shards(self) -> list[str]:
        """Every shard of the deployment."""
        ...

    def copy_in(
        self, source: str, target: str, slot: int, new_epoch: int, move_id: str
    ) -> dict[str, int]:
        """Copy the slot's rows to ``target``, post its half of the move, own the slot there at
        ``new_epoch``: one target transaction. Rows copied per table."""
        ...

    def cas_slot(self, slot: int, shard: str, epoch: int, expected_revision: int) -> None:
        """Point ``slot`` at ``shard`` with ``epoch`` in the etcd slot map (CAS)."""
        ...

    def finish_out(
        self, source: str, target: str, slot: int, new_epoch: int, move_id: str
    ) -> dict[str, int]:
        """Post the source's half of the move and delete the slot's rows there: one source
        transaction. Rows deleted per table."""
        ...


def rehome(
    ops: RehomeOps,
    slot: int,
    to_shard: str,
    *,
    progress: Progress = lambda _m: None,
    drain_timeout_s: float = REHOME_DRAIN_TIMEOUT_S,
) -> dict[str, Any]:
    """Move ``slot`` to ``to_shard`` with a slot-epoch bump; finish a move a crash interrupted.

    Order and why: (1) the source stops owning the slot (exclusive fence lock: in-flight writes
    commit first, later ones answer ``wrong_shard``); from here no shard accepts the slot.
    (2) Its outbound cross-shard transfers must become final first: a pending one's money sits
    in the source's transit account, and only the source can post its reversal there. New ones
    cannot start (the slot is refused), so the relays drain them, nudged; if they do not within
    ``drain_timeout_s`` (a destination is down) the source owns the slot again and the move is
    refused, nothing changed. (3) The target receives the rows, posts its half of the move and
    owns the slot at epoch + 1, in one transaction. (4) etcd's slot map flips (CAS, epoch + 1):
    routers holding the old map are refused by both stores (the source does not own the slot,
    the target owns it under another epoch) and refresh. (5) The source posts its half and
    deletes its copy in one transaction, so the slot's accounts exist in exactly one shard.

    A crash between steps leaves the slot refused everywhere (unavailable, never written twice);
    running the same command again reads where it stopped (the target's move record, etcd's
    owner) and does only what is left; moving the slot on from a shard whose incoming move
    stopped after its flip finishes that move first, and a copy sitting on a third shard makes
    any other target refused. Transfers into the slot from other shards need nothing here:
    refused while it moves, their leg 2 lands on the new owner after the flip, and the source's
    settle moves its transit credit to match (migration 0003).
    """
    clock = StepClock(progress)
    source, epoch, rev = ops.slot_owner(slot)
    if source == to_shard:
        origin = ops.incoming_move(to_shard, slot, epoch)
        if origin is None:
            raise RehomeRefused(f"slot {slot} already belongs to {to_shard}")
        # Flipped, then stopped: the source may still hold the rows (finish_out knows).
        clock.step(f"slot {slot}: resuming the move {origin} -> {to_shard} (epoch {epoch})")
        deleted = ops.finish_out(origin, to_shard, slot, epoch, slot_move_id(slot, epoch))
        clock.step(f"{origin}: its half posted and rows deleted: {deleted}")
        return _rehome_result(slot, origin, to_shard, epoch, {}, deleted, clock, resumed=True)

    new_epoch = epoch + 1
    move_id = slot_move_id(slot, new_epoch)
    clock.step(f"slot {slot}: {source} (epoch {epoch}) -> {to_shard}, move {move_id}")
    # The move that brought the slot to the source may have stopped after its flip: finish it
    # (a no-op when it finished), or the old shard would keep a copy of rows about to move on.
    prior = ops.incoming_move(source, slot, epoch)
    if prior is not None and ops.finish_out(prior, source, slot, epoch, slot_move_id(slot, epoch)):
        clock.step(f"finished the earlier move {prior} -> {source} of slot {slot}")
    # A move stopped after its copy must be finished toward the same target: copying to a
    # second one would leave two shards owning the slot at the same epoch.
    for other in ops.shards():
        if other != to_shard and ops.incoming_move(other, slot, new_epoch) is not None:
            raise RehomeRefused(
                f"slot {slot} is half-moved to {other} (it holds the copy at epoch "
                f"{new_epoch}): finish that move first with "
                f"`txr rehome --slot {slot} --to {other}`"
            )
    ops.unown(source, slot, epoch)
    clock.step(f"{source} no longer owns slot {slot}: writes to it refused")

    origin = ops.incoming_move(to_shard, slot, new_epoch)
    if origin is not None and origin != source:
        raise RehomeError(
            f"{to_shard} received slot {slot} at epoch {new_epoch} from {origin}, but etcd "
            f"says {source} owns it: inspect both shards before doing anything"
        )
    copied: dict[str, int] = {}
    if origin is None:
        _drain(ops, source, slot, epoch, drain_timeout_s, clock)
        copied = ops.copy_in(source, to_shard, slot, new_epoch, move_id)
        clock.step(f"{to_shard} holds the rows and owns slot {slot} at epoch {new_epoch}: {copied}")
    else:
        clock.step(f"{to_shard} already holds the rows (an earlier run copied them)")

    try:
        ops.cas_slot(slot, to_shard, new_epoch, rev)
    except CasConflict as exc:
        raise RehomeError(
            f"the slot map changed in etcd during the move of slot {slot}; it stays unowned "
            f"on {source} and owned by {to_shard} at epoch {new_epoch}, refused everywhere: "
            f"run `txr rehome --slot {slot} --to {to_shard}` again to finish"
        ) from exc
    clock.step(f"etcd: slot {slot} -> {to_shard} at epoch {new_epoch}: writes resume")
    deleted = ops.finish_out(source, to_shard, slot, new_epoch, move_id)
    clock.step(f"{source}: its half posted and rows deleted: {deleted}")
    return _rehome_result(
        slot, source, to_shard, new_epoch, copied, deleted, clock, resumed=origin is not None
    )


def _drain(
    ops: RehomeOps, source: str, slot: int, epoch: int, timeout_s: float, clock: StepClock
) -> None:
    pending = ops.pending_outbound(source, slot, nudge=True)
    if pending:
        clock.step(f"waiting for {pending} outbound transfers of slot {slot} to settle")
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            ops.own(source, slot, epoch)
            raise RehomeError(
                f"slot {slot} still has {pending} outbound transfers in flight on {source} "
                f"after {timeout_s:.0f}s (a destination does not answer?): the move is rolled "
                f"back, {source} owns the slot again at epoch {epoch}; retry once they settle"
            )
        time.sleep(REHOME_DRAIN_POLL_S)
        pending = ops.pending_outbound(source, slot, nudge=False)
    clock.step(f"no outbound transfer of slot {slot} in flight")


def _rehome_result(
    slot: int,
    source: str,
    target: str,
    epoch: int,
    copied: dict[str, int],
    deleted: dict[str, int],
    clock: StepClock,
    *,
    resumed: bool,
) -> dict[str, Any]:
    return {
        "slot": slot,
        "from": source,
        "to": target,
        "epoch": epoch,
        "move_id": slot_move_id(slot, epoch),
        "resumed": resumed,
        "copied": copied,
        "deleted": deleted,
        "steps": [{"step": st, "at_s": round(t, 4)} for st, t in clock.steps],
    }
