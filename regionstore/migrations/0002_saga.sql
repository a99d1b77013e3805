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

-- The transit account for (remote shard, currency), created on first use. Not locked here: the
-- caller locks it together with its other rows, in ascending id order.
CREATE FUNCTION txr.transit_account(p_remote_shard text, p_currency text)
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
REVOKE ALL ON FUNCTION txr.transit_account(text, text) FROM PUBLIC;

-- post_transfers gains p_destination_shards: NULL = a same-shard item (unchanged); a shard
-- name = leg 1 of a cross-shard transfer to an account homed on that shard.
DROP FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[], bigint[], text[],
    text[], text[], bytea[], bigint[], bigint[]);

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
    p_destination_slot_epochs bigint[],
    p_destination_shards text[],
    -- Seconds the calling router will spend delivering leg 2 itself: the relays leave the
    -- outbox message alone that long (and are not woken), so a transfer is not delivered twice
    -- in parallel. 0 (tests, tools) hands it to the relays at once.
    p_relay_grace_s double precision DEFAULT 0
)
RETURNS TABLE (
    idx int,                    -- 0-based position of the item in the arrays
    code text,
    transfer_id uuid,
    status text,
    created_at timestamptz,
    source_balance bigint,
    source_version bigint,
    destination_balance bigint, -- NULL for a cross-shard item (the destination is elsewhere)
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
    v_cross boolean;
    v_transit bigint[];
    v_lock bigint[];
    v_tb bigint;
    v_notify boolean := false;
    v_pair record;
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
       OR coalesce(cardinality(p_destination_slot_epochs), 0) <> v_n
       OR coalesce(cardinality(p_destination_shards), 0) <> v_n THEN
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

    -- 2. The transit account of each cross-shard item, created on first use. Only for items
    -- whose source exists in that currency (the others are refused below), so a bad request
    -- cannot litter the ledger with transit accounts. Currencies never change, so this
    -- unlocked read is safe.
    -- Created in sorted (shard, currency) order: two batches creating the same two transit
    -- accounts wait for each other in one order and cannot deadlock.
    FOR v_pair IN
        SELECT DISTINCT d.shard, d.cur
          FROM unnest(p_destination_shards, p_currencies, p_sources) AS d (shard, cur, src)
         WHERE d.shard IS NOT NULL
           AND EXISTS (SELECT 1 FROM txr.accounts a WHERE a.id = d.src AND a.currency = d.cur)
         ORDER BY d.shard, d.cur
    LOOP
        PERFORM txr.transit_account(v_pair.shard, v_pair.cur);
    END LOOP;
    v_transit := array_fill(NULL::bigint, ARRAY[greatest(v_n, 1)]);
    FOR i IN 1 .. v_n LOOP
        IF p_destination_shards[i] IS NOT NULL THEN
            -- NULL when not created above (the item is refused before it is needed).
            v_transit[i] := (SELECT t.account_id FROM txr.transit_accounts t
                              WHERE t.remote_shard = p_destination_shards[i]
                                AND t.currency = p_currencies[i]);
        END IF;
    END LOOP;

    -- 3. Lock every touched account once, in ascending id order: concurrent batches take their
    -- locks in the same global order, so they can queue but never deadlock. Transit ids are
    -- negative: they come first, as in apply_inbound and settle_outbound.
    v_lock := p_sources || v_transit;
    FOR i IN 1 .. v_n LOOP
        IF p_destination_shards[i] IS NULL THEN
            v_lock := v_lock || p_destinations[i];
        END IF;
    END LOOP;
    PERFORM 1 FROM txr.accounts a
     WHERE a.id = ANY (v_lock)
     ORDER BY a.id
       FOR UPDATE;

    -- 4. Items in order; later items see earlier items' effects (same transaction).
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
        v_cross := p_destination_shards[i] IS NOT NULL;
        IF v_amount IS NULL OR v_amount < 1 OR v_amount > 1000000000000000 THEN
            -- consistency.limits.AMOUNT_MIN/AMOUNT_MAX: the router validates; this is a bug.
            RAISE EXCEPTION 'post_transfers: item % amount % out of range', i - 1, v_amount;
        END IF;

        -- wrong_shard: the slots owned here under the epochs the router believes. A
        -- cross-shard item's destination is checked by its own shard at leg 2.
        SELECT s.epoch INTO v_src_slot_epoch FROM txr.owned_slots s
         WHERE s.slot = (p_sources[i] >> 48);
        IF NOT FOUND THEN v_src_slot_epoch := NULL; END IF;
        IF v_cross THEN
            v_dst_slot_epoch := p_destination_slot_epochs[i];
        ELSE
            SELECT s.epoch INTO v_dst_slot_epoch FROM txr.owned_slots s
             WHERE s.slot = (p_destinations[i] >> 48);
            IF NOT FOUND THEN v_dst_slot_epoch := NULL; END IF;
        END IF;
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
        IF NOT v_cross THEN
            SELECT a.tenant, a.currency, a.balance, a.overdraft_limit, a.version, a.kind
              INTO v_dst FROM txr.accounts a WHERE a.id = p_destinations[i];
            IF NOT FOUND OR v_dst.tenant <> p_tenants[i] OR v_dst.kind <> 'customer' THEN
                code := 'not_found';
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        -- replayed / idempotency_key_reused (G2). The source row lock serialises every writer of
        -- this key scope, so a concurrent first use has either committed (we see it) or not.
        -- A replay answers the transfer's CURRENT status (a cross-shard one may have settled).
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
                IF NOT v_cross THEN
                    destination_balance := v_dst.balance;
                    destination_version := v_dst.version;
                END IF;
            ELSE
                code := 'idempotency_key_reused';
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;

        IF v_src.currency <> p_currencies[i] THEN
            code := 'currency_mismatch';
            RETURN NEXT;
            CONTINUE;
        END IF;
        -- Nested, not OR-ed: v_dst is unassigned for a cross-shard item and PL/pgSQL does not
        -- promise to short-circuit.
        IF NOT v_cross THEN
            IF v_dst.currency <> p_currencies[i] THEN
                code := 'currency_mismatch';
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        -- G3: never below the floor. No overflow: |balance| <= 2^62 and amount <= 10^15.
        IF v_src.balance - v_amount < -v_src.overdraft_limit THEN
            code := 'insufficient_funds';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF v_cross THEN
            -- The credited side is our transit account; same bound as any balance.
            SELECT a.balance INTO STRICT v_tb FROM txr.accounts a WHERE a.id = v_transit[i];
            IF v_tb + v_amount > 4611686018427387904 THEN
                code := 'balance_limit';
                RETURN NEXT;
                CONTINUE;
            END IF;
        -- consistency.limits.BALANCE_ABS_MAX = 2^62.
        ELSIF v_dst.balance + v_amount > 4611686018427387904 THEN
            code := 'balance_limit';
            RETURN NEXT;
            CONTINUE;
        END IF;

        IF v_cross THEN
            -- Leg 1: debit the source, credit the transit account for the destination shard.
            UPDATE txr.accounts a SET balance = a.balance - v_amount, version = a.version + 1
             WHERE a.id = p_sources[i]
            RETURNING a.balance, a.version INTO v_sb, v_sv;
            UPDATE txr.accounts a SET balance = a.balance + v_amount, version = a.version + 1
             WHERE a.id = v_transit[i]
            RETURNING a.balance, a.version INTO v_db, v_dv;
            IF v_sb <> v_src.balance - v_amount OR v_sv <> v_src.version + 1 THEN
                RAISE EXCEPTION 'post_transfers: item % balances moved under a row lock', i - 1;
            END IF;
            INSERT INTO txr.transfers
                (id, tenant, source, destination, amount, currency, reference, status,
                 created_at)
            VALUES (p_ids[i], p_tenants[i], p_sources[i], p_destinations[i], v_amount,
                    p_currencies[i], p_references[i], 'pending', v_now);
            -- The source's entry names the real destination; the transit entry the source.
            INSERT INTO txr.ledger_entries
                (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
            VALUES (p_sources[i], v_sv, p_ids[i], p_destinations[i], -v_amount, v_sb, v_now),
                   (v_transit[i], v_dv, p_ids[i], p_sources[i], v_amount, v_db, v_now);
            INSERT INTO txr.outbox
                (transfer_id, tenant, source, destination, amount, currency, destination_shard,
                 state, attempts, next_attempt_at, created_at)
            VALUES (p_ids[i], p_tenants[i], p_sources[i], p_destinations[i], v_amount,
                    p_currencies[i], p_destination_shards[i], 'pending', 0,
                    v_now + make_interval(secs => least(greatest(coalesce(p_relay_grace_s, 0),
                                                                 0), 60)),
                    v_now);
            INSERT INTO txr.idempotency_keys
                (tenant, source, key, fingerprint, transfer_id, status_code, created_at)
            VALUES (p_tenants[i], p_sources[i], p_keys[i], p_fingerprints[i], p_ids[i], 201,
                    v_now);
            v_notify := true;
            code := 'ok';
            transfer_id := p_ids[i];
            status := 'pending';
            created_at := v_now;
            source_balance := v_sb;
            source_version := v_sv;
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
    -- Wakes the relays. NOTIFY is transactional: delivered on commit, dropped on rollback, and
    -- one per transaction however many items (identical notifications are folded).
    IF v_notify AND coalesce(p_relay_grace_s, 0) <= 0 THEN
        PERFORM pg_notify('txr_outbox', '');
    END IF;
    RETURN;
END;
$$;

-- The fence half shared by apply_inbound and settle_outbound: true when writes under
-- p_shard_epoch are accepted. Takes the fence lock shared for the rest of the transaction.
CREATE FUNCTION txr.fence_ok(p_shard_epoch bigint)
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
        RAISE EXCEPTION 'saga procedures must run in READ COMMITTED';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(txr.fence_lock_key());
    SELECT f.epoch, f.fenced INTO v_fence FROM txr.fence f;
    RETURN FOUND AND NOT v_fence.fenced AND v_fence.epoch = p_shard_epoch;
END;
$$;
REVOKE ALL ON FUNCTION txr.fence_ok(bigint) FROM PUBLIC;

-- Leg 2 on the destination shard, exactly once per transfer id.
CREATE FUNCTION txr.apply_inbound(
    p_shard_epoch bigint,
    p_transfer_id uuid,
    p_source_shard text,
    p_tenant text,
    p_source bigint,
    p_destination bigint,
    p_amount bigint,
    p_currency text,
    p_destination_slot_epoch bigint
)
RETURNS TABLE (
    code text,
    replayed boolean,
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
    v_slot_epoch bigint;
    v_prior record;
    v_dst record;
    v_transit bigint;
    v_tb bigint;
    v_tv bigint;
    v_db bigint;
    v_dv bigint;
    v_result text;
    v_now timestamptz := now();
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        RAISE EXCEPTION 'apply_inbound: amount % out of range', p_amount;
    END IF;
    replayed := false;
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        code := 'stale_epoch';
        RETURN NEXT;
        RETURN;
    END IF;
    -- Nothing recorded: the relay re-resolves the destination's shard and delivers there.
    SELECT s.epoch INTO v_slot_epoch FROM txr.owned_slots s WHERE s.slot = (p_destination >> 48);
    IF NOT FOUND OR v_slot_epoch IS DISTINCT FROM p_destination_slot_epoch THEN
        code := 'wrong_shard';
        RETURN NEXT;
        RETURN;
    END IF;

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
        END IF;
        code := v_prior.result;
        replayed := true;
        RETURN NEXT;
        RETURN;
    END IF;

    -- Lock the transit account (negative id) and then the destination: ascending id order.
    v_transit := txr.transit_account(p_source_shard, p_currency);
    PERFORM 1 FROM txr.accounts a
     WHERE a.id IN (v_transit, p_destination)
     ORDER BY a.id
       FOR UPDATE;
    SELECT a.balance, a.version INTO STRICT v_tb, v_tv FROM txr.accounts a WHERE a.id = v_transit;
    SELECT a.tenant, a.currency, a.balance, a.version, a.kind
      INTO v_dst FROM txr.accounts a WHERE a.id = p_destination;

    -- Refusals are recorded (the inbox row keeps the code) so every re-delivery gets the same
    -- answer and the source reverses exactly once; they post nothing.
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
    RETURN NEXT;
END;
$$;

-- The source records the destination's answer: settled, or the reversal, exactly once.
CREATE FUNCTION txr.settle_outbound(
    p_shard_epoch bigint,
    p_transfer_id uuid,
    p_refusal_code text
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
    v_tb bigint;
    v_tv bigint;
    v_sb bigint;
    v_sv bigint;
    v_now timestamptz := now();
BEGIN
    IF NOT txr.fence_ok(p_shard_epoch) THEN
        code := 'stale_epoch';
        RETURN NEXT;
        RETURN;
    END IF;
    -- The outbox row lock serialises concurrent settlers of this transfer; the second one
    -- finds it no longer pending and answers 'already'.
    SELECT o.* INTO v_msg FROM txr.outbox o WHERE o.transfer_id = p_transfer_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'settle_outbound: no outbox row for transfer %', p_transfer_id;
    END IF;
    IF v_msg.state <> 'pending' THEN
        code := 'already';
        status := v_msg.state;
        SELECT a.balance, a.version INTO source_balance, source_version
          FROM txr.accounts a WHERE a.id = v_msg.source;
        RETURN NEXT;
        RETURN;
    END IF;

    IF p_refusal_code IS NULL THEN
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

    -- Reversal: debit the transit account leg 1 credited, credit the source. Ascending ids:
    -- the transit account (negative) first.
    SELECT t.account_id INTO STRICT v_transit FROM txr.transit_accounts t
     WHERE t.remote_shard = v_msg.destination_shard AND t.currency = v_msg.currency;
    PERFORM 1 FROM txr.accounts a
     WHERE a.id IN (v_transit, v_msg.source)
     ORDER BY a.id
       FOR UPDATE;
    UPDATE txr.accounts a SET balance = a.balance - v_msg.amount, version = a.version + 1
     WHERE a.id = v_transit
    RETURNING a.balance, a.version INTO v_tb, v_tv;
    -- The credit returns money the source already had: it cannot breach the ceiling unless
    -- other credits arrived meanwhile, and refusing a reversal is not an option (the money
    -- must go somewhere); the accounts_ceiling CHECK is the last line.
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
CREATE FUNCTION txr.claim_outbox(p_limit int, p_lease_s double precision)
RETURNS TABLE (
    transfer_id uuid,
    tenant text,
    source bigint,
    destination bigint,
    amount bigint,
    currency text,
    destination_shard text,
    attempts int,
    created_at timestamptz
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
              o.destination_shard, o.attempts, o.created_at;
END;
$$;

-- Backoff after a failed attempt: the message is due again after p_delay_s.
CREATE FUNCTION txr.defer_outbox(p_transfer_id uuid, p_delay_s double precision)
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

REVOKE ALL ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[], bigint[],
    text[], text[], text[], bytea[], bigint[], bigint[], text[], double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text,
    bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.settle_outbound(bigint, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.claim_outbox(int, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.defer_outbox(uuid, double precision) FROM PUBLIC;

GRANT SELECT ON txr.transit_accounts, txr.outbox, txr.inbox TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[],
    bigint[], text[], text[], text[], bytea[], bigint[], bigint[], text[], double precision)
    TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint,
    text, bigint) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.settle_outbound(bigint, uuid, text) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.claim_outbox(int, double precision) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.defer_outbox(uuid, double precision) TO __APP_ROLE__;
