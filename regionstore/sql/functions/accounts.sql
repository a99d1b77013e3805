-- txr.create_account: open a customer account (balance 0, version 1) under the fence (G5),
-- idempotently when the caller gives a key (issue 16). Applied with CREATE OR REPLACE on every
-- migrate (regionstore.migrate), recorded by checksum.

-- The signature before idempotent opens (0001): dropped so that a call is never ambiguous.
DROP FUNCTION IF EXISTS txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb);

-- Codes: ok, id_taken (a clash of the 48 random bits: the router retries another id),
-- stale_epoch, wrong_shard (nothing written), replayed (the key was used with the same
-- fingerprint: the original account's fields are returned, nothing written), key_reused (the
-- key was used with another body: nothing written).
CREATE OR REPLACE FUNCTION txr.create_account(
    p_shard_epoch bigint,
    p_slot_epoch bigint,
    p_id bigint,
    p_tenant text,
    p_currency text,
    p_overdraft_limit bigint,
    p_metadata jsonb,
    p_key text DEFAULT NULL,
    p_fingerprint bytea DEFAULT NULL
)
RETURNS TABLE (
    code text,
    created_at timestamptz,
    account_id bigint,
    currency text,
    overdraft_limit bigint,
    metadata jsonb
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_prior record;
    v_now timestamptz := now();
BEGIN
    IF (p_key IS NULL) <> (p_fingerprint IS NULL) THEN
        RAISE EXCEPTION 'create_account: a key needs its fingerprint';
    END IF;
    code := txr.write_refusal(p_shard_epoch, p_id, p_slot_epoch);
    IF code IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        -- The key's primary key arbitrates concurrent opens with one key: a second opener's
        -- INSERT waits for the first to commit, then does nothing and reads its answer (if the
        -- first rolled back, the second inserts and proceeds).
        INSERT INTO txr.account_open_keys AS k
            (tenant, key, fingerprint, account_id, currency, overdraft_limit, metadata,
             created_at)
        VALUES (p_tenant, p_key, p_fingerprint, p_id, p_currency, p_overdraft_limit,
                coalesce(p_metadata, '{}'::jsonb), v_now)
        ON CONFLICT (tenant, key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.* INTO STRICT v_prior FROM txr.account_open_keys k
             WHERE k.tenant = p_tenant AND k.key = p_key;
            IF v_prior.fingerprint <> p_fingerprint THEN
                code := 'key_reused';
                RETURN NEXT;
                RETURN;
            END IF;
            code := 'replayed';
            created_at := v_prior.created_at;
            account_id := v_prior.account_id;
            currency := v_prior.currency;
            overdraft_limit := v_prior.overdraft_limit;
            metadata := v_prior.metadata;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    INSERT INTO txr.accounts AS a
        (id, tenant, currency, overdraft_limit, metadata, kind, created_at)
    VALUES (p_id, p_tenant, p_currency, p_overdraft_limit, coalesce(p_metadata, '{}'::jsonb),
            'customer', v_now)
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        -- The key row names this id: take it back, the router retries with a new id and key.
        IF p_key IS NOT NULL THEN
            DELETE FROM txr.account_open_keys k WHERE k.tenant = p_tenant AND k.key = p_key;
        END IF;
        code := 'id_taken';
        RETURN NEXT;
        RETURN;
    END IF;
    code := 'ok';
    created_at := v_now;
    account_id := p_id;
    currency := p_currency;
    overdraft_limit := p_overdraft_limit;
    metadata := coalesce(p_metadata, '{}'::jsonb);
    RETURN NEXT;
END;
$$;

-- Functions are executable by PUBLIC by default: a SECURITY DEFINER one must not be.
REVOKE ALL ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb, text,
    bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.create_account(bigint, bigint, bigint, text, text, bigint, jsonb,
    text, bytea) TO __APP_ROLE__;

-- txr.claim_account_key: the arbitration of a keyed open whose account lives on another shard
-- (router.opens). Every open with one (tenant, key) asks the key's arbiter shard first, whatever
-- region it names and whichever router got it (consistency.idempotency.open_shards), so one
-- primary key decides for every region. The row names the account id the opener chose; the
-- account itself is then opened on its own shard by txr.create_account with the same key.
-- Codes: claimed (this call's id is the key's now), replayed (the key was claimed with the same
-- fingerprint: its id is returned), key_reused (another fingerprint: nothing written),
-- stale_epoch (nothing written).
CREATE OR REPLACE FUNCTION txr.claim_account_key(
    p_shard_epoch bigint,
    p_tenant text,
    p_key text,
    p_fingerprint bytea,
    p_id bigint,
    p_currency text,
    p_overdraft_limit bigint,
    p_metadata jsonb
)
RETURNS TABLE (code text, account_id bigint)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_prior record;
BEGIN
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        code := 'stale_epoch';
        RETURN NEXT;
        RETURN;
    END IF;
    -- As in create_account: a concurrent claimer waits for the first to commit, then reads it.
    INSERT INTO txr.account_open_keys AS k
        (tenant, key, fingerprint, account_id, currency, overdraft_limit, metadata, created_at)
    VALUES (p_tenant, p_key, p_fingerprint, p_id, p_currency, p_overdraft_limit,
            coalesce(p_metadata, '{}'::jsonb), now())
    ON CONFLICT (tenant, key) DO NOTHING;
    IF FOUND THEN
        code := 'claimed';
        account_id := p_id;
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT k.* INTO STRICT v_prior FROM txr.account_open_keys k
     WHERE k.tenant = p_tenant AND k.key = p_key;
    code := CASE WHEN v_prior.fingerprint = p_fingerprint THEN 'replayed' ELSE 'key_reused' END;
    account_id := CASE WHEN code = 'replayed' THEN v_prior.account_id END;
    RETURN NEXT;
END;
$$;

-- txr.release_account_key: give a claim back when its account id turned out to be taken on the
-- account's shard (a clash of the random bits: never this tenant's account), so the next
-- attempt claims a fresh id. Only a claim still naming that id is removed: a concurrent opener
-- that already re-claimed keeps its own. Returns whether a row was removed.
CREATE OR REPLACE FUNCTION txr.release_account_key(
    p_shard_epoch bigint,
    p_tenant text,
    p_key text,
    p_id bigint
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        RETURN false;
    END IF;
    DELETE FROM txr.account_open_keys k
     WHERE k.tenant = p_tenant AND k.key = p_key AND k.account_id = p_id;
    RETURN FOUND;
END;
$$;

REVOKE ALL ON FUNCTION txr.claim_account_key(bigint, text, text, bytea, bigint, text, bigint,
    jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.claim_account_key(bigint, text, text, bytea, bigint, text, bigint,
    jsonb) TO __APP_ROLE__;
REVOKE ALL ON FUNCTION txr.release_account_key(bigint, text, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.release_account_key(bigint, text, text, bigint) TO __APP_ROLE__;
