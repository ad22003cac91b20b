"""Models published with the tensor table by reference (FLT2): a site follows them, by step or by weights, and
recognises the version it already holds; the aggregator switches to FLT2 only once every enrolled site says
it reads it."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np

from aggregator.publish import build_release
from aggregator.service import Aggregator
from broker_bridge import envelope, layouts, quantised
from broker_bridge.chunking import Reassembler
from broker_bridge.federation_key import new_content_key, seal_grant
from edge.model_store import GlobalModel
from edge.status_doc import build_status
from tests.edge.test_follow_steps import AGG, SHAPES, SITE, SPEC, TOPICS, _feed, _follower

IDS = layouts.register_model(SHAPES)  # as the site and the aggregator each do from their spec


def _release(version, model, key, step=None):
    return build_release(
        version,
        model,
        SPEC,
        "plant",
        AGG,
        TOPICS,
        lambda _t: 300,
        None,
        epoch=1,
        content_key=key,
        step=step,
        by_reference=True,
    )


def _plain(release, kind: str, key: bytes) -> bytes:
    parts = [payload for topic, payload in release.chunks if TOPICS.parse(topic).kind == kind]
    if kind == "delta":  # a step goes as plain slices (chunking.split_plain)
        assert parts[0][:4] != b"FLC1"
        return envelope.open_for_federation(b"".join(parts), key)
    r = Reassembler(timeout_s=60)
    done = None
    for payload in parts:
        done = r.add(payload) or done
    assert done is not None
    return envelope.open_for_federation(done[1], key)


def test_weights_and_steps_go_as_flt2_and_a_site_follows_them_bit_for_bit() -> None:
    key = new_content_key()
    rng = np.random.default_rng(5)
    model = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    v0 = _release(0, model, key)
    weights = _plain(v0, "weights", key)
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    table = layouts.float32_table(SHAPES)
    assert weights == b"FLT2" + hashlib.sha256(table).digest()[:16] + b"".join(model[k].tobytes() for k in SHAPES)
    assert len(weights) == 20 + 4 * n and v0.manifest["weights"]["hash"] == envelope.content_hash(weights)
    held = [GlobalModel(0, {}, b"", b"", model)]  # version 0 from the seed: its FLT2 encoding has the signed hash
    f = _follower(held)
    assert f.held(0, v0.manifest) == weights
    f.on_grant(seal_grant("plant", SITE.public(), 1, key, AGG))
    for v in (1, 2):
        target = {k: x + rng.standard_normal(x.shape).astype(np.float32) * 0.1 for k, x in model.items()}
        block, model = quantised.model_step(model, target)
        rel = _release(v, model, key, (v - 1, block))
        assert _plain(rel, "delta", key)[:20] == b"FLT2" + IDS["int8"]
        _feed(f, rel, ("delta",))  # the step alone: the site re-makes the FLT2 weights the manifest signs
        assert f.on_manifest(rel.manifest_blob) == v and f.by_step
        g = f.complete()
        assert g is not None and g.weights_blob[:4] == b"FLT2"
        assert all(np.array_equal(g.shared[k], model[k]) for k in SHAPES)
        held[0] = g


def _service(sites: list[str]) -> Aggregator:
    agg = Aggregator.__new__(Aggregator)  # only the status bookkeeping: no config, no broker
    agg._reads, agg._release = {}, None
    agg.core = SimpleNamespace(enrollment=SimpleNamespace(sites={s: None for s in sites}))  # type: ignore[assignment]
    return agg


def _status(reads: tuple[str, ...] = (), state: str = "online") -> bytes:
    doc = build_status(state=state, version=0, privacy={}, publishing="ok", outbox_depth=0, reads=reads)
    return json.dumps(doc).encode()


def test_the_aggregator_publishes_flt2_only_while_every_enrolled_site_reads_it() -> None:
    agg = _service(["a", "b"])
    assert not agg._all_read("FLT2")  # no site heard from yet
    agg._on_status("a", _status(("FLT2",)))
    assert not agg._all_read("FLT2")  # b never said so
    agg._on_status("b", _status(("FLT2",)))
    assert agg._all_read("FLT2")
    agg._on_status("b", json.dumps({"state": "offline", "reason": "connection lost"}).encode())
    assert agg._all_read("FLT2")  # a last will says nothing about the agent: b still reads FLT2
    agg._on_status("b", _status())  # b came back with an older agent: FLT1 again
    assert not agg._all_read("FLT2")
    agg._on_status("b", b'{"state":"online","reads":"FLT2"}')  # not a list: nothing
    assert not agg._all_read("FLT2")
    agg._on_status("stranger", _status(("FLT2",)))  # not enrolled: not kept
    assert "stranger" not in agg._reads


def test_binary_manifests_wait_for_the_last_site_of_the_previous_release() -> None:
    """A site whose agent reads FLT2, FLR2 and FLM2 but not FLM3 (the release before binary manifests) keeps the
    federation's manifests JSON; once its status says FLM3 too, they go binary."""
    agg = _service(["a", "b"])
    agg._on_status("a", _status(("FLT2", "FLR2", "FLM2", "FLM3")))
    agg._on_status("b", _status(("FLT2", "FLR2", "FLM2")))
    assert agg._all_read("FLM2") and not agg._all_read("FLM3")
    agg._on_status("b", _status(("FLT2", "FLR2", "FLM2", "FLM3")))
    assert agg._all_read("FLM3")
