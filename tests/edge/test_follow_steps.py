"""The global model as int8 steps: made by hand, published by the real release builder, followed bit for bit.

``[publish] quantise = "int8"``: version v+1 is defined as ``v + q · s`` (per block), published as that int8
step beside the full weights; a site holding v makes v+1 itself and checks it against the signed hashes.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.publish import build_release
from broker_bridge import quantised
from broker_bridge.errors import ModelRefused, WireError
from broker_bridge.federation_key import new_content_key, seal_grant
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.follow import ModelFollower
from edge.model_store import GlobalModel
from models import ModelSpec

AGG = KeyPair.generate("aggregator", "aggregator")
SITE = KeyPair.generate("site", "site-a")
SPEC = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4]})
SHAPES = {"body.0.weight": (4, 3), "body.0.bias": (4,), "head.weight": (1, 4), "head.bias": (1,)}
TOPICS = Topics("plant")


def test_a_step_whose_values_are_multiples_of_its_step_size_makes_the_new_model_exactly() -> None:
    """By hand: the step [127/128, -1/2, 1/4] has largest magnitude 127/128, so the block step is 2^-7 and
    q = [127, -64, 32] with no rounding left to chance (x / s is an integer)."""
    old = {"w": np.array([1.0, 2.0, 0.5], np.float32)}
    new = {"w": np.array([1.0 + 127 / 128, 1.5, 0.75], np.float32)}
    block, model = quantised.model_step(old, new)
    assert block["w"].tolist() == [127, -64, 32] and block["w#scale"].tolist() == [2.0**-7]
    assert model["w"].tolist() == [1.0 + 127 / 128, 1.5, 0.75]
    assert quantised.apply_step(old, block)["w"].tolist() == model["w"].tolist()
    with pytest.raises(WireError, match="names"):
        quantised.apply_step({"v": old["w"]}, block)


def _releases(key: bytes, versions: int) -> list[tuple[object, dict[str, np.ndarray]]]:
    """Versions 0..n as the aggregator makes them with quantise = "int8" (random reduce results)."""
    rng = np.random.default_rng(0)
    model = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    out = [(_build(0, model, key, None), model)]
    for v in range(1, versions + 1):
        target = {n: x + rng.standard_normal(x.shape).astype(np.float32) * 0.1 for n, x in model.items()}
        block, model = quantised.model_step(model, target)
        out.append((_build(v, model, key, (v - 1, block)), model))
    return out


def _build(version, model, key, step):
    return build_release(
        version, model, SPEC, "plant", AGG, TOPICS, lambda _t: 300, None, epoch=1, content_key=key, step=step
    )


def _follower(held: list[GlobalModel]) -> ModelFollower:
    f = ModelFollower(
        SITE,
        AGG.public().sign_pub,
        "plant",
        SPEC,
        list(SHAPES),
        SHAPES,
        lambda v: v > held[0].version,
        base=lambda: held[0],
    )
    return f


def _feed(f: ModelFollower, release, kinds: tuple[str, ...]) -> None:
    for topic, payload in release.chunks:
        info = TOPICS.parse(topic)
        if info.kind in kinds:
            (f.on_step_chunk if info.kind == "delta" else f.on_chunk)(info.version, info.index, payload)


def test_a_site_follows_three_steps_bit_for_bit_and_a_tampered_step_falls_back_to_the_weights() -> None:
    key = new_content_key()
    releases = _releases(key, 4)
    held = [GlobalModel(0, {}, b"", b"", releases[0][1])]  # version 0, built from the seed like the aggregator's
    f = _follower(held)
    f.on_grant(seal_grant("plant", SITE.public(), 1, key, AGG))
    for v in (1, 2, 3):
        release, model = releases[v]
        assert release.manifest["delta"]["from"] == v - 1
        assert set(release.manifest["delta"]) == {"from", "hash", "size", "chunks", "msg_id"}  # signed with the rest
        _feed(f, release, ("delta",))  # no weight chunk at all: the step alone makes the version
        assert f.on_manifest(release.manifest_blob) == v and f.by_step
        g = f.complete()
        assert g is not None and g.version == v
        assert all(np.array_equal(g.shared[n], model[n]) for n in SHAPES)  # the aggregator's bits
        held[0] = g
    release, model = releases[4]
    tampered = [(t, p[:-1] + bytes([p[-1] ^ 1]) if TOPICS.parse(t).kind == "delta" else p) for t, p in release.chunks]
    _feed(f, type(release)(4, release.manifest, release.manifest_blob, tampered, 0, 0), ("delta",))
    assert f.on_manifest(release.manifest_blob) == 4
    with pytest.raises(ModelRefused) as exc:
        f.complete()
    assert exc.value.reason == "int8_step" and not f.by_step and f.step_failures == 1
    assert f.complete() is None  # waits for the full weights now
    _feed(f, release, ("weights",))
    g = f.complete()
    assert g is not None and all(np.array_equal(g.shared[n], model[n]) for n in SHAPES)
    held[0] = g
    # a step that opens (sealed under the right key) but is not the one the manifest signs: the hash refuses it
    nxt = {n: x + np.float32(0.5) for n, x in model.items()}
    block, made = quantised.model_step(model, nxt)
    genuine = _build(5, made, key, (4, block))
    other, _ = quantised.model_step(model, {n: x - np.float32(0.5) for n, x in model.items()})
    forged = _build(5, made, key, (4, other))
    _feed(f, forged, ("delta",))
    assert f.on_manifest(genuine.manifest_blob) == 5 and f.by_step
    with pytest.raises(ModelRefused) as exc:
        f.complete()
    assert exc.value.reason == "int8_step" and "hash" in exc.value.detail and f.step_failures == 2
    _feed(f, genuine, ("weights",))
    g = f.complete()
    assert g is not None and all(np.array_equal(g.shared[n], made[n]) for n in SHAPES)


def test_a_site_that_does_not_hold_the_parent_takes_the_full_weights() -> None:
    key = new_content_key()
    releases = _releases(key, 3)
    held = [GlobalModel(1, {}, b"", b"", releases[1][1])]
    f = _follower(held)
    f.on_grant(seal_grant("plant", SITE.public(), 1, key, AGG))
    release, model = releases[3]  # made from version 2, which this site never got
    assert f.on_manifest(release.manifest_blob) == 3 and not f.by_step
    _feed(f, release, ("delta", "weights"))
    g = f.complete()
    assert g is not None and all(np.array_equal(g.shared[n], model[n]) for n in SHAPES)
