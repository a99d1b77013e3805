-- 0001: the shard ledger: fencing rows, accounts, transfers, double-entry postings, idempotency
-- keys (the procedures: sql/functions/). Applied by regionstore.migrate as the admin role inside one
-- transaction; __APP_ROLE__ is replaced by the (quoted) application role name.
--
-- Least privilege: the application role can read the tables and EXECUTE the procedures, nothing
-- else. Every write goes through a SECURITY DEFINER procedure with a pinned search_path, so the
-- fencing and floor checks cannot be bypassed by a buggy or compromised router.

CREATE SCHEMA IF NOT EXISTS txr;
REVOKE ALL ON SCHEMA txr FROM PUBLIC;

-- Fencing token, shard half: the epoch this database was promoted under. One row only.
-- fenced = true refuses every write (an old primary after failover or before a switchover).
CREATE TABLE txr.fence (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch bigint NOT NULL CHECK (epoch >= 0),
    fenced boolean NOT NULL DEFAULT false
);

-- Fencing token, slot half: the slots this shard owns, each with the epoch of its last move.
CREATE TABLE txr.owned_slots (
    slot int PRIMARY KEY CHECK (slot BETWEEN 0 AND 4095),
    epoch bigint NOT NULL CHECK (epoch >= 0)
);

CREATE TABLE txr.accounts (
    -- slot << 48 | 48 random bits (consistency/ids.py): 60 bits, never negative.
    id bigint PRIMARY KEY CHECK (id >= 0 AND id < (1::bigint << 60)),
    tenant text NOT NULL CHECK (length(tenant) BETWEEN 1 AND 64),
    currency char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance bigint NOT NULL DEFAULT 0,
    -- Bounded like an amount (consistency.limits.OVERDRAFT_LIMIT_MAX) so a floor never overflows.
    overdraft_limit bigint NOT NULL DEFAULT 0
        CHECK (overdraft_limit BETWEEN 0 AND 1000000000000000),
    -- 1 at creation, +1 per posting: equals the number of ledger entries + 1.
    version bigint NOT NULL DEFAULT 1 CHECK (version >= 1),
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    kind text NOT NULL DEFAULT 'customer' CHECK (kind IN ('customer', 'transit')),
    -- Last line of defence for G3: post_transfers checks first and answers insufficient_funds,
    -- so this CHECK firing means a bug in the procedure.
    CONSTRAINT accounts_floor CHECK (balance >= -overdraft_limit),
    -- consistency.limits.BALANCE_ABS_MAX (2^62): post_transfers answers balance_limit first.
    CONSTRAINT accounts_ceiling CHECK (balance <= 4611686018427387904)
);

CREATE TABLE txr.transfers (
    id uuid PRIMARY KEY,
    tenant text NOT NULL,
    -- No foreign keys on source/destination: a cross-shard leg names an account on another shard.
    source bigint NOT NULL,
    destination bigint NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    currency char(3) NOT NULL,
    reference text,
    status text NOT NULL CHECK (status IN ('pending', 'settled', 'reversed')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE txr.ledger_entries (
    account_id bigint NOT NULL REFERENCES txr.accounts (id),
    -- The account's version right after this posting: 2, 3, ... without gaps.
    seq bigint NOT NULL CHECK (seq >= 2),
    transfer_id uuid NOT NULL,
    -- The other account of the posting (the destination of a debit, the source of a credit),
    -- so a statement line names its counterparty and the transfer's public id can be formed
    -- from the source's slot without a join to a transfer that may live in another shard.
    counterparty bigint NOT NULL,
    -- Signed: a debit is negative, a credit positive; never zero.
    amount bigint NOT NULL CHECK (amount <> 0),
    balance_after bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq)
);

-- The key's scope is (tenant, source account) (API.md). Only successful transfers store a key:
-- a refused transfer writes nothing, so the same key may be retried once funds arrive.
CREATE TABLE txr.idempotency_keys (
    tenant text NOT NULL,
    source bigint NOT NULL,
    key text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint bytea NOT NULL,
    transfer_id uuid NOT NULL,
    status_code int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, source, key)
);

-- The procedures (post_transfers, create_account, the fence helpers) live once each in
-- regionstore/sql/functions/, applied with CREATE OR REPLACE on every migrate.

GRANT USAGE ON SCHEMA txr TO __APP_ROLE__;
GRANT SELECT ON txr.fence, txr.owned_slots, txr.accounts, txr.transfers, txr.ledger_entries,
    txr.idempotency_keys TO __APP_ROLE__;
