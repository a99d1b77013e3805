"""Relays: background loops that carry committed changes out of a shard, in their own process.

``feed``: the change feed's fan-out: the decoder of each shard whose primary is in this region
(``regionstore.changefeed``) applied to every region's Redis (``router.feedsink``), with the
heartbeats the routers' freshness guard reads. ``outbox``: delivers cross-shard transfers
(leg 2 on the destination shard, then the settle or reversal mark on the source), at least
once, applied exactly once by the destination's inbox. ``service``: one region's relays (for the
shards whose current primary is here, following the topology), run by
``python -m router.relays``. Like all of ``router``, never imports ``infra``, ``bench`` or
``chaos``.
"""
