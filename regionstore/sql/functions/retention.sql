-- Retention (issue 16): idempotency keys and final saga rows are deleted once no retry or
-- delivery can need them any more, in bounded batches, oldest first. Run by the relays on their
-- existing outbox loop (router.relays.outbox, RETENTION_INTERVAL_S). Applied with CREATE OR
-- REPLACE on every migrate (regionstore.migrate), recorded by checksum.
--
-- The periods are literals here, not parameters, on purpose: whoever may run the prune (the
-- relay role) must not be able to shorten them, because an inbox row pruned while its message
-- can still be delivered would let leg 2 apply twice. Tied to consistency/limits.py by
-- tests/unit/test_sql_limits.py:
--   604800 s = IDEMPOTENCY_KEY_RETENTION_S (keys: transfer and account-open),
--   604800 s = OUTBOX_RETENTION_S (settled and reversed outbox rows),
--   864000 s = INBOX_RETENTION_S (> SAGA_DELIVERY_WINDOW_S + CLOCK_SKEW_MARGIN_S),
--   10000 = RETENTION_BATCH_MAX.

CREATE OR REPLACE FUNCTION txr.inbox_retention() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT make_interval(secs => 864000) $$;

-- Deletes at most p_batch rows of each kind; returns how many of each it deleted. A full
-- batch means more is due: the caller runs it again on its next round.
CREATE OR REPLACE FUNCTION txr.prune_retained(p_batch int)
RETURNS TABLE (idempotency_keys int, account_open_keys int, outbox int, inbox int)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := now();
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 10000 THEN
        RAISE EXCEPTION 'prune_retained: batch % outside 1..10000', p_batch;
    END IF;
    DELETE FROM txr.idempotency_keys k
     WHERE (k.tenant, k.source, k.key) IN (
        SELECT o.tenant, o.source, o.key FROM txr.idempotency_keys o
         WHERE o.created_at < v_now - make_interval(secs => 604800)
         ORDER BY o.created_at LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS idempotency_keys = ROW_COUNT;
    DELETE FROM txr.account_open_keys k
     WHERE (k.tenant, k.key) IN (
        SELECT o.tenant, o.key FROM txr.account_open_keys o
         WHERE o.created_at < v_now - make_interval(secs => 604800)
         ORDER BY o.created_at LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS account_open_keys = ROW_COUNT;
    -- A final outbox row is never claimed again (claim_outbox takes pending rows only).
    DELETE FROM txr.outbox b
     WHERE b.transfer_id IN (
        SELECT o.transfer_id FROM txr.outbox o
         WHERE o.state <> 'pending' AND o.settled_at < v_now - make_interval(secs => 604800)
         ORDER BY o.settled_at LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS outbox = ROW_COUNT;
    -- apply_inbound refuses a message older than txr.delivery_window() (saga.sql), shorter than
    -- this by the clock margin: no delivery can need a row pruned here.
    DELETE FROM txr.inbox b
     WHERE b.transfer_id IN (
        SELECT i.transfer_id FROM txr.inbox i
         WHERE i.created_at < v_now - txr.inbox_retention()
         ORDER BY i.created_at LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS inbox = ROW_COUNT;
    RETURN NEXT;
END;
$$;

REVOKE ALL ON FUNCTION txr.prune_retained(int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION txr.prune_retained(int) TO __RELAY_ROLE__;
