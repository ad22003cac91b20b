"""Sparkplug B (Eclipse Sparkplug 3.0) over MQTT: payload codec and a reader source.

``sparkplug_b.proto`` is written from the specification; ``sparkplug_b_pb2.py``
is generated from it by protoc (see the .proto header) and committed, because
the Sparkplug packages on PyPI pin paho-mqtt 1 and an old protobuf.
"""
