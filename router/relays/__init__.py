"""Relays: background loops that carry committed changes out of a shard.

``outbox``: delivers cross-shard transfers (leg 2 on the destination shard, then the settle or
reversal mark on the source), at least once, applied exactly once by the destination's inbox.
"""
