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

CREATE FUNCTION txr.post_transfers(
    p_shard_epoch bigint,
    p_ids uuid[],
    p_tenants text[],
    p_sources bigint[],
    p_destinations bigint[],
    p_amounts bigint[],
    p_currencies text[],
    p_references text[],
    p_keys text[],
    p_fingerprints bytea[],
    p_source_slot_epochs bigint[],
    p_destination_slot_epochs bigint[]
)
RETURNS TABLE (
    idx int,                    -- 0-based position of the item in the arrays
    code text,
    transfer_id uuid,
    status text,
    created_at timestamptz,
    source_balance bigint,
    source_version bigint,
    destination_balance bigint,
    destination_version bigint
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_n int := coalesce(cardinality(p_ids), 0);
    v_fence record;
    v_src record;
    v_dst record;
    v_src_slot_epoch bigint;
    v_dst_slot_epoch bigint;
    v_idem record;
    v_amount bigint;
    v_sb bigint;
    v_sv bigint;
    v_db bigint;
    v_dv bigint;
    v_now timestamptz := now();
BEGIN
    -- Caller bugs, not business outcomes: they abort the call (StoreInvariantViolation).
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- Each statement below must see rows committed while we waited for a lock (the fence
        -- after the advisory lock, balances after the row locks); only READ COMMITTED does.
        RAISE EXCEPTION 'post_transfers must run in READ COMMITTED';
    END IF;
    -- 256 = consistency.limits.BATCH_ITEMS_MAX: bounds the row locks one transaction holds.
    IF v_n > 256 THEN
        RAISE EXCEPTION 'post_transfers: % items exceed the batch bound 256', v_n;
    END IF;
    IF coalesce(cardinality(p_tenants), 0) <> v_n OR coalesce(cardinality(p_sources), 0) <> v_n
       OR coalesce(cardinality(p_destinations), 0) <> v_n
       OR coalesce(cardinality(p_amounts), 0) <> v_n
       OR coalesce(cardinality(p_currencies), 0) <> v_n
       OR coalesce(cardinality(p_references), 0) <> v_n
       OR coalesce(cardinality(p_keys), 0) <> v_n
       OR coalesce(cardinality(p_fingerprints), 0) <> v_n
       OR coalesce(cardinality(p_source_slot_epochs), 0) <> v_n
       OR coalesce(cardinality(p_destination_slot_epochs), 0) <> v_n THEN
        RAISE EXCEPTION 'post_transfers: parallel arrays differ in length';
    END IF;

    -- 1. Fence (G5). Shared: writers do not block each other; an admin fence (exclusive) waits
    -- for us to commit, and any write queued behind it reads the new fence row.
    PERFORM pg_advisory_xact_lock_shared(txr.fence_lock_key());
    SELECT f.epoch, f.fenced INTO v_fence FROM txr.fence f;
    IF NOT FOUND OR v_fence.fenced OR v_fence.epoch <> p_shard_epoch THEN
        FOR i IN 1 .. v_n LOOP
            idx := i - 1;
            code := 'stale_epoch';
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;

    -- 2. Lock every touched account once, in ascending id order: concurrent batches take their
    -- locks in the same global order, so they can queue but never deadlock.
    PERFORM 1 FROM txr.accounts a
     WHERE a.id = ANY (p_sources || p_destinations)
     ORDER BY a.id
       FOR UPDATE;

    -- 3. Items in order; later items see earlier items' effects (same transaction).
    FOR i IN 1 .. v_n LOOP
        idx := i - 1;
        code := NULL;
        transfer_id := NULL;
        status := NULL;
        created_at := NULL;
        source_balance := NULL;
        source_version := NULL;
        destination_balance := NULL;
        destination_version := NULL;
        v_amount := p_amounts[i];
        IF v_amount IS NULL OR v_amount < 1 OR v_amount > 1000000000000000 THEN
            -- consistency.limits.AMOUNT_MIN/AMOUNT_MAX: the router validates; this is a bug.
            RAISE EXCEPTION 'post_transfers: item % amount % out of range', i - 1, v_amount;
        END IF;

        -- wrong_shard: both slots owned here under the epochs the router believes.
        SELECT s.epoch INTO v_src_slot_epoch FROM txr.owned_slots s
         WHERE s.slot = (p_sources[i] >> 48);
        IF NOT FOUND THEN v_src_slot_epoch := NULL; END IF;
        SELECT s.epoch INTO v_dst_slot_epoch FROM txr.owned_slots s
         WHERE s.slot = (p_destinations[i] >> 48);
        IF NOT FOUND THEN v_dst_slot_epoch := NULL; END IF;
        IF v_src_slot_epoch IS NULL OR v_dst_slot_epoch IS NULL
           OR v_src_slot_epoch IS DISTINCT FROM p_source_slot_epochs[i]
           OR v_dst_slot_epoch IS DISTINCT FROM p_destination_slot_epochs[i] THEN
            code := 'wrong_shard';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- not_found: missing, another tenant's, or a transit account (never a client's).
        SELECT a.tenant, a.currency, a.balance, a.overdraft_limit, a.version, a.kind
          INTO v_src FROM txr.accounts a WHERE a.id = p_sources[i];
        IF NOT FOUND OR v_src.tenant <> p_tenants[i] OR v_src.kind <> 'customer' THEN
            code := 'not_found';
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT a.tenant, a.currency, a.balance, a.overdraft_limit, a.version, a.kind
          INTO v_dst FROM txr.accounts a WHERE a.id = p_destinations[i];
        IF NOT FOUND OR v_dst.tenant <> p_tenants[i] OR v_dst.kind <> 'customer' THEN
            code := 'not_found';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- replayed / idempotency_key_reused (G2). The source row lock serialises every writer of
        -- this key scope, so a concurrent first use has either committed (we see it) or not.
        SELECT k.fingerprint, k.transfer_id INTO v_idem FROM txr.idempotency_keys k
         WHERE k.tenant = p_tenants[i] AND k.source = p_sources[i] AND k.key = p_keys[i];
        IF FOUND THEN
            IF v_idem.fingerprint = p_fingerprints[i] THEN
                SELECT t.id, t.status, t.created_at INTO transfer_id, status, created_at
                  FROM txr.transfers t WHERE t.id = v_idem.transfer_id;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'idempotency key % names a missing transfer %',
                        p_keys[i], v_idem.transfer_id;
                END IF;
                code := 'replayed';
                source_balance := v_src.balance;
                source_version := v_src.version;
                destination_balance := v_dst.balance;
                destination_version := v_dst.version;
            ELSE
                code := 'idempotency_key_reused';
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;

        IF v_src.currency <> p_currencies[i] OR v_dst.currency <> p_currencies[i] THEN
            code := 'currency_mismatch';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- G3: never below the floor. No overflow: |balance| <= 2^62 and amount <= 10^15.
        IF v_src.balance - v_amount < -v_src.overdraft_limit THEN
            code := 'insufficient_funds';
            RETURN NEXT;
            CONTINUE;
        END IF;
        -- consistency.limits.BALANCE_ABS_MAX = 2^62.
        IF v_dst.balance + v_amount > 4611686018427387904 THEN
            code := 'balance_limit';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- ok: one balanced posting. Debit and credit are separate statements so that a transfer
        -- from an account to itself still yields two entries with consecutive seqs.
        UPDATE txr.accounts a SET balance = a.balance - v_amount, version = a.version + 1
         WHERE a.id = p_sources[i]
        RETURNING a.balance, a.version INTO v_sb, v_sv;
        UPDATE txr.accounts a SET balance = a.balance + v_amount, version = a.version + 1
         WHERE a.id = p_destinations[i]
        RETURNING a.balance, a.version INTO v_db, v_dv;
        -- The rows are locked by us: they moved by exactly this posting and nothing else.
        IF p_sources[i] <> p_destinations[i] AND (
               v_sb <> v_src.balance - v_amount OR v_sv <> v_src.version + 1
            OR v_db <> v_dst.balance + v_amount OR v_dv <> v_dst.version + 1) THEN
            RAISE EXCEPTION 'post_transfers: item % balances moved under a row lock', i - 1;
        END IF;

        INSERT INTO txr.transfers
            (id, tenant, source, destination, amount, currency, reference, status, created_at)
        VALUES (p_ids[i], p_tenants[i], p_sources[i], p_destinations[i], v_amount,
                p_currencies[i], p_references[i], 'settled', v_now);
        INSERT INTO txr.ledger_entries
            (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
        VALUES (p_sources[i], v_sv, p_ids[i], p_destinations[i], -v_amount, v_sb, v_now),
               (p_destinations[i], v_dv, p_ids[i], p_sources[i], v_amount, v_db, v_now);
        -- G4: the posting balances (debit + credit = 0), asserted on what was written.
        IF (SELECT sum(e.amount) FROM txr.ledger_entries e
             WHERE (e.account_id, e.seq) IN ((p_sources[i], v_sv), (p_destinations[i], v_dv)))
           <> 0 THEN
            RAISE EXCEPTION 'post_transfers: item % posting does not balance', i - 1;
        END IF;
        INSERT INTO txr.idempotency_keys
            (tenant, source, key, fingerprint, transfer_id, status_code, created_at)
        VALUES (p_tenants[i], p_sources[i], p_keys[i], p_fingerprints[i], p_ids[i], 201, v_now);

        code := 'ok';
        transfer_id := p_ids[i];
        status := 'settled';
        created_at := v_now;
        IF p_sources[i] = p_destinations[i] THEN
            v_sb := v_db;
            v_sv := v_dv;
        END IF;
        source_balance := v_sb;
        source_version := v_sv;
        destination_balance := v_db;
        destination_version := v_dv;
        RETURN NEXT;
    END LOOP;
    RETURN;
END;
$$;

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
REVOKE ALL ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[], bigint[],
    text[], text[], text[], bytea[], bigint[], bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb)
    FROM PUBLIC;

GRANT USAGE ON SCHEMA txr TO __APP_ROLE__;
GRANT SELECT ON txr.fence, txr.owned_slots, txr.accounts, txr.transfers, txr.ledger_entries,
    txr.idempotency_keys TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.fence_lock_key() TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[],
    bigint[], text[], text[], text[], bytea[], bigint[], bigint[]) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb)
    TO __APP_ROLE__;
