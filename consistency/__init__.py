"""Pure rules and the control plane of txrouter.

Owns slots and ids, epochs (fencing tokens), the topology kept in etcd, consistency tokens,
idempotency rules, money rules and the limits shared by every package.
Must never import ``regionstore``, ``router``, ``infra``, ``bench`` or ``chaos``.
"""
