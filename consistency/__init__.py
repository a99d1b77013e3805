"""Rules and the control plane of txrouter.

Owns slots and ids, epochs (fencing tokens), the topology kept in etcd, consistency tokens,
idempotency and money rules, the transfer states (``saga``), the cache-coherence protocol and
its Redis scripts, the limits shared by every package, the G4 check across shards
(``reconcile``, on snapshots its caller reads), and the operator procedures: failover,
switchover and rejoin (``failover_plan``), slot moves (``slot_moves``), automatic failover
(``autofailover``).

Most modules are pure. These do I/O: ``etcd`` (the etcd client), ``topology`` (loads and
watches the topology in etcd), ``tenant_limits`` (reads and writes limits in etcd). The
procedures in ``failover_plan``, ``slot_moves`` and ``autofailover`` act only through the
operations their caller hands in (``ShardOps``, ``RehomeOps``, ``ControllerIO``), and sleep
between polls.

Must never import ``regionstore``, ``router``, ``infra``, ``bench``, ``chaos`` or ``txclient``
(tests/unit/test_import_rules.py holds every package to what its docstring says).
"""
