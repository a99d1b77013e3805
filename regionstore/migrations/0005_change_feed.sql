-- 0005: the change feed (regionstore/changefeed.py): what the decoder may read. The function a
-- new primary answers "which accounts were written after T" with is in
-- sql/functions/changefeed.sql.
--
-- The publication names only txr.accounts and only the columns the region caches hold
-- (consistency.coherence.ACCOUNT_FIELDS; `kind` is not cached): the walsender then sends no
-- other table's rows and no other column. The primary key (id, the replica identity) is in the
-- list, which PostgreSQL 15 requires for a column list on a table that publishes updates.
CREATE PUBLICATION txr_feed FOR TABLE txr.accounts
    (id, tenant, currency, balance, overdraft_limit, version, metadata, created_at);
