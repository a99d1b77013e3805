"""G4 across shards: the pure checker behind ``txr reconcile`` and the chaos checker.

Input: one snapshot per shard, keyed by shard name, each read in one repeatable-read
transaction by ``regionstore.admin.reconcile_snapshot`` (plain dicts, so this module needs no
database and ``consistency`` never imports ``regionstore``)::

    {
      "accounts": count of accounts (customer and transit),
      "totals": {currency: sum of all balances},            # must be 0 per currency
      "balance_mismatches": [...], "version_mismatches": [...],
      "unbalanced_postings": [{"transfer_id", "sum"}],
      "leg_violations": [{"transfer_id", "state", "reason"}], # cross-shard legs' entries wrong
      "transit": {remote_shard: {currency: balance}},
      "outbox": [{"transfer_id", "destination_shard", "amount", "currency", "state"}],
      "inbox": [{"transfer_id", "source_shard", "result"}],
    }

The rules (DESIGN.md G4, section 6), for every unordered pair of shards (S, D) and currency:

    transit_S[D] + transit_D[S] == in_flight(S->D) + in_flight(D->S)

where ``in_flight(S->D)`` sums the amounts of S's pending outbox rows to D that D's inbox has not
'applied' (a message D applied but S has not yet marked settled has moved its money already;
one D refused is still in flight until S posts the reversal). Moreover a settled transfer has an
'applied' inbox row at its destination, a reversed one a refusal there, and no inbox row exists
without an outbox row at its source.

Snapshots of different shards are not taken at one instant: run this on a quiescent system, or
repeat until a round comes back clean (a delivery between two snapshots can show a transient
discrepancy, never hide a real one for good).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from itertools import combinations
from typing import Any, Final

APPLIED: Final = "applied"
PENDING: Final = "pending"
SETTLED: Final = "settled"
REVERSED: Final = "reversed"

_LOCAL_LISTS: Final = (
    ("balance_mismatches", "account balance != sum of its entries"),
    ("version_mismatches", "account version != entries + 1"),
    ("unbalanced_postings", "posting does not sum to zero"),
    ("leg_violations", "cross-shard leg entries wrong"),
)


def _inbox_by_id(snapshot: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(row["transfer_id"]): row for row in snapshot.get("inbox", [])}


def reconcile(snapshots: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Discrepancy descriptions, one line each; an empty list means G4 holds."""
    problems: list[str] = []
    inboxes = {name: _inbox_by_id(snap) for name, snap in snapshots.items()}

    # 1. Within each shard: every posting balances, accounts agree with their entries.
    for name, snap in sorted(snapshots.items()):
        for currency, total in sorted(snap.get("totals", {}).items()):
            if total != 0:
                problems.append(f"{name}: {currency} balances sum to {total}, not 0")
        for key, what in _LOCAL_LISTS:
            for item in snap.get(key, []):
                problems.append(f"{name}: {what}: {item}")

    # 2. Each pair's transit accounts net to exactly the money in flight between them.
    in_flight: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for src, snap in snapshots.items():
        for row in snap.get("outbox", []):
            if row["state"] != PENDING:
                continue
            dst = row["destination_shard"]
            applied = inboxes.get(dst, {}).get(str(row["transfer_id"]))
            if applied is not None and applied["result"] == APPLIED:
                continue
            in_flight[(src, dst)][row["currency"]] += int(row["amount"])
    names = sorted(snapshots)
    for s, d in combinations(names, 2):
        ts = snapshots[s].get("transit", {}).get(d, {})
        td = snapshots[d].get("transit", {}).get(s, {})
        currencies = set(ts) | set(td) | set(in_flight[(s, d)]) | set(in_flight[(d, s)])
        for cur in sorted(currencies):
            net = int(ts.get(cur, 0)) + int(td.get(cur, 0))
            flight = in_flight[(s, d)][cur] + in_flight[(d, s)][cur]
            if net != flight:
                problems.append(
                    f"{s}<->{d}: {cur} transit accounts net {net} but {flight} is in flight"
                )
    # Transit toward a shard we have no snapshot of cannot be checked: say so if not zero.
    for name, snap in sorted(snapshots.items()):
        for remote, balances in sorted(snap.get("transit", {}).items()):
            if remote in snapshots:
                continue
            for cur, bal in sorted(balances.items()):
                if bal != 0:
                    problems.append(
                        f"{name}: transit toward {remote} holds {cur} {bal}, "
                        f"but {remote} is not in the snapshots"
                    )

    # 3. Every finished transfer agrees with its destination's inbox.
    for src, snap in sorted(snapshots.items()):
        for row in snap.get("outbox", []):
            state, dst, tid = row["state"], row["destination_shard"], str(row["transfer_id"])
            if state == PENDING:
                continue
            if dst not in snapshots:
                problems.append(f"{src}: {state} transfer {tid} to unknown shard {dst}")
                continue
            got = inboxes[dst].get(tid)
            if got is None:
                problems.append(f"{src}: {state} transfer {tid} has no inbox row at {dst}")
            elif state == SETTLED and got["result"] != APPLIED:
                problems.append(
                    f"{src}: settled transfer {tid} was refused at {dst} ({got['result']})"
                )
            elif state == REVERSED and got["result"] == APPLIED:
                problems.append(f"{src}: reversed transfer {tid} was applied at {dst}")

    # 4. No inbox row without its outbox row at the source.
    outboxes = {
        name: {str(r["transfer_id"]) for r in snap.get("outbox", [])}
        for name, snap in snapshots.items()
    }
    for dst, inbox in sorted(inboxes.items()):
        for tid, row in sorted(inbox.items()):
            src = row["source_shard"]
            if src not in outboxes:
                problems.append(f"{dst}: inbox row {tid} from unknown shard {src}")
            elif tid not in outboxes[src]:
                problems.append(f"{dst}: inbox row {tid} has no outbox row at {src}")
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
