"""Errors of the control plane.

    ConsistencyError
     +-- TopologyError            the topology is missing or malformed
     +-- EtcdError                etcd could not answer (every endpoint tried)
     |    +-- EtcdUnavailable     no endpoint reachable within the deadline
     |    +-- LeaseExpired        a lease to renew is gone (its keys went with it)
     +-- CasConflict              a compare-and-swap lost to a concurrent writer

Lower-layer errors (aiohttp, OS) are mapped here with ``raise ... from exc``; callers decide on
types, never on message strings.
"""

from __future__ import annotations


class ConsistencyError(Exception):
    """Root of the control-plane errors."""


class TopologyError(ConsistencyError):
    """The topology in etcd is missing or does not describe a usable cluster."""


class EtcdError(ConsistencyError):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered within the deadline."""


class LeaseExpired(EtcdError):
    """A lease could not be renewed because it no longer exists."""


class CasConflict(ConsistencyError):
    """A compare-and-swap found a value other than the one it expected."""
