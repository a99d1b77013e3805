"""G4 across shards: the pure checker behind ``txr reconcile`` and the chaos checker.

Input: one snapshot per shard, keyed by shard name, each read in one repeatable-read
transaction by ``regionstore.admin.reconcile_snapshot`` (plain dicts, so this module needs no
database and ``consistency`` never imports ``regionstore``)::

    {
      "accounts": count of accounts (customer and transit),
      "totals": {currency: sum of all balances},            # must be 0 per currency
      "balance_mismatches": [...], "version_mismatches": [...],
      "unbalanced_postings": [{"transfer_id", "sum"}],      # this shard's part of split postings
      "leg_violations": [{"transfer_id", "state", "reason"}], # cross-shard legs' entries wrong
      "transit": {remote_shard: {currency: balance}},
      "outbox": [{"transfer_id", "destination_shard", "amount", "currency", "state",
                  "credit_shard"?}],
      "inbox": [{"transfer_id", "source_shard", "result", "amount", "currency",
                 "debit_shard"?}],
      "owned_slots": [slot], "account_slots": [slot],       # optional
      "moves": [{"move_id", "direction", "slot", "epoch", "peer_shard", "amounts"}],
    }

The rules (DESIGN.md G4, sections 6 and 7):

1. Within each shard: balances sum to zero per currency, each account agrees with its entries,
   each cross-shard leg has exactly its entries.
2. Every posting sums to zero. Most postings live on one shard; a slot move leaves some split
   between the shards (a past transfer between a moved and a staying account, the move posting
   itself): their per-shard parts are summed over every shard, which is exact.
3. For every unordered pair of shards (S, D) and currency, the transit accounts net to exactly
   the money in flight between them::

       transit_S[D] + transit_D[S] == in flight between S and D

   Each pending outbound row credited ``transit_C[N]`` (C the shard holding it, N its
   ``destination_shard``); if its leg 2 was applied (the inbox row is on any shard), that
   debited ``transit_L[R]`` (L the inbox row's ``debit_shard``, else the shard holding it; R
   its ``source_shard``): normally the same pair, so it is no longer in flight; applied by a
   new owner of the destination's slot, it is in flight +a on (C, N) and -a on (R, L) until the
   source's settle moves its credit. Settled and reversed transfers must net to zero. A posted
   half of a slot move carries its amounts through the S<->T pair (+ on the source, - on the
   target): a finished move nets to zero.
4. Every finished transfer agrees with its inbox row (found on whichever shard now holds it):
   settled = 'applied' by the shard its credit names, reversed = refused; no inbox row exists
   without its outbox row; no transfer has two outbox or two inbox rows.
5. Slots: a slot's accounts live on one shard, which owns it; a half-done move (one half
   posted) is named, with the command that finishes it.

Snapshots of different shards are not taken at one instant: run this on a quiescent system, or
repeat until a round comes back clean (a delivery or a move between two snapshots can show a
transient discrepancy, never hide a real one for good).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from itertools import combinations
from typing import Any, Final

from consistency.saga import TransferStatus

APPLIED: Final = "applied"
PENDING: Final = TransferStatus.PENDING
SETTLED: Final = TransferStatus.SETTLED
REVERSED: Final = TransferStatus.REVERSED

_LOCAL_LISTS: Final = (
    ("balance_mismatches", "account balance != sum of its entries"),
    ("version_mismatches", "account version != entries + 1"),
    ("leg_violations", "cross-shard leg entries wrong"),
)

Pair = tuple[str, str]


def _pair(x: str, y: str) -> Pair:
    return (x, y) if x <= y else (y, x)


def _index(
    snapshots: Mapping[str, Mapping[str, Any]], key: str, problems: list[str]
) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """transfer id -> (holding shard, row) over every shard; a second holder is a problem."""
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for name, snap in sorted(snapshots.items()):
        for row in snap.get(key, []):
            tid = str(row["transfer_id"])
            if tid in out:
                problems.append(f"transfer {tid} has {key} rows on {out[tid][0]} and {name}")
                continue
            out[tid] = (name, row)
    return out


def reconcile(snapshots: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Discrepancy descriptions, one line each; an empty list means G4 holds."""
    problems: list[str] = []

    # 1. Within each shard.
    for name, snap in sorted(snapshots.items()):
        for currency, total in sorted(snap.get("totals", {}).items()):
            if total != 0:
                problems.append(f"{name}: {currency} balances sum to {total}, not 0")
        for key, what in _LOCAL_LISTS:
            for item in snap.get(key, []):
                problems.append(f"{name}: {what}: {item}")

    # 2. Every posting sums to zero over all shards.
    parts: dict[str, dict[str, int]] = defaultdict(dict)
    for name, snap in sorted(snapshots.items()):
        for item in snap.get("unbalanced_postings", []):
            parts[str(item["transfer_id"])][name] = int(item["sum"])
    for tid, by_shard in sorted(parts.items()):
        if sum(by_shard.values()) != 0:
            problems.append(f"posting does not sum to zero: {tid} {dict(sorted(by_shard.items()))}")

    outboxes = _index(snapshots, "outbox", problems)
    inboxes = _index(snapshots, "inbox", problems)

    # 3. Each pair's transit accounts net to exactly the money in flight between them.
    flight: dict[Pair, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tid, (holder, row) in outboxes.items():
        if row["state"] != PENDING:
            continue
        credit = row.get("credit_shard") or holder
        flight[_pair(credit, row["destination_shard"])][row["currency"]] += int(row["amount"])
        found = inboxes.get(tid)
        if found is not None and found[1]["result"] == APPLIED:
            at, applied = found
            debit = applied.get("debit_shard") or at
            flight[_pair(debit, applied["source_shard"])][row["currency"]] -= int(row["amount"])
    for name, snap in snapshots.items():
        for move in snap.get("moves", []):
            sign = 1 if move["direction"] == "out" else -1
            for cur, amount in move["amounts"].items():
                flight[_pair(name, move["peer_shard"])][cur] += sign * int(amount)
    names = sorted(snapshots)
    for s, d in combinations(names, 2):
        ts = snapshots[s].get("transit", {}).get(d, {})
        td = snapshots[d].get("transit", {}).get(s, {})
        expected = flight[(s, d)]
        for cur in sorted(set(ts) | set(td) | set(expected)):
            net = int(ts.get(cur, 0)) + int(td.get(cur, 0))
            if net != expected[cur]:
                problems.append(
                    f"{s}<->{d}: {cur} transit accounts net {net} but {expected[cur]} is in flight"
                )
    # A shard's transit account toward itself: leg 2 of a transfer it sent landed on itself
    # (the destination's slot moved here while the transfer was in flight).
    for name, snap in sorted(snapshots.items()):
        own = snap.get("transit", {}).get(name, {})
        expected = flight[(name, name)]
        for cur in sorted(set(own) | set(expected)):
            if int(own.get(cur, 0)) != expected[cur]:
                problems.append(
                    f"{name}: {cur} transit toward itself holds {own.get(cur, 0)} but "
                    f"{expected[cur]} is in flight"
                )
    # Transit toward a shard we have no snapshot of cannot be checked: say so if not zero.
    for name, snap in sorted(snapshots.items()):
        for remote, balances in sorted(snap.get("transit", {}).items()):
            if remote in snapshots:
                continue  # checked above (pairs, or toward itself)
            for cur, bal in sorted(balances.items()):
                if bal != 0:
                    problems.append(
                        f"{name}: transit toward {remote} holds {cur} {bal}, "
                        f"but {remote} is not in the snapshots"
                    )

    # 4. Every finished transfer agrees with its inbox row, wherever that row lives now.
    for tid, (holder, row) in sorted(outboxes.items()):
        state, dst = row["state"], row["destination_shard"]
        if state == PENDING:
            continue
        if dst not in snapshots:
            problems.append(f"{holder}: {state} transfer {tid} to unknown shard {dst}")
            continue
        found = inboxes.get(tid)
        if found is None:
            problems.append(f"{holder}: {state} transfer {tid} has no inbox row (sent to {dst})")
            continue
        at, got = found
        if state == SETTLED and got["result"] != APPLIED:
            problems.append(
                f"{holder}: settled transfer {tid} was refused at {at} ({got['result']})"
            )
        elif state == SETTLED and (got.get("debit_shard") or at) != dst:
            problems.append(
                f"{holder}: settled transfer {tid} credits transit toward {dst} but "
                f"{got.get('debit_shard') or at} debited it"
            )
        elif state == SETTLED and got["source_shard"] != (row.get("credit_shard") or holder):
            problems.append(
                f"{holder}: settled transfer {tid} was credited to transit on "
                f"{row.get('credit_shard') or holder} but {at} debited its transit toward "
                f"{got['source_shard']}"
            )
        elif state == REVERSED and got["result"] == APPLIED:
            problems.append(f"{holder}: reversed transfer {tid} was applied at {at}")
    for tid, (at, row) in sorted(inboxes.items()):
        src = row["source_shard"]
        if src not in snapshots:
            problems.append(f"{at}: inbox row {tid} from unknown shard {src}")
        elif tid not in outboxes:
            problems.append(f"{at}: inbox row {tid} has no outbox row (sent by {src})")

    # 5. Slots and moves.
    problems += _slot_problems(snapshots)
    return problems


def _slot_problems(snapshots: Mapping[str, Mapping[str, Any]]) -> list[str]:
    problems: list[str] = []
    holders: dict[int, list[str]] = defaultdict(list)
    owners: dict[int, list[str]] = defaultdict(list)
    for name, snap in sorted(snapshots.items()):
        for slot in snap.get("account_slots", []):
            holders[int(slot)].append(name)
        for slot in snap.get("owned_slots", []):
            owners[int(slot)].append(name)
    for slot, names in sorted(owners.items()):
        if len(names) > 1:
            problems.append(f"slot {slot} is owned by {', '.join(names)}")
    halves: dict[str, dict[str, tuple[str, Mapping[str, Any]]]] = defaultdict(dict)
    for name, snap in sorted(snapshots.items()):
        for move in snap.get("moves", []):
            halves[str(move["move_id"])][move["direction"]] = (name, move)
    unfinished: set[int] = set()
    for move_id, sides in sorted(halves.items()):
        if "in" in sides and "out" in sides:
            (tgt, m_in), (src, m_out) = sides["in"], sides["out"]
            if (m_in["peer_shard"], m_out["peer_shard"], m_in["amounts"]) != (
                src,
                tgt,
                m_out["amounts"],
            ):
                problems.append(f"slot move {move_id}: its halves disagree: {m_in} vs {m_out}")
            continue
        direction, (name, move) = next(iter(sides.items()))
        slot = int(move["slot"])
        if direction == "in" and move["peer_shard"] in snapshots:
            unfinished.add(slot)
            problems.append(
                f"slot {slot}: move {move['peer_shard']} -> {name} (epoch {move['epoch']}) is "
                f"unfinished: run `txr rehome --slot {slot} --to {name}` to finish it"
            )
        elif direction == "out" and move["peer_shard"] in snapshots:
            problems.append(f"slot move {move_id}: {name} posted its half, the target none")
    if not all("account_slots" in s and "owned_slots" in s for s in snapshots.values()):
        return problems  # older snapshots: nothing to check slots against
    for slot, names in sorted(holders.items()):
        if len(names) > 1 and slot not in unfinished:
            problems.append(f"slot {slot}: accounts on {', '.join(names)}")
        not_owning = [n for n in names if n not in owners.get(slot, [])]
        if not_owning and slot not in unfinished:
            problems.append(
                f"slot {slot}: accounts on {', '.join(not_owning)}, which does not own it "
                "(a rehome stopped part way? rerun it)"
            )
    return problems


def summarize(snapshots: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shard, for operators: ``{"accounts", "pending", "in_flight", "inbox", "sums"}``.

    ``in_flight`` adds pending outbound amounts over all currencies (a size indicator only;
    the per-currency check is ``reconcile``'s).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, snap in sorted(snapshots.items()):
        pending = [r for r in snap.get("outbox", []) if r["state"] == PENDING]
        out[name] = {
            "accounts": int(snap.get("accounts", 0)),
            "pending": len(pending),
            "in_flight": sum(int(r["amount"]) for r in pending),
            "inbox": len(snap.get("inbox", [])),
            "sums": dict(snap.get("totals", {})),
        }
    return out
