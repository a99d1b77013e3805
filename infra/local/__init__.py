"""The local, all-on-one-machine cluster: PostgreSQL, Redis, etcd, routers and WAN proxies.

Owns process start/stop (``cluster``: the launcher, ``down``, ``status``; ``control``: kill
and restart one process or a region; ``procs``, ``postgres``: the primitives), the port plan
(``ports``) and the cluster state file, ``cluster.json`` (``state``: written by the launcher
and the failover operations, read by everyone through its typed accessors).
Must not be imported by ``consistency``, ``regionstore`` or ``router``.
"""
