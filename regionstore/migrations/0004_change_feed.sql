-- 0004: the change feed (regionstore/changefeed.py): what the decoder may read, and what a new
-- primary can tell about the accounts written after a point in time.
--
-- The publication names only txr.accounts and only the columns the region caches hold
-- (consistency.coherence.ACCOUNT_FIELDS; `kind` is not cached): the walsender then sends no
-- other table's rows and no other column. The primary key (id, the replica identity) is in the
-- list, which PostgreSQL 15 requires for a column list on a table that publishes updates.
CREATE PUBLICATION txr_feed FOR TABLE txr.accounts
    (id, tenant, currency, balance, overdraft_limit, version, metadata, created_at);

-- The accounts whose current row was committed at or after `since` (needs
-- track_commit_timestamp = on, which the local cluster sets from initdb on). After a failover
-- the new primary has no replication slot (PostgreSQL 15 slots do not follow a promotion); the
-- feed invalidates exactly these accounts for a region whose last applied commit was at
-- `since` (minus a margin), instead of the whole shard. A row whose xmin was frozen has no
-- commit time (NULL): it is far older than any cache entry. A full scan, run once per region
-- per failover.
CREATE FUNCTION txr.accounts_committed_since(since timestamptz)
RETURNS TABLE (id bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, txr
AS $$
    SELECT a.id FROM txr.accounts a WHERE pg_xact_commit_timestamp(a.xmin) >= since
$$;

GRANT EXECUTE ON FUNCTION txr.accounts_committed_since(timestamptz) TO __APP_ROLE__;
