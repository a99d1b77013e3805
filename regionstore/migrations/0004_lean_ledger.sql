-- 0004: per-item work of the batch procedure (issue 11).
--
-- The foreign key from ledger entries to accounts ran two referential-integrity queries per
-- transfer (SELECT ... FOR KEY SHARE of each account, through SPI). Entries are written only by
-- the SECURITY DEFINER procedures (the app role has SELECT only), each right after it has locked
-- and updated the very account row the entry names, so the check can never fail; accounts are
-- never deleted (a slot move marks them, 0003). txr reconcile still checks every ledger.
ALTER TABLE txr.ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
