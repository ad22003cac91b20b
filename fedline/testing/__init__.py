"""Fault tools for the fault suite (tests/faults) and for anyone reproducing a fault by hand.

- :mod:`fedline.netproxy`: a TCP proxy on 127.0.0.1 you can cut (reset) or
  black-hole (silent, like a dead route), between one site and the broker;
- :mod:`fedline.launch` (shared with the demo): start ``fedline ...`` commands as real
  processes, SIGKILL or SIGTERM them, read their RSS and their JSON log events;
- :mod:`fedline.testing.clock`: run a ``fedline`` command with its wall clock
  shifted (clock skew between a site and the aggregator);
- :mod:`fedline.testing.rig`: a whole federation on disk (keys, Mosquitto,
  aggregator.toml, site.toml per site, synthetic plant CSVs);
- :mod:`fedline.testing.ledger`: reconcile every site's ledger of sealed
  updates with the aggregator's verdicts and model lineage.
- :mod:`fedline.testing.bench_trees`: what the benches under ``bench/`` share
  (loading another bench script, naming the checkouts they compare, their report).

Nothing here is imported by the product; it imports the product.
"""
