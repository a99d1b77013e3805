"""Ledger events: every committed state change as an event, in NATS JetStream, read by the pull
API and delivered to signed webhooks.

What this package owns: the event shapes and their stable ids (``model``: derived from the
change feed's committed transactions, never from the request path), the stream and its bounds
(``stream``), the publisher interface, its waves and the decoder's sink (``publisher``), its
JetStream implementation (``jetstream``), the pull API's reads (``pull``) and the webhooks:
registry, signatures, SSRF guard and the delivery worker (``webhooks``).

It imports ``consistency`` and ``regionstore``'s change-feed types and ``router.render``; it
never imports ``bench``, ``chaos`` or ``infra``. The decoder (``router.relays.feed``) hands it
committed transactions and holds the replication slot until the publisher acknowledged them.
"""
