"""The one follower of the signed, sealed global model (``edge.follow.ModelFollower``), used by the edge
agent and a plant's uplink: messages in any order, every refusal named. Over a real broker it is exercised
by every edge and plant test; here each path once, in-process."""

from __future__ import annotations

import numpy as np
import pytest

from broker_bridge.errors import ModelRefused
from broker_bridge.federation_key import new_content_key, seal_grant
from broker_bridge.keys import KeyPair
from edge.follow import ModelFollower
from models import ModelSpec
from tests.edge.helpers import model_release

AGG = KeyPair.generate("aggregator", "aggregator")
SITE = KeyPair.generate("site", "site-a")
SPEC = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4]})
SHAPES = {"body.0.weight": (4, 3), "body.0.bias": (4,), "head.weight": (1, 4), "head.bias": (1,)}


def release(version: int, key: bytes, epoch: int = 1, federation: str = "plant", spec: ModelSpec = SPEC):
    """A version as the aggregator publishes it: (sealed manifest, weight chunks), and its weights."""
    rng = np.random.default_rng(version)
    shared = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    manifest, chunks = model_release(version, spec, shared, key, AGG, epoch=epoch, federation=federation, max_chunk=256)
    return manifest, chunks, shared


def follower(current: list[int]) -> ModelFollower:
    return ModelFollower(SITE, AGG.public().sign_pub, "plant", SPEC, list(SHAPES), SHAPES, lambda v: v > current[0])


def test_chunks_and_manifest_in_any_order_and_the_grant_last() -> None:
    key, current = new_content_key(), [0]
    f = follower(current)
    manifest, chunks, shared = release(3, key)
    for i, c in reversed(list(enumerate(chunks))):  # retained chunks first, newest index first
        f.on_chunk(3, i, c)
    assert f.on_manifest(manifest) is None and f.waiting_for_key  # its epoch's grant has not come yet
    assert f.on_grant(seal_grant("plant", SITE.public(), 1, key, AGG)) == 1
    assert f.on_manifest(f.take_waiting()) == 3 and not f.waiting_for_key
    g = f.complete()
    assert g is not None and g.version == 3
    assert all(np.array_equal(g.shared[n], shared[n]) for n in SHAPES)
    current[0] = 3
    assert f.on_manifest(manifest) is None  # not newer than the one in use: not fetched again


def test_each_refusal_names_its_reason_and_version() -> None:
    key, current = new_content_key(), [0]
    f = follower(current)
    f.on_grant(seal_grant("plant", SITE.public(), 1, key, AGG))

    def refusal(manifest: bytes, chunks: list[bytes], version: int) -> str:
        for i, c in enumerate(chunks):
            f.on_chunk(version, i, c)
        with pytest.raises(ModelRefused) as exc:
            f.on_manifest(manifest)
            f.complete()
        assert exc.value.version in (version, None)
        return exc.value.reason

    assert refusal(*release(1, key, federation="other")[:2], 1) == "federation"
    other = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [5]})
    assert refusal(*release(2, key, spec=other)[:2], 2) == "spec"
    manifest, chunks, _ = release(3, key)
    assert refusal(manifest, [*chunks[:-1], chunks[-1][:-1] + bytes([chunks[-1][-1] ^ 1])], 3) == "decrypt"
    manifest, chunks, _ = release(4, new_content_key(), epoch=2)  # an epoch whose grant never came
    assert f.on_manifest(manifest) is None and f.waiting_for_key
    assert refusal(b"FLX\x01" + bytes(40), [], 5) == "manifest"
    manifest, chunks, _ = release(6, key)
    for i, c in enumerate(chunks):
        f.on_chunk(6, i, c)
    assert f.on_manifest(manifest) == 6 and f.complete() is not None  # and the good one still goes through
