"""The chaos suite behind ``txr chaos run``, in Jepsen's split: client, generator, nemesis, checker.

Owns the bank workload (``workload``: txclient sessions and the operation mix), the recorded
history (``history``), the faults and their heals (``nemesis``), the checker (``checker``: pure,
a history against the final state), the webhook receiver and the events' read-back
(``events``) and the run of each scenario on a fresh local cluster (``runner``).
It drives a cluster from outside (``infra``, ``txclient``, the product packages' public types);
no product package imports it, and it never imports ``bench`` (bench reuses ``chaos.events``).
"""
