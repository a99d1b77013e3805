"""The edge router: aiohttp service that authenticates, validates, routes and answers.

Owns the HTTP API, JWT auth, request validation, routing by slot to the home shard's primary,
the region cache path, metrics, traces and logs. The public client is ``txclient`` (its own
distribution). May import ``consistency`` and ``regionstore``; must never import ``infra``,
``bench``, ``chaos`` or ``txclient``.
"""
