-- The fence and slot helpers every write procedure shares: one definition each (issue 17).
-- Applied with CREATE OR REPLACE on every migrate (regionstore.migrate), recorded by checksum.

-- The advisory lock key that orders writes against fencing and slot changes: writers take it
-- shared, admin changes exclusive (so a fence waits for in-flight writes, and every later write
-- reads the new rows). One definition, used by the procedures and regionstore.admin.
CREATE OR REPLACE FUNCTION txr.fence_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 7478706500001::bigint $$;

-- The slot of an account id: its top bits above the 48 random ones (consistency/ids.py,
-- tied by tests/unit/test_sql_limits.py).
CREATE OR REPLACE FUNCTION txr.slot_of(p_id bigint) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (p_id >> 48)::int $$;

-- True when writes under p_shard_epoch are accepted (G5). Takes the fence lock shared for the
-- rest of the transaction: writers do not block each other; an admin fence (exclusive) waits
-- for us to commit, and any write queued behind it reads the new fence row. Every write
-- procedure calls it first.
CREATE OR REPLACE FUNCTION txr.fence_ok(p_shard_epoch bigint)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_fence record;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- Each statement must see rows committed while we waited for a lock (the fence after
        -- the advisory lock, balances after the row locks); only READ COMMITTED does.
        RAISE EXCEPTION 'write procedures must run in READ COMMITTED';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(txr.fence_lock_key());
    SELECT f.epoch, f.fenced INTO v_fence FROM txr.fence f;
    RETURN FOUND AND NOT v_fence.fenced AND v_fence.epoch = p_shard_epoch;
END;
$$;

-- Why a write for one account under (p_shard_epoch, p_slot_epoch) must be refused: 'stale_epoch'
-- (G5: fenced, or another epoch; the fence lock is then held shared, as fence_ok says),
-- 'wrong_shard' (the account's slot is not owned here, or owned under another slot epoch: a slot
-- move happened since the router resolved it), or NULL when it may proceed. The one preamble of
-- the procedures that write a single account's rows.
CREATE OR REPLACE FUNCTION txr.write_refusal(
    p_shard_epoch bigint, p_account bigint, p_slot_epoch bigint
)
RETURNS text
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slot_epoch bigint;
BEGIN
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        RETURN 'stale_epoch';
    END IF;
    SELECT s.epoch INTO v_slot_epoch FROM txr.owned_slots s WHERE s.slot = txr.slot_of(p_account);
    IF NOT FOUND OR v_slot_epoch IS DISTINCT FROM p_slot_epoch THEN
        RETURN 'wrong_shard';
    END IF;
    RETURN NULL;
END;
$$;

-- The transit account for (remote shard, currency), created on first use. Not locked here: the
-- caller locks it together with its other rows, in ascending id order.
CREATE OR REPLACE FUNCTION txr.transit_account(p_remote_shard text, p_currency text)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT t.account_id INTO v_id FROM txr.transit_accounts t
     WHERE t.remote_shard = p_remote_shard AND t.currency = p_currency;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    -- A concurrent creator makes this INSERT wait for its commit and then do nothing; the
    -- SELECT after it (a new statement in READ COMMITTED) sees the winner's row.
    INSERT INTO txr.transit_accounts (remote_shard, currency, account_id)
    VALUES (p_remote_shard, p_currency, nextval('txr.transit_account_ids'))
    ON CONFLICT (remote_shard, currency) DO NOTHING
    RETURNING account_id INTO v_id;
    IF FOUND THEN
        INSERT INTO txr.accounts (id, tenant, currency, overdraft_limit, kind)
        VALUES (v_id, '__transit__', p_currency, 0, 'transit');
        RETURN v_id;
    END IF;
    SELECT t.account_id INTO STRICT v_id FROM txr.transit_accounts t
     WHERE t.remote_shard = p_remote_shard AND t.currency = p_currency;
    RETURN v_id;
END;
$$;

REVOKE ALL ON FUNCTION txr.fence_ok(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.transit_account(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.write_refusal(bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.fence_lock_key() TO __APP_ROLE__;
