-- 0007: ledger events (router.events): what the change feed adds to the account rows it already
-- publishes. The decoder derives transfer.pending/settled/reversed from the transfer rows as
-- committed (leg 1 inserts, the settle updates its status), and account.created from the
-- account inserts; so events come from committed data only, in the shard's commit order.
--
-- Column lists (PostgreSQL 15): only what the public transfer object holds. txr.slot_moves
-- with its key only: a slot move's copy inserts the moved accounts and transfers on the target
-- in the same transaction as its slot_moves row, and those copies are not new events (their
-- events came from the source shard when they were committed there); the decoder skips the
-- events of any transaction that carries a slot_moves row.
ALTER PUBLICATION txr_feed ADD TABLE
    txr.transfers (id, tenant, source, destination, amount, currency, reference, status,
                   created_at, refusal_code),
    txr.slot_moves (move_id, direction);
