-- The cross-shard saga (DESIGN.md section 6; tables: migrations 0002, 0003, 0006): leg 2 on
-- the destination (apply_inbound), the source's mark (settle_outbound), the relays' queue calls
-- (claim_outbox, defer_outbox), and the signatures that tie them together. Leg 1 is in
-- post_transfers (ledger.sql). Applied with CREATE OR REPLACE on every migrate
-- (regionstore.migrate), recorded by checksum.
--
-- Authentication (issue 16). Leg 1 signs each outbox message: HMAC-SHA256 over every field that
-- moves money (transfer id, source shard, tenant, source, destination, amount, currency, leg 1's
-- commit time) with the newest key in txr.saga_keys, which only the function owner can read.
-- Leg 2 applies only a message whose MAC checks, and signs its answer (a receipt over the
-- transfer id, the result and the shard whose transit account it debited); settle_outbound
-- settles or reverses only on a receipt that checks. So a login role (the relays' own, or the
-- application's, which cannot even call these) can replay a genuine step, which is idempotent,
-- but cannot credit an account without a leg 1, change an amount or a destination, or reverse a
-- transfer that leg 2 applied.
--
-- Literals tied to consistency/limits.py (tests/unit/test_sql_limits.py):
-- 1000000000000000 = AMOUNT_MAX, 4611686018427387904 = BALANCE_ABS_MAX,
-- 604800 s = SAGA_DELIVERY_WINDOW_S (txr.delivery_window).

-- The signatures before authentication: dropped, so no call can reach an unverified step
-- (CREATE OR REPLACE cannot change a signature or a result type).
DROP FUNCTION IF EXISTS txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text,
    bigint);
DROP FUNCTION IF EXISTS txr.settle_outbound(bigint, uuid, text);
DROP FUNCTION IF EXISTS txr.settle_outbound(bigint, uuid, text, text);
DROP FUNCTION IF EXISTS txr.claim_outbox(int, double precision);

-- How long after leg 1 a leg 2 is still accepted (consistency.limits.SAGA_DELIVERY_WINDOW_S).
CREATE OR REPLACE FUNCTION txr.delivery_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT make_interval(secs => 604800) $$;

-- The signed form of a message: a JSON array (unambiguous: every string is quoted) with a
-- version tag, leg 1's commit time in whole microseconds.
CREATE OR REPLACE FUNCTION txr.saga_message(
    p_transfer_id uuid, p_source_shard text, p_tenant text, p_source bigint,
    p_destination bigint, p_amount bigint, p_currency text, p_created_at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT convert_to(jsonb_build_array(
        'txr-leg2-v1', p_transfer_id::text, p_source_shard, p_tenant, p_source, p_destination,
        p_amount, p_currency,
        floor(extract(epoch FROM p_created_at) * 1000000)::bigint)::text, 'UTF8')
$$;

-- The MAC of a message under key p_key_id; NULL when there is no such key.
CREATE OR REPLACE FUNCTION txr.saga_mac(
    p_key_id int, p_transfer_id uuid, p_source_shard text, p_tenant text, p_source bigint,
    p_destination bigint, p_amount bigint, p_currency text, p_created_at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT txr_crypto.hmac(
        txr.saga_message(p_transfer_id, p_source_shard, p_tenant, p_source, p_destination,
                         p_amount, p_currency, p_created_at),
        k.secret, 'sha256')
      FROM txr.saga_keys k WHERE k.key_id = p_key_id
$$;

-- The MAC of leg 2's answer: ``p_code`` is 'applied' or the refusal, ``p_leg2_shard`` the shard
-- whose transit account leg 2 debited (the settle moves leg 1's credit to match).
CREATE OR REPLACE FUNCTION txr.saga_receipt(
    p_key_id int, p_transfer_id uuid, p_code text, p_leg2_shard text
) RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT txr_crypto.hmac(
        convert_to(jsonb_build_array('txr-receipt-v1', p_transfer_id::text, p_code,
                                     p_leg2_shard)::text, 'UTF8'),
        k.secret, 'sha256')
      FROM txr.saga_keys k WHERE k.key_id = p_key_id
$$;

-- Leg 1's signature of a new outbox message on this shard: (key id, MAC), both NULL while the
-- shard has no key or no name (its messages wait, refused by leg 2, until
-- sign_unsigned_outbox signs them).
CREATE OR REPLACE FUNCTION txr.saga_sign(
    p_transfer_id uuid, p_tenant text, p_source bigint, p_destination bigint, p_amount bigint,
    p_currency text, p_created_at timestamptz, OUT key_id int, OUT mac bytea
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_self text;
BEGIN
    -- The newest signing key; a staged one (rotation, migration 0008) only verifies.
    SELECT max(k.key_id) INTO key_id FROM txr.saga_keys k WHERE k.signing;
    SELECT s.name INTO v_self FROM txr.shard_identity s;
    IF key_id IS NULL OR v_self IS NULL THEN
        key_id := NULL;
        mac := NULL;
        RETURN;
    END IF;
    mac := txr.saga_mac(key_id, p_transfer_id, v_self, p_tenant, p_source, p_destination,
                        p_amount, p_currency, p_created_at);
END;
$$;

-- Admin, after provisioning a key (regionstore.admin.set_saga_identity): sign the pending
-- messages written before the shard had one. Returns how many it signed.
CREATE OR REPLACE FUNCTION txr.sign_unsigned_outbox()
RETURNS int
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    UPDATE txr.outbox o SET key_id = s.key_id, mac = s.mac
      FROM txr.outbox src
     CROSS JOIN LATERAL txr.saga_sign(src.transfer_id, src.tenant, src.source, src.destination,
                                      src.amount, src.currency::text, src.created_at) s
     WHERE o.transfer_id = src.transfer_id AND o.state = 'pending' AND o.mac IS NULL
       AND s.mac IS NOT NULL;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END;
$$;

-- Leg 2 on the destination shard, exactly once per transfer id (the inbox row).
CREATE OR REPLACE FUNCTION txr.apply_inbound(
    p_shard_epoch bigint,
    p_transfer_id uuid,
    p_source_shard text,
    p_tenant text,
    p_source bigint,
    p_destination bigint,
    p_amount bigint,
    p_currency text,
    p_destination_slot_epoch bigint,
    -- Leg 1's commit time and signature (the outbox row's created_at, key_id, mac).
    p_created_at timestamptz,
    p_key_id int,
    p_mac bytea
)
RETURNS TABLE (
    code text,
    replayed boolean,
    destination_balance bigint,
    destination_version bigint,
    debit_shard text,
    -- This shard's signed answer for settle_outbound; NULL when nothing was recorded.
    receipt bytea
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_prior record;
    v_dst record;
    v_transit bigint;
    v_tb bigint;
    v_tv bigint;
    v_db bigint;
    v_dv bigint;
    v_result text;
    v_now timestamptz := now();
    v_self text;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        RAISE EXCEPTION 'apply_inbound: amount % out of range', p_amount;
    END IF;
    replayed := false;
    debit_shard := NULL;
    receipt := NULL;
    -- Only a message leg 1 signed is applied: the MAC covers every field that moves money, with
    -- a key no login role can read, so a caller can deliver a genuine message (idempotent) but
    -- never forge or alter one. Checked before anything is locked or written.
    IF p_mac IS NULL OR p_key_id IS NULL OR p_created_at IS NULL
       OR txr.saga_mac(p_key_id, p_transfer_id, p_source_shard, p_tenant, p_source,
                       p_destination, p_amount, p_currency, p_created_at)
          IS DISTINCT FROM p_mac THEN
        code := 'unauthenticated';
        RETURN NEXT;
        RETURN;
    END IF;
    -- The inbox keeps a transfer's row for txr.inbox_retention() (retention.sql); a message
    -- older than the delivery window (shorter by the clock margin) could find its row pruned
    -- and apply twice, so it is refused and the money stays in flight for an operator.
    IF p_created_at < v_now - txr.delivery_window() THEN
        code := 'expired';
        RETURN NEXT;
        RETURN;
    END IF;
    -- On wrong_shard nothing is recorded: the relay re-resolves the destination's shard and
    -- delivers there.
    code := txr.write_refusal(p_shard_epoch, p_destination, p_destination_slot_epoch);
    IF code IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;

    SELECT s.name INTO v_self FROM txr.shard_identity s;
    -- Claim the transfer id first: the inbox primary key arbitrates concurrent deliveries. A
    -- second deliverer's INSERT waits for the first to commit and then does nothing (it then
    -- reads the stored answer); if the first rolled back, the second inserts and proceeds.
    -- 'not_found' is a placeholder, overwritten below before commit.
    INSERT INTO txr.inbox
        (transfer_id, source_shard, tenant, source, destination, amount, currency, result,
         created_at)
    VALUES (p_transfer_id, p_source_shard, p_tenant, p_source, p_destination, p_amount,
            p_currency, 'not_found', v_now)
    ON CONFLICT (transfer_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT i.* INTO STRICT v_prior FROM txr.inbox i WHERE i.transfer_id = p_transfer_id;
        -- Same transfer id, different payload: a bug upstream (ids are random 128-bit).
        IF (v_prior.source_shard, v_prior.tenant, v_prior.source, v_prior.destination,
            v_prior.amount, v_prior.currency)
           IS DISTINCT FROM (p_source_shard, p_tenant, p_source, p_destination, p_amount,
                             p_currency::char(3)) THEN
            RAISE EXCEPTION 'apply_inbound: transfer % redelivered with another payload',
                p_transfer_id;
        END IF;
        IF v_prior.result = 'applied' THEN
            SELECT a.balance, a.version INTO destination_balance, destination_version
              FROM txr.accounts a WHERE a.id = p_destination;
            debit_shard := v_prior.debit_shard;
        END IF;
        code := v_prior.result;
        replayed := true;
        receipt := txr.saga_receipt(p_key_id, p_transfer_id, v_prior.result,
                                    coalesce(v_prior.debit_shard, v_self));
        RETURN NEXT;
        RETURN;
    END IF;

    v_transit := txr.transit_account(p_source_shard, p_currency);
    PERFORM 1 FROM txr.accounts a
     WHERE a.id IN (v_transit, p_destination)
     ORDER BY a.id
       FOR UPDATE;
    SELECT a.balance, a.version INTO STRICT v_tb, v_tv FROM txr.accounts a WHERE a.id = v_transit;
    SELECT a.tenant, a.currency, a.balance, a.version, a.kind
      INTO v_dst FROM txr.accounts a WHERE a.id = p_destination;

    IF NOT FOUND OR v_dst.tenant <> p_tenant OR v_dst.kind <> 'customer' THEN
        v_result := 'not_found';
    ELSIF v_dst.currency <> p_currency THEN
        v_result := 'currency_mismatch';
    -- consistency.limits.BALANCE_ABS_MAX = 2^62, for the credit and for the transit debit.
    ELSIF v_dst.balance + p_amount > 4611686018427387904
          OR v_tb - p_amount < -4611686018427387904 THEN
        v_result := 'balance_limit';
    ELSE
        v_result := 'applied';
    END IF;

    IF v_result = 'applied' THEN
        UPDATE txr.accounts a SET balance = a.balance - p_amount, version = a.version + 1
         WHERE a.id = v_transit
        RETURNING a.balance, a.version INTO v_tb, v_tv;
        UPDATE txr.accounts a SET balance = a.balance + p_amount, version = a.version + 1
         WHERE a.id = p_destination
        RETURNING a.balance, a.version INTO v_db, v_dv;
        IF v_db <> v_dst.balance + p_amount OR v_dv <> v_dst.version + 1 THEN
            RAISE EXCEPTION 'apply_inbound: balances moved under a row lock';
        END IF;
        INSERT INTO txr.ledger_entries
            (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
        VALUES (v_transit, v_tv, p_transfer_id, p_destination, -p_amount, v_tb, v_now),
               (p_destination, v_dv, p_transfer_id, p_source, p_amount, v_db, v_now);
        destination_balance := v_db;
        destination_version := v_dv;
    END IF;
    UPDATE txr.inbox i SET result = v_result WHERE i.transfer_id = p_transfer_id;
    code := v_result;
    receipt := txr.saga_receipt(p_key_id, p_transfer_id, v_result, v_self);
    RETURN NEXT;
END;
$$;

-- The source records the destination's answer: settled, or the reversal, exactly once.
CREATE OR REPLACE FUNCTION txr.settle_outbound(
    p_shard_epoch bigint,
    p_transfer_id uuid,
    p_refusal_code text,
    p_leg2_shard text,
    -- apply_inbound's receipt: the destination's signed answer (code and leg 2's shard).
    p_receipt bytea
)
RETURNS TABLE (
    code text,
    status text,
    source_balance bigint,
    source_version bigint
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_msg record;
    v_transit bigint;
    v_new_transit bigint;
    v_tb bigint;
    v_tv bigint;
    v_nb bigint;
    v_nv bigint;
    v_sb bigint;
    v_sv bigint;
    v_now timestamptz := now();
BEGIN
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        code := 'stale_epoch';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT o.* INTO v_msg FROM txr.outbox o WHERE o.transfer_id = p_transfer_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'settle_outbound: no outbox row for transfer %', p_transfer_id;
    END IF;
    -- Only the destination's signed answer settles or reverses: a caller that invents a
    -- refusal (a reversal after leg 2 applied would create money) or a shard is refused.
    IF v_msg.key_id IS NULL OR p_receipt IS NULL
       OR txr.saga_receipt(v_msg.key_id, p_transfer_id, coalesce(p_refusal_code, 'applied'),
                           coalesce(p_leg2_shard, v_msg.destination_shard))
          IS DISTINCT FROM p_receipt THEN
        code := 'unauthenticated';
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_msg.state <> 'pending' THEN
        code := 'already';
        status := v_msg.state;
        SELECT a.balance, a.version INTO source_balance, source_version
          FROM txr.accounts a WHERE a.id = v_msg.source;
        RETURN NEXT;
        RETURN;
    END IF;
    -- A pending message never moves (slot_move_in refuses), so leg 1's credit is here.
    IF v_msg.credit_shard IS NOT NULL THEN
        RAISE EXCEPTION 'settle_outbound: pending transfer % names credit shard %',
            p_transfer_id, v_msg.credit_shard;
    END IF;
    SELECT t.account_id INTO STRICT v_transit FROM txr.transit_accounts t
     WHERE t.remote_shard = v_msg.destination_shard AND t.currency = v_msg.currency;

    IF p_refusal_code IS NULL THEN
        IF p_leg2_shard IS NOT NULL AND p_leg2_shard <> v_msg.destination_shard THEN
            -- Leg 2 debited the new owner's transit account toward us: move leg 1's credit
            -- to our transit account toward that shard, so each pair nets to what is in
            -- flight between exactly those two shards (zero now). Ascending ids.
            v_new_transit := txr.transit_account(p_leg2_shard, v_msg.currency);
            PERFORM 1 FROM txr.accounts a
             WHERE a.id IN (v_transit, v_new_transit)
             ORDER BY a.id
               FOR UPDATE;
            UPDATE txr.accounts a SET balance = a.balance - v_msg.amount, version = a.version + 1
             WHERE a.id = v_transit
            RETURNING a.balance, a.version INTO v_tb, v_tv;
            UPDATE txr.accounts a SET balance = a.balance + v_msg.amount, version = a.version + 1
             WHERE a.id = v_new_transit
            RETURNING a.balance, a.version INTO v_nb, v_nv;
            INSERT INTO txr.ledger_entries
                (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
            VALUES (v_transit, v_tv, p_transfer_id, v_new_transit, -v_msg.amount, v_tb, v_now),
                   (v_new_transit, v_nv, p_transfer_id, v_transit, v_msg.amount, v_nb, v_now);
            UPDATE txr.outbox o
               SET destination_shard = p_leg2_shard, rerouted_from = v_msg.destination_shard
             WHERE o.transfer_id = p_transfer_id;
        END IF;
        UPDATE txr.outbox o SET state = 'settled', settled_at = v_now
         WHERE o.transfer_id = p_transfer_id;
        UPDATE txr.transfers t SET status = 'settled' WHERE t.id = p_transfer_id;
        SELECT a.balance, a.version INTO source_balance, source_version
          FROM txr.accounts a WHERE a.id = v_msg.source;
        code := 'settled';
        status := 'settled';
        RETURN NEXT;
        RETURN;
    END IF;

    -- Reversal: debit the transit account leg 1 credited, credit the source. A
    -- refusal by a new owner moved no money there, so the credit to undo is still leg 1's.
    PERFORM 1 FROM txr.accounts a
     WHERE a.id IN (v_transit, v_msg.source)
     ORDER BY a.id
       FOR UPDATE;
    UPDATE txr.accounts a SET balance = a.balance - v_msg.amount, version = a.version + 1
     WHERE a.id = v_transit
    RETURNING a.balance, a.version INTO v_tb, v_tv;
    UPDATE txr.accounts a SET balance = a.balance + v_msg.amount, version = a.version + 1
     WHERE a.id = v_msg.source
    RETURNING a.balance, a.version INTO v_sb, v_sv;
    INSERT INTO txr.ledger_entries
        (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
    VALUES (v_transit, v_tv, p_transfer_id, v_msg.source, -v_msg.amount, v_tb, v_now),
           (v_msg.source, v_sv, p_transfer_id, v_msg.destination, v_msg.amount, v_sb, v_now);
    UPDATE txr.outbox o SET state = 'reversed', refusal_code = p_refusal_code, settled_at = v_now
     WHERE o.transfer_id = p_transfer_id;
    UPDATE txr.transfers t SET status = 'reversed', refusal_code = p_refusal_code
     WHERE t.id = p_transfer_id;
    code := 'reversed';
    status := 'reversed';
    source_balance := v_sb;
    source_version := v_sv;
    RETURN NEXT;
END;
$$;

-- Relays: claim a bounded batch of due messages under a lease. SKIP LOCKED lets several relays
-- run at once without waiting for each other; the lease (next_attempt_at moved forward) means a
-- relay that dies mid-delivery only delays its messages, another relay retries after it.
-- Moves no money, so no fence check: a stale primary's relay can at worst deliver a message
-- whose leg 2 is idempotent and whose settle is fenced.
CREATE OR REPLACE FUNCTION txr.claim_outbox(p_limit int, p_lease_s double precision)
RETURNS TABLE (
    transfer_id uuid,
    tenant text,
    source bigint,
    destination bigint,
    amount bigint,
    currency text,
    destination_shard text,
    attempts int,
    created_at timestamptz,
    key_id int,
    mac bytea
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- Caller bugs: a batch bounds the rows one call locks; a lease bounds how long a dead
    -- relay can hold a message (router.relays.outbox bounds both far lower).
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 1000 THEN
        RAISE EXCEPTION 'claim_outbox: limit % outside 1..1000', p_limit;
    END IF;
    IF p_lease_s IS NULL OR p_lease_s <= 0 OR p_lease_s > 3600 THEN
        RAISE EXCEPTION 'claim_outbox: lease % s outside (0, 3600]', p_lease_s;
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT o.transfer_id FROM txr.outbox o
         WHERE o.state = 'pending' AND o.next_attempt_at <= now()
         ORDER BY o.next_attempt_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE txr.outbox o
       SET next_attempt_at = now() + make_interval(secs => p_lease_s),
           attempts = o.attempts + 1
      FROM due
     WHERE o.transfer_id = due.transfer_id
    RETURNING o.transfer_id, o.tenant, o.source, o.destination, o.amount, o.currency::text,
              o.destination_shard, o.attempts, o.created_at, o.key_id, o.mac;
END;
$$;

-- Backoff after a failed attempt: the message is due again after p_delay_s.
CREATE OR REPLACE FUNCTION txr.defer_outbox(p_transfer_id uuid, p_delay_s double precision)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_delay_s IS NULL OR p_delay_s < 0 OR p_delay_s > 3600 THEN
        RAISE EXCEPTION 'defer_outbox: delay % s outside [0, 3600]', p_delay_s;
    END IF;
    UPDATE txr.outbox o SET next_attempt_at = now() + make_interval(secs => p_delay_s)
     WHERE o.transfer_id = p_transfer_id AND o.state = 'pending';
END;
$$;

-- Only the relays' role runs the saga steps; the application role (the routers' request path)
-- cannot, and never could after this file (REVOKE also covers grants an older file gave).
REVOKE ALL ON FUNCTION txr.saga_message(uuid, text, text, bigint, bigint, bigint, text,
    timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.saga_mac(int, uuid, text, text, bigint, bigint, bigint, text,
    timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.saga_receipt(int, uuid, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.saga_sign(uuid, text, bigint, bigint, bigint, text, timestamptz)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.sign_unsigned_outbox() FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text,
    bigint, timestamptz, int, bytea) FROM PUBLIC, __APP_ROLE__;
REVOKE ALL ON FUNCTION txr.settle_outbound(bigint, uuid, text, text, bytea)
    FROM PUBLIC, __APP_ROLE__;
REVOKE ALL ON FUNCTION txr.claim_outbox(int, double precision) FROM PUBLIC, __APP_ROLE__;
REVOKE ALL ON FUNCTION txr.defer_outbox(uuid, double precision) FROM PUBLIC, __APP_ROLE__;

GRANT EXECUTE ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint,
    text, bigint, timestamptz, int, bytea) TO __RELAY_ROLE__;
GRANT EXECUTE ON FUNCTION txr.settle_outbound(bigint, uuid, text, text, bytea) TO __RELAY_ROLE__;
GRANT EXECUTE ON FUNCTION txr.claim_outbox(int, double precision) TO __RELAY_ROLE__;
GRANT EXECUTE ON FUNCTION txr.defer_outbox(uuid, double precision) TO __RELAY_ROLE__;
