"""The edge router: aiohttp service that authenticates, validates, routes and answers.

Owns the HTTP API, JWT auth, request validation, and the request paths behind it: where an
account lives (``resolver``, shared with the relay process), the write path (``writes``;
account opens, keyed ones arbitrated on one shard for every region, ``opens``), the read policy
(``reads``), the saga's inline leg 2 (``saga_step``), all answering domain values
and ``outcomes`` that only ``errors``, the handlers and the middleware turn into HTTP; the
region cache path, metrics, traces and logs; ``router.relays``, the relay process. The public
client is ``txclient`` (its own distribution). May import ``consistency`` and ``regionstore``;
must never import ``infra``, ``bench``, ``chaos`` or ``txclient``.
The request paths (``resolver``, ``writes``, ``batcher``, ``opens``, ``reads``, ``saga_step``,
``outcomes``) know no HTTP: each never imports ``aiohttp``, ``router.errors``, ``router.handlers``
or ``router.validation``.
"""
