"""Everything that crosses the network between a plant and the aggregator.

- :mod:`broker_bridge.topics`: every topic name under ``fedline/<federation>/``.
- :mod:`broker_bridge.keys`: site and aggregator key pairs, the enrollment file.
- :mod:`broker_bridge.envelope`: the binary formats: sealed updates, signed
  manifests and receipts, raw little-endian tensors.
- :mod:`broker_bridge.chunking`: split and reassemble messages under a broker's size limit.
- :mod:`broker_bridge.client`: the resilient asyncio MQTT client (aiomqtt).
- :mod:`broker_bridge.mosquitto`: Mosquitto config, ACL and password files; a private broker process.
- :mod:`broker_bridge.errors`: the library's exceptions.
"""
