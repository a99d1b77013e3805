-- The event publisher's question to a shard whose decoder has a replication slot the publisher
-- never followed (router/events/publisher.py): a failover (PostgreSQL 15 slots do not follow a
-- promotion), or the first start. What was committed at or after `since` (NULL: everything),
-- so the events of the commits between the last published one and the new slot's start are
-- derived from the rows. Needs track_commit_timestamp = on. Read in keyset pages of at most
-- `page_rows` rows after (`after_at`, `after_id`) (NULL: from the start), in (created_at, id)
-- order, so the publisher holds one page at a time; run once per new slot.

-- The unpaged versions these replace.
DROP FUNCTION IF EXISTS txr.event_accounts_since(timestamptz);
DROP FUNCTION IF EXISTS txr.event_transfers_since(timestamptz);

-- Customer accounts opened at or after `since` (created_at is set in the opening transaction).
CREATE OR REPLACE FUNCTION txr.event_accounts_page(
    since timestamptz, after_at timestamptz, after_id bigint, page_rows bigint)
RETURNS TABLE (id bigint, tenant text, currency text, metadata jsonb, created_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, txr
AS $$
    SELECT a.id, a.tenant, a.currency::text, a.metadata, a.created_at
      FROM txr.accounts a
     WHERE a.kind = 'customer' AND (since IS NULL OR a.created_at >= since)
       AND (after_at IS NULL OR (a.created_at, a.id) > (after_at, after_id))
     ORDER BY a.created_at, a.id
     LIMIT page_rows
$$;

-- Transfers inserted or last changed at or after `since`, whether they are a saga's (an outbox
-- row exists), and when their current row was committed (NULL once frozen: long ago).
CREATE OR REPLACE FUNCTION txr.event_transfers_page(
    since timestamptz, after_at timestamptz, after_id uuid, page_rows bigint)
RETURNS TABLE (id uuid, tenant text, source bigint, destination bigint, amount bigint,
               currency text, reference text, status text, created_at timestamptz,
               refusal_code text, cross_shard boolean, committed_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, txr
AS $$
    SELECT t.id, t.tenant, t.source, t.destination, t.amount, t.currency::text, t.reference,
           t.status, t.created_at, t.refusal_code,
           EXISTS (SELECT 1 FROM txr.outbox o WHERE o.transfer_id = t.id),
           pg_xact_commit_timestamp(t.xmin)
      FROM txr.transfers t
     WHERE (since IS NULL OR t.created_at >= since OR pg_xact_commit_timestamp(t.xmin) >= since)
       AND (after_at IS NULL OR (t.created_at, t.id) > (after_at, after_id))
     ORDER BY t.created_at, t.id
     LIMIT page_rows
$$;

GRANT EXECUTE ON FUNCTION txr.event_accounts_page(timestamptz, timestamptz, bigint, bigint)
    TO __APP_ROLE__;
GRANT EXECUTE ON FUNCTION txr.event_transfers_page(timestamptz, timestamptz, uuid, bigint)
    TO __APP_ROLE__;
