"""regionstore: everything that touches a shard's PostgreSQL.

Owns the shard schema and its migrations (``migrations/NNNN_name.sql``, schema only;
``migrate``), its SQL functions, each once (``sql/functions/``, applied with CREATE OR REPLACE
on every migrate and checksummed), the write procedures that enforce fencing (G5), floors (G3),
idempotency (G2) and balanced postings (G4) inside one transaction, the async store client the
router writes through (``store``), shard administration for the launcher and operators
(``admin``: fencing, slots, ledger check; ``saga_keys``: the saga HMAC keys' rotation across
shards), synchronous replication settings (``replication``), the change feed (``changefeed``:
the shard's replication slot, the logical replication stream, only what the synchronous standby
has flushed; ``pgoutput``: the stream's messages parsed into ``changes``, the typed account and
transfer changes of each committed transaction), waits on idle connections without a
timer (``pgwait``), the read-only audit queries a checker compares a history with (``audit``),
and the store's error tree (``errors``).

Depends only on ``consistency`` (ids, limits, the transfer states, the change feed's row shape
and LSN format in ``coherence``) and psycopg; it must never import ``router``, ``infra``,
``bench``, ``chaos`` or ``txclient``.
"""
