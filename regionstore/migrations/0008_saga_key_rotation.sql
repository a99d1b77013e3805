-- 0008: saga key rotation with overlap (txr keys rotate-saga, regionstore.saga_keys). A key is
-- staged on every shard first (it verifies, it does not sign), then made the signing key on
-- every shard; older keys keep verifying the messages they signed until an operator retires
-- them once nothing pending names them. The signing key is the newest one marked signing
-- (sql/functions/saga.sql txr.saga_sign). Keys stored before this migration all sign, as
-- before (the newest of them signs).
ALTER TABLE txr.saga_keys ADD COLUMN signing boolean NOT NULL DEFAULT true;
