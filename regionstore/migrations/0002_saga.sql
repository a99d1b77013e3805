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

-- post_transfers (leg 1 included) lives in regionstore/sql/functions/ledger.sql.

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

REVOKE ALL ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint, text,
    bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.settle_outbound(bigint, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.claim_outbox(int, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION txr.defer_outbox(uuid, double precision) FROM PUBLIC;

GRANT SELECT ON txr.transit_accounts, txr.outbox, txr.inbox TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.apply_inbound(bigint, uuid, text, text, bigint, bigint, bigint,
    text, bigint) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.settle_outbound(bigint, uuid, text) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.claim_outbox(int, double precision) TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.defer_outbox(uuid, double precision) TO __APP_ROLE__;
