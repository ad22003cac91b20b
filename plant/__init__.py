"""The plant tier: a plant aggregator is one site of the central federation.

A plant runs its own federation over its lines (FedBuff on the plant's
Mosquitto, ``aggregator.service`` unchanged), sends each of its reduces
upstream as one sealed update through the same outbox, receipts and sealing
as any edge (``edge.outbox``, ``broker_bridge.envelope``), and serves its
lines the central model as its own signed, sealed releases. Lines trust
their plant; the central aggregator sees only the plant's combined delta.
See docs/architecture.md, "The plant tier".
"""
