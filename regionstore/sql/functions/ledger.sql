-- txr.post_transfers: a batch of transfers in one transaction (fencing G5, idempotency G2,
-- floors G3, balanced postings G4; leg 1 of a cross-shard saga, DESIGN.md section 6).
-- The only copy: applied with CREATE OR REPLACE on every migrate (regionstore.migrate), recorded
-- by checksum. Literals tied to consistency/limits.py (tests/unit/test_sql_limits.py):
-- 256 = BATCH_ITEMS_MAX, 1000000000000000 = AMOUNT_MAX, 4611686018427387904 = BALANCE_ABS_MAX.
--
-- Per same-shard item: SELECT source, SELECT destination, SELECT key, 2 UPDATEs, 3 INSERTs
-- (transfer, two entries in one statement, key). Per batch: fence, slot epochs (2), row locks.

CREATE OR REPLACE FUNCTION txr.post_transfers(
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
    v_src record;
    v_dst record;
    v_src_slot_epoch bigint;
    v_dst_slot_epoch bigint;
    v_src_slot_epochs bigint[];
    v_dst_slot_epochs bigint[];
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
    v_sig record;
    v_pair record;
    v_now timestamptz := now();
BEGIN
    -- Caller bugs, not business outcomes: they abort the call (StoreInvariantViolation).
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
    IF NOT txr.fence_ok(p_shard_epoch) THEN
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

    -- The epoch this shard owns each item's source and destination slot under (NULL: not owned
    -- here), two statements per batch instead of two per item. Stable for the whole call: slot
    -- changes take the fence lock exclusive, and we hold it shared.
    SELECT array_agg(s.epoch ORDER BY u.o) INTO v_src_slot_epochs
      FROM unnest(p_sources) WITH ORDINALITY AS u (id, o)
      LEFT JOIN txr.owned_slots s ON s.slot = txr.slot_of(u.id);
    SELECT array_agg(s.epoch ORDER BY u.o) INTO v_dst_slot_epochs
      FROM unnest(p_destinations) WITH ORDINALITY AS u (id, o)
      LEFT JOIN txr.owned_slots s ON s.slot = txr.slot_of(u.id);

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
        v_src_slot_epoch := v_src_slot_epochs[i];
        IF v_cross THEN
            v_dst_slot_epoch := p_destination_slot_epochs[i];
        ELSE
            v_dst_slot_epoch := v_dst_slot_epochs[i];
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
            -- Signed (saga.sql): leg 2 applies only what this leg wrote.
            SELECT * INTO v_sig FROM txr.saga_sign(p_ids[i], p_tenants[i], p_sources[i],
                p_destinations[i], v_amount, p_currencies[i], v_now);
            INSERT INTO txr.outbox
                (transfer_id, tenant, source, destination, amount, currency, destination_shard,
                 state, attempts, next_attempt_at, created_at, key_id, mac)
            VALUES (p_ids[i], p_tenants[i], p_sources[i], p_destinations[i], v_amount,
                    p_currencies[i], p_destination_shards[i], 'pending', 0,
                    v_now + make_interval(secs => least(greatest(coalesce(p_relay_grace_s, 0),
                                                                 0), 60)),
                    v_now, v_sig.key_id, v_sig.mac);
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
        -- G4: the posting balances by construction (the two entries above are -v_amount and
        -- +v_amount of one variable); re-reading them per item was a statement per transfer.
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

REVOKE ALL ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[], bigint[],
    text[], text[], text[], bytea[], bigint[], bigint[], text[], double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.post_transfers(bigint, uuid[], text[], bigint[], bigint[],
    bigint[], text[], text[], text[], bytea[], bigint[], bigint[], text[], double precision)
    TO __APP_ROLE__;
