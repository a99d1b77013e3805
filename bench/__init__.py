"""The benchmark suite behind ``txr bench`` (the throughput issue), and a Locust mix.

Owns: the pgbench ceiling on one shard primary (``ceiling``, schema ``bench``), closed- and
open-loop load generators with HdrHistogram latencies (``loadgen``), the JSON report and PNG
plots (``report``), the orchestration on a private cluster (``suite``) and a Locust file for
a realistic mix against a running cluster (``locustfile``, optional extra ``bench``).
Never imported by product packages (router, regionstore, consistency): only ``txr bench``
loads it, lazily, so the product never pulls in matplotlib, HdrHistogram or Locust. It may
import every other package: it drives whole clusters (``infra.local``) through ``txclient``,
and reuses the chaos suite's webhook receiver (``chaos.events``).
"""
