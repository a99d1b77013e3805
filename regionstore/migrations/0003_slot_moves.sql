-- 0003: moving a slot between shards (`txr rehome`) keeps G4 exact and in-flight money settling.
--
-- What a move does to the ledger. A slot's rows travel verbatim to the target shard: accounts,
-- their whole ledger history, their transfers, idempotency keys, outbox and inbox rows. Nothing
-- is rewritten: a statement read from the new shard is the same statement, versions carry on.
-- What changes is which shard holds the money, and that change is itself posted:
--
--   source S: for each moved account with balance b, transit_S[T] +b (counterparty: the account)
--   target T: for each moved account with balance b, transit_T[S] -b (counterparty: the account)
--
-- under one move id, recorded in txr.slot_moves on both sides. So each shard's balances still
-- sum to zero, the S<->T transit pair nets to zero once both halves are posted, and an auditor
-- can trace every moved balance to the move that carried it. A posting whose two entries now sit
-- on two shards (a historical same-shard transfer between a moved and a staying account; the
-- move posting itself) balances across the shards: `txr reconcile` sums each posting over every
-- shard, which is exact, and names a half-posted move until `txr rehome` finishes it.
--
-- In-flight messages:
-- * Outbound from the moved slot: a slot moves only once its outbound messages are final (the
--   rehome waits, bounded, with the slot refused, then rolls back if they do not drain). A
--   pending message's money sits in the source's transit account; moving the row would move
--   the obligation to a shard that cannot post the reversal against that account. slot_move_in
--   and slot_move_out refuse to run with one pending.
-- * Inbound to the moved slot: leg 2 lands on the new owner, which debits ITS transit account
--   toward the source shard. Leg 1 credited the source's transit account toward the OLD owner,
--   so settle_outbound, told where leg 2's debit happened, moves that credit in one balanced
--   posting on the source (transit[old] -a, transit[new] +a): every pair nets to zero again.
-- * Final rows that moved keep naming the shard whose transit account holds their leg's transit
--   entry (outbox.credit_shard, inbox.debit_shard): that entry does not move with the slot.

CREATE TABLE txr.slot_moves (
    move_id uuid NOT NULL,
    -- 'in' on the target (written with the copy), 'out' on the source (written with the delete).
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    slot int NOT NULL CHECK (slot BETWEEN 0 AND 4095),
    -- The slot epoch the target owns the slot under after this move.
    epoch bigint NOT NULL CHECK (epoch >= 1),
    -- The other shard of the move: the source on the target, the target on the source.
    peer_shard text NOT NULL CHECK (length(peer_shard) BETWEEN 1 AND 64),
    accounts int NOT NULL CHECK (accounts >= 0),
    -- {currency: sum of the moved accounts' balances}: what the move posting carried.
    amounts jsonb NOT NULL CHECK (jsonb_typeof(amounts) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (move_id, direction)
);

-- NULL: here. Set on rows that arrived by a slot move, naming the shard that holds the transit
-- entry of their leg (it stays there); kept through later moves.
ALTER TABLE txr.outbox ADD COLUMN credit_shard text;
ALTER TABLE txr.inbox ADD COLUMN debit_shard text;
-- Set by settle_outbound when leg 2 was debited on another shard than leg 1 named (the
-- destination's slot moved in between): the shard leg 1's credit was moved away from.
ALTER TABLE txr.outbox ADD COLUMN rerouted_from text;

-- apply_inbound gains the debit_shard answer: on a replay of a row that arrived by a slot move,
-- the shard whose transit account leg 2 actually debited (NULL: this shard). The relay hands it
-- to settle_outbound. The body is 0002's otherwise.
DROP FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text, bigint);

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
    destination_version bigint,
    debit_shard text
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
    debit_shard := NULL;
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

    -- Claim the transfer id first (see 0002): the inbox primary key arbitrates.
    INSERT INTO txr.inbox
        (transfer_id, source_shard, tenant, source, destination, amount, currency, result,
         created_at)
    VALUES (p_transfer_id, p_source_shard, p_tenant, p_source, p_destination, p_amount,
            p_currency, 'not_found', v_now)
    ON CONFLICT (transfer_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT i.* INTO STRICT v_prior FROM txr.inbox i WHERE i.transfer_id = p_transfer_id;
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
    RETURN NEXT;
END;
$$;

-- settle_outbound gains p_leg2_shard: the shard whose transit account leg 2 debited (the relay
-- knows it from apply_inbound). When it is not the shard leg 1 named, the credit follows it.
DROP FUNCTION txr.settle_outbound(bigint, uuid, text);

CREATE FUNCTION txr.settle_outbound(
    p_shard_epoch bigint,
    p_transfer_id uuid,
    p_refusal_code text,
    p_leg2_shard text DEFAULT NULL
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

    -- Reversal: debit the transit account leg 1 credited, credit the source (see 0002). A
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

-- The move posting, one half per shard. Each posts, for every customer account of the slot
-- with a non-zero balance (ascending id), one entry on the transit account toward the peer:
-- p_sign = -1 on the target (the balances arrived), +1 on the source (they left); records the
-- move; returns {currency: sum of the moved balances}. Caller: regionstore.admin, as the admin
-- role, holding the fence lock exclusively (no write procedure runs meanwhile).
CREATE FUNCTION txr.post_slot_move(
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
                WHERE o.state = 'pending' AND (o.source >> 48) = p_slot) THEN
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
         WHERE a.kind = 'customer' AND (a.id >> 48) = p_slot AND a.balance <> 0
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
         WHERE a.kind = 'customer' AND (a.id >> 48) = p_slot
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
CREATE FUNCTION txr.mark_moved_rows(p_slot int, p_from_shard text, p_self_shard text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE txr.outbox o
       SET credit_shard = nullif(coalesce(o.credit_shard, p_from_shard), p_self_shard)
     WHERE (o.source >> 48) = p_slot;
    UPDATE txr.inbox i
       SET debit_shard = nullif(coalesce(i.debit_shard, p_from_shard), p_self_shard)
     WHERE (i.destination >> 48) = p_slot AND i.result = 'applied';
END;
$$;

-- Admin only: the application role never moves slots.
REVOKE ALL ON FUNCTION txr.post_slot_move(uuid, text, int, bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.mark_moved_rows(int, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text,
    bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.settle_outbound(bigint, uuid, text, text) FROM PUBLIC;

GRANT SELECT ON txr.slot_moves TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint,
    text, bigint) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.settle_outbound(bigint, uuid, text, text) TO __APP_ROLE__;
