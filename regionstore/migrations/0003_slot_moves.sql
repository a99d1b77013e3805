-- 0003: moving a slot between shards (`txr rehome`) keeps G4 exact and in-flight money settling.
--
-- What a move does to the ledger. A slot's rows travel verbatim to the target shard: accounts,
-- their whole ledger history, their transfers, idempotency keys, outbox and inbox rows. Nothing
-- is rewritten: a statement read from the new shard is the same statement, versions carry on.
-- What changes is which shard holds the money, and that change is itself posted:
--
--   source S: for each moved account with balance b, transit_S[T] +b (counterparty: the account)
--   target T: for each moved account with balance b, transit_T[S] -b (counterparty: the account)
--
-- under one move id, recorded in txr.slot_moves on both sides. So each shard's balances still
-- sum to zero, the S<->T transit pair nets to zero once both halves are posted, and an auditor
-- can trace every moved balance to the move that carried it. A posting whose two entries now sit
-- on two shards (a historical same-shard transfer between a moved and a staying account; the
-- move posting itself) balances across the shards: `txr reconcile` sums each posting over every
-- shard, which is exact, and names a half-posted move until `txr rehome` finishes it.
--
-- In-flight messages:
-- * Outbound from the moved slot: a slot moves only once its outbound messages are final (the
--   rehome waits, bounded, with the slot refused, then rolls back if they do not drain). A
--   pending message's money sits in the source's transit account; moving the row would move
--   the obligation to a shard that cannot post the reversal against that account. slot_move_in
--   and slot_move_out refuse to run with one pending.
-- * Inbound to the moved slot: leg 2 lands on the new owner, which debits ITS transit account
--   toward the source shard. Leg 1 credited the source's transit account toward the OLD owner,
--   so settle_outbound, told where leg 2's debit happened, moves that credit in one balanced
--   posting on the source (transit[old] -a, transit[new] +a): every pair nets to zero again.
-- * Final rows that moved keep naming the shard whose transit account holds their leg's transit
--   entry (outbox.credit_shard, inbox.debit_shard): that entry does not move with the slot.

CREATE TABLE txr.slot_moves (
    move_id uuid NOT NULL,
    -- 'in' on the target (written with the copy), 'out' on the source (written with the delete).
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    slot int NOT NULL CHECK (slot BETWEEN 0 AND 4095),
    -- The slot epoch the target owns the slot under after this move.
    epoch bigint NOT NULL CHECK (epoch >= 1),
    -- The other shard of the move: the source on the target, the target on the source.
    peer_shard text NOT NULL CHECK (length(peer_shard) BETWEEN 1 AND 64),
    accounts int NOT NULL CHECK (accounts >= 0),
    -- {currency: sum of the moved accounts' balances}: what the move posting carried.
    amounts jsonb NOT NULL CHECK (jsonb_typeof(amounts) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (move_id, direction)
);

-- NULL: here. Set on rows that arrived by a slot move, naming the shard that holds the transit
-- entry of their leg (it stays there); kept through later moves.
ALTER TABLE txr.outbox ADD COLUMN credit_shard text;
ALTER TABLE txr.inbox ADD COLUMN debit_shard text;
-- Set by settle_outbound when leg 2 was debited on another shard than leg 1 named (the
-- destination's slot moved in between): the shard leg 1's credit was moved away from.
ALTER TABLE txr.outbox ADD COLUMN rerouted_from text;

-- The functions that use these columns (apply_inbound's debit_shard answer, settle_outbound's
-- p_leg2_shard, post_slot_move, mark_moved_rows) live in sql/functions/{saga,slot_moves}.sql.

GRANT SELECT ON txr.slot_moves TO __APP_ROLE__;
