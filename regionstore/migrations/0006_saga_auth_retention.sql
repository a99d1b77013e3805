-- 0006: leg 2 verifies what it applies, relays have their own role, retention, idempotent
-- account opens (issue 16). Schema and privileges only; the functions that use these tables
-- are in sql/functions/{saga,retention,accounts}.sql.
--
-- __RELAY_ROLE__ (regionstore.migrate.RELAY_ROLE) is the relays' login role. It is a member
-- of the application role (every read the relays make is one the routers make) and in
-- addition the only login role that may run leg 2, settle and the outbox queue calls.
GRANT __APP_ROLE__ TO __RELAY_ROLE__;

-- HMAC-SHA256 (pgcrypto) in a schema no login role can use: only the function owner computes
-- or checks a message's MAC.
CREATE SCHEMA txr_crypto;
REVOKE ALL ON SCHEMA txr_crypto FROM PUBLIC;
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA txr_crypto;

-- The saga key: the same secret on every shard (the launcher provisions it with
-- regionstore.admin.set_saga_identity). Leg 1 signs each outbox message with the newest key,
-- leg 2 checks the MAC with the key the message names. No GRANT: neither the application nor
-- the relay role can read it, so neither can make a message leg 2 accepts.
CREATE TABLE txr.saga_keys (
    key_id int PRIMARY KEY CHECK (key_id >= 1),
    secret bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- This shard's name, as the other shards and the relays know it: leg 1 signs it as the
-- message's source shard (it names the transit account leg 2 debits).
CREATE TABLE txr.shard_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 64)
);

-- NULL on a message written before its shard had a key: leg 2 refuses it until
-- set_saga_identity signs it.
ALTER TABLE txr.outbox ADD COLUMN key_id int;
ALTER TABLE txr.outbox ADD COLUMN mac bytea;

-- Retention (sql/functions/retention.sql): the prune deletes the oldest rows first, in bounded
-- batches, each found through one of these.
CREATE INDEX idempotency_keys_created ON txr.idempotency_keys (created_at);
CREATE INDEX outbox_final ON txr.outbox (settled_at) WHERE state <> 'pending';
CREATE INDEX inbox_created ON txr.inbox (created_at);

-- Idempotent account opens: the key's scope is the tenant. The row keeps the whole original
-- answer, so a replay returns it exactly (even after the account moved to another shard).
CREATE TABLE txr.account_open_keys (
    tenant text NOT NULL CHECK (length(tenant) BETWEEN 1 AND 64),
    key text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint bytea NOT NULL,
    account_id bigint NOT NULL,
    currency char(3) NOT NULL,
    overdraft_limit bigint NOT NULL,
    metadata jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX account_open_keys_created ON txr.account_open_keys (created_at);

GRANT SELECT ON txr.shard_identity, txr.account_open_keys TO __APP_ROLE__;
