"""Reading the published model as a member site would: its key grant, the sealed manifest, the sealed chunks.

Shared by the tests that check what the aggregator publishes (models are for
members only since issue 13, so an observer can no longer read them).
"""

from __future__ import annotations

import asyncio

import numpy as np

from broker_bridge import chunking, envelope
from broker_bridge.client import MqttClient
from broker_bridge.federation_key import Keyring, open_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from tests.conftest import settings_for


async def read_model(
    broker, topics: Topics, member: KeyPair, agg_sign_pub: bytes, min_version: int, timeout: float = 20.0
) -> tuple[dict, dict[str, np.ndarray], bytes]:
    """``(manifest, weights, onnx)`` of the first version >= ``min_version``, decrypted and hash-checked."""
    keyring = Keyring()
    async with MqttClient(settings_for(broker, member.ident, clean_start=True)) as c:
        await c.subscribe(topics.fedkey(member.ident))
        await c.subscribe(topics.model_filter())
        manifest, sealed_manifests, blobs = None, [], {}
        deadline = asyncio.get_running_loop().time() + timeout
        reassemblers: dict[tuple, chunking.Reassembler] = {}
        async for m in c.messages():
            assert asyncio.get_running_loop().time() < deadline, "no complete model on the broker"
            if not m.payload:
                continue
            info = topics.parse(m.topic)
            if info.kind == "fedkey":
                keyring.add_grant(m.payload, member, agg_sign_pub, topics.federation)
            elif info.kind == "manifest":
                sealed_manifests.append(m.payload)
            else:
                r = reassemblers.setdefault((info.version, info.kind), chunking.Reassembler())
                done = r.add(m.payload)
                if done:
                    blobs[(info.version, info.kind)] = done[1]
            for blob in list(sealed_manifests):
                if envelope_epoch(blob) in keyring:
                    sealed_manifests.remove(blob)
                    doc, _ = open_manifest(blob, keyring, agg_sign_pub)
                    if doc["version"] >= min_version and (manifest is None or doc["version"] > manifest["version"]):
                        manifest = doc
            if (
                manifest
                and (manifest["version"], "weights") in blobs
                and ((manifest["version"], "onnx") in blobs or manifest["onnx"]["chunks"] == 0)
            ):
                break
    v, key = manifest["version"], keyring[manifest["epoch"]]
    w = envelope.open_for_federation(blobs[(v, "weights")], key)
    o = envelope.open_for_federation(blobs[(v, "onnx")], key) if (v, "onnx") in blobs else b""
    assert envelope.content_hash(w) == manifest["weights"]["hash"] and len(w) == manifest["weights"]["size"]
    assert envelope.content_hash(o) == manifest["onnx"]["hash"]
    return manifest, envelope.decode_tensors(w), o


def envelope_epoch(blob: bytes) -> int:
    from broker_bridge.federation_key import sealed_manifest_header

    return sealed_manifest_header(blob)[0]
