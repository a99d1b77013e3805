-- 0001: the shard ledger: fencing rows, accounts, transfers, double-entry postings, idempotency
-- keys, and the two write procedures. Applied by regionstore.migrate as the admin role inside one
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

-- The advisory lock key that orders writes against fencing and slot changes: writers take it
-- shared, admin changes exclusive (so a fence waits for in-flight writes, and every later write
-- reads the new rows). One definition, used by the procedures and regionstore.admin.
CREATE FUNCTION txr.fence_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 7478706500001::bigint $$;

-- txr.post_transfers, the batch procedure, lives in regionstore/sql/functions/ledger.sql.

CREATE FUNCTION txr.create_account(
    p_shard_epoch bigint,
    p_slot_epoch bigint,
    p_id bigint,
    p_tenant text,
    p_currency text,
    p_overdraft_limit bigint,
    p_metadata jsonb
)
RETURNS TABLE (code text, created_at timestamptz)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_fence record;
    v_slot_epoch bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'create_account must run in READ COMMITTED';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(txr.fence_lock_key());
    SELECT f.epoch, f.fenced INTO v_fence FROM txr.fence f;
    IF NOT FOUND OR v_fence.fenced OR v_fence.epoch <> p_shard_epoch THEN
        code := 'stale_epoch';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT s.epoch INTO v_slot_epoch FROM txr.owned_slots s WHERE s.slot = (p_id >> 48);
    IF NOT FOUND OR v_slot_epoch IS DISTINCT FROM p_slot_epoch THEN
        code := 'wrong_shard';
        RETURN NEXT;
        RETURN;
    END IF;
    -- A clash of the 48 random bits is an outcome, not an error: the router retries a new id.
    INSERT INTO txr.accounts AS a (id, tenant, currency, overdraft_limit, metadata, kind)
    VALUES (p_id, p_tenant, p_currency, p_overdraft_limit, coalesce(p_metadata, '{}'::jsonb),
            'customer')
    ON CONFLICT (id) DO NOTHING
    RETURNING a.created_at INTO created_at;
    IF NOT FOUND THEN
        code := 'id_taken';
        created_at := NULL;
    ELSE
        code := 'ok';
    END IF;
    RETURN NEXT;
END;
$$;

-- Functions are executable by PUBLIC by default: a SECURITY DEFINER one must not be.
REVOKE ALL ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb)
    FROM PUBLIC;

GRANT USAGE ON SCHEMA txr TO __APP_ROLE__;
GRANT SELECT ON txr.fence, txr.owned_slots, txr.accounts, txr.transfers, txr.ledger_entries,
    txr.idempotency_keys TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.fence_lock_key() TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb)
    TO __APP_ROLE__;
