"""The local, all-on-one-machine cluster: PostgreSQL, Redis, etcd, routers and WAN proxies.

Owns process start/stop, data directories and the cluster state file (``cluster.json``).
Must not be imported by ``consistency``, ``regionstore`` or ``router``.
"""
