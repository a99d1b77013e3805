"""Relays: background loops that carry committed changes out of a shard, in their own process.

``invalidation``: every shard's commits into this region's Redis, and the heartbeat the routers'
freshness guard reads. ``outbox``: delivers cross-shard transfers (leg 2 on the destination
shard, then the settle or reversal mark on the source), at least once, applied exactly once by
the destination's inbox. ``service``: one region's relays, run by ``python -m router.relays``.
Like all of ``router``, never imports ``infra``, ``bench`` or ``chaos``.
"""
