"""The local, all-on-one-machine cluster: PostgreSQL, Redis, etcd, NATS, routers and WAN proxies.

Owns process start/stop and the cluster's description. ``cluster``: the launcher (the start
order, what runs side by side, recording the state), ``down`` and ``purge``; one
start-and-ready module per service (``wan_emulator``, ``etcd_server``, ``redis_server``,
``nats``, ``pg_servers`` over ``postgres``, ``relays``, ``routers``, ``controllers``), each
spawning and waiting through ``children`` (the recorded children, one bounded ready-poll);
``credentials``: the secrets directory and tokens; ``layout``: shard and node names and the
initial topology; ``describe``: ``status`` and the operator DSNs; ``control``: kill and restart
one process or a region; ``procs``: the process primitives; ``ports``: the port plan;
``state``: the state file, ``cluster.json``, written and read only through its typed records.
Must not be imported by ``consistency``, ``regionstore`` or ``router``; never imports
``infra.cli``, ``infra.failover``, ``infra.controller``, ``bench`` or ``chaos``, which build on it.
"""
