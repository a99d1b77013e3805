-- 0002: cross-shard transfers as a saga over a transactional outbox (DESIGN.md section 6).
--
-- Leg 1 (source shard, post_transfers): debit the source, credit the transit account for the
-- destination shard, outbox row, transfer 'pending', all in one transaction.
-- Leg 2 (destination shard, apply_inbound): debit the transit account for the source shard,
-- credit the destination, inbox row keyed by transfer id, all in one transaction: exactly once.
-- Settle (source shard, settle_outbound): mark 'settled', or post the reversal exactly once.
--
-- G4 per shard: every posting (source+transit, transit+destination, transit+source) sums to 0.
-- G4 across shards: transit_S[D] + transit_D[S] = money in flight between S and D.

-- Transit accounts: one per (remote shard, currency), created lazily by the procedures. Their ids
-- are negative (a sequence counting down) so they can never collide with a customer id
-- (slot << 48 | rand48 >= 0), and they sort before every customer id, so "lock in ascending id
-- order" locks the transit rows first everywhere. They have no floor: the source side goes up by
-- the money sent and the destination side down by the money received; only their pair sum means
-- anything.
ALTER TABLE txr.accounts DROP CONSTRAINT accounts_id_check;
ALTER TABLE txr.accounts ADD CONSTRAINT accounts_id_check CHECK (
    (kind = 'customer' AND id >= 0 AND id < (1::bigint << 60))
    OR (kind = 'transit' AND id < 0));
ALTER TABLE txr.accounts DROP CONSTRAINT accounts_floor;
ALTER TABLE txr.accounts ADD CONSTRAINT accounts_floor CHECK (
    kind = 'transit' OR balance >= -overdraft_limit);
-- A transit account may go negative, but not without bound: the same 2^62 as the ceiling
-- (consistency.limits.BALANCE_ABS_MAX), so no arithmetic on it can overflow a bigint.
ALTER TABLE txr.accounts ADD CONSTRAINT accounts_transit_floor CHECK (
    balance >= -4611686018427387904);

CREATE SEQUENCE txr.transit_account_ids AS bigint INCREMENT BY -1 START WITH -1 MAXVALUE -1;

CREATE TABLE txr.transit_accounts (
    remote_shard text NOT NULL CHECK (length(remote_shard) BETWEEN 1 AND 64),
    currency char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Deferred: the mapping row is inserted first (it is what arbitrates a concurrent lazy
    -- creation), the account row right after, in the same transaction.
    account_id bigint NOT NULL UNIQUE CHECK (account_id < 0)
        REFERENCES txr.accounts (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (remote_shard, currency)
);

ALTER TABLE txr.transfers ADD COLUMN refusal_code text;

-- Outbox: one row per cross-shard transfer, written by leg 1 on the source shard. It stays
-- 'pending' until the source records the destination's answer (settled or reversed): while
-- pending, its amount is money in flight (G4).
CREATE TABLE txr.outbox (
    transfer_id uuid PRIMARY KEY,
    tenant text NOT NULL,
    source bigint NOT NULL,
    destination bigint NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    currency char(3) NOT NULL,
    -- As resolved at leg 1: it names the transit account that leg 1 credited.
    destination_shard text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'settled', 'reversed')),
    attempts int NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL,
    refusal_code text,
    created_at timestamptz NOT NULL DEFAULT now(),
    settled_at timestamptz,
    CHECK ((state = 'reversed') = (refusal_code IS NOT NULL)),
    CHECK ((state = 'pending') = (settled_at IS NULL))
);
-- The relays' claim query: due pending rows, oldest due first. Partial, so settled history
-- does not slow it down.
CREATE INDEX outbox_due ON txr.outbox (next_attempt_at) WHERE state = 'pending';

-- Inbox: one row per delivered cross-shard transfer on the destination shard, written in the
-- same transaction as the credit (or as the refusal), so a re-delivery finds it and gets the
-- same answer: the destination applies each transfer exactly once (G2).
CREATE TABLE txr.inbox (
    transfer_id uuid PRIMARY KEY,
    source_shard text NOT NULL,
    tenant text NOT NULL,
    source bigint NOT NULL,
    destination bigint NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    currency char(3) NOT NULL,
    -- 'applied', or the refusal code (not_found, currency_mismatch, balance_limit).
    result text NOT NULL
        CHECK (result IN ('applied', 'not_found', 'currency_mismatch', 'balance_limit')),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The procedures (leg 1 in post_transfers, sql/functions/ledger.sql; leg 2, settle and the
-- relay's queue calls in sql/functions/saga.sql) are not defined here: migrations are schema.

GRANT SELECT ON txr.transit_accounts, txr.outbox, txr.inbox TO __APP_ROLE__;
