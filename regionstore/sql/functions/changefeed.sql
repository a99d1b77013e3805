-- The change feed's question to a new primary (regionstore/changefeed.py, router/relays/feed.py).

-- The accounts whose current row was committed at or after `since` (needs
-- track_commit_timestamp = on, which the local cluster sets from initdb on). After a failover
-- the new primary has no replication slot (PostgreSQL 15 slots do not follow a promotion); the
-- feed invalidates exactly these accounts for a region whose last applied commit was at
-- `since` (minus a margin), instead of the whole shard. A row whose xmin was frozen has no
-- commit time (NULL): it is far older than any cache entry. A full scan, run once per region
-- per failover.
CREATE OR REPLACE FUNCTION txr.accounts_committed_since(since timestamptz)
RETURNS TABLE (id bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, txr
AS $$
    SELECT a.id FROM txr.accounts a WHERE pg_xact_commit_timestamp(a.xmin) >= since
$$;

GRANT EXECUTE ON FUNCTION txr.accounts_committed_since(timestamptz) TO __APP_ROLE__;
