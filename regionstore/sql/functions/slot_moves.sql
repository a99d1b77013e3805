-- Moving a slot between shards (`txr rehome`, regionstore.admin; the why is in migration 0003).
-- Admin only: the application and relay roles never move slots. Applied with CREATE OR
-- REPLACE on every migrate (regionstore.migrate), recorded by checksum.

-- The move posting, one half per shard. Each posts, for every customer account of the slot
-- with a non-zero balance (ascending id), one entry on the transit account toward the peer:
-- p_sign = -1 on the target (the balances arrived), +1 on the source (they left); records the
-- move; returns {currency: sum of the moved balances}. Caller: regionstore.admin, as the admin
-- role, holding the fence lock exclusively (no write procedure runs meanwhile).
CREATE OR REPLACE FUNCTION txr.post_slot_move(
    p_move_id uuid,
    p_direction text,
    p_slot int,
    p_epoch bigint,
    p_peer_shard text
)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sign int;
    v_acc record;
    v_cur record;
    v_transit bigint;
    v_tb bigint;
    v_tv bigint;
    v_n int := 0;
    v_amounts jsonb := '{}'::jsonb;
    v_now timestamptz := now();
BEGIN
    IF p_direction = 'in' THEN
        v_sign := -1;
    ELSIF p_direction = 'out' THEN
        v_sign := 1;
    ELSE
        RAISE EXCEPTION 'post_slot_move: direction % is not in/out', p_direction;
    END IF;
    IF EXISTS (SELECT 1 FROM txr.slot_moves m
                WHERE m.move_id = p_move_id AND m.direction = p_direction) THEN
        RAISE EXCEPTION 'post_slot_move: move % (%) already posted', p_move_id, p_direction;
    END IF;
    -- See the header: pending outbound money must not change shards.
    IF EXISTS (SELECT 1 FROM txr.outbox o
                WHERE o.state = 'pending' AND txr.slot_of(o.source) = p_slot) THEN
        RAISE EXCEPTION 'post_slot_move: slot % has pending outbound transfers', p_slot;
    END IF;
    -- The source must already refuse the slot (nothing may change under the move); the target
    -- owns it only from the copy's commit, which this call is part of.
    IF p_direction = 'out' AND EXISTS (
        SELECT 1 FROM txr.owned_slots s WHERE s.slot = p_slot) THEN
        RAISE EXCEPTION 'post_slot_move: slot % is still owned here', p_slot;
    END IF;

    -- Transit accounts first, created and locked in currency order (ids ascending).
    FOR v_cur IN
        SELECT DISTINCT a.currency::text AS currency FROM txr.accounts a
         WHERE a.kind = 'customer' AND txr.slot_of(a.id) = p_slot AND a.balance <> 0
         ORDER BY 1
    LOOP
        PERFORM txr.transit_account(p_peer_shard, v_cur.currency);
    END LOOP;
    PERFORM 1 FROM txr.accounts a
      JOIN txr.transit_accounts t ON t.account_id = a.id
     WHERE t.remote_shard = p_peer_shard
     ORDER BY a.id
       FOR UPDATE OF a;

    FOR v_acc IN
        SELECT a.id, a.currency::text AS currency, a.balance FROM txr.accounts a
         WHERE a.kind = 'customer' AND txr.slot_of(a.id) = p_slot
         ORDER BY a.id
           FOR UPDATE
    LOOP
        v_n := v_n + 1;
        CONTINUE WHEN v_acc.balance = 0;
        SELECT t.account_id INTO STRICT v_transit FROM txr.transit_accounts t
         WHERE t.remote_shard = p_peer_shard AND t.currency = v_acc.currency;
        UPDATE txr.accounts a
           SET balance = a.balance + v_sign * v_acc.balance, version = a.version + 1
         WHERE a.id = v_transit
        RETURNING a.balance, a.version INTO v_tb, v_tv;
        INSERT INTO txr.ledger_entries
            (account_id, seq, transfer_id, counterparty, amount, balance_after, created_at)
        VALUES (v_transit, v_tv, p_move_id, v_acc.id, v_sign * v_acc.balance, v_tb, v_now);
        v_amounts := jsonb_set(v_amounts, ARRAY[v_acc.currency],
            to_jsonb(coalesce((v_amounts ->> v_acc.currency)::bigint, 0) + v_acc.balance));
    END LOOP;

    INSERT INTO txr.slot_moves (move_id, direction, slot, epoch, peer_shard, accounts, amounts)
    VALUES (p_move_id, p_direction, p_slot, p_epoch, p_peer_shard, v_n, v_amounts);
    RETURN v_amounts;
END;
$$;
-- Mark the rows that arrived with a slot (on the target, in the copy's transaction): their
-- leg's transit entry stayed on p_from_shard. p_self_shard: a row coming back to the shard
-- that holds its entry is local again.
CREATE OR REPLACE FUNCTION txr.mark_moved_rows(p_slot int, p_from_shard text, p_self_shard text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE txr.outbox o
       SET credit_shard = nullif(coalesce(o.credit_shard, p_from_shard), p_self_shard)
     WHERE txr.slot_of(o.source) = p_slot;
    UPDATE txr.inbox i
       SET debit_shard = nullif(coalesce(i.debit_shard, p_from_shard), p_self_shard)
     WHERE txr.slot_of(i.destination) = p_slot AND i.result = 'applied';
END;
$$;

REVOKE ALL ON FUNCTION txr.post_slot_move(uuid, text, int, bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.mark_moved_rows(int, text, text) FROM PUBLIC;
