"""The aggregator against a real Mosquitto: sites send sealed, chunked updates; receipts and versions come back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator.service import Aggregator
from broker_bridge import chunking
from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta
from tests.conftest import eventually, settings_for
from tests.members import read_model
from tests.parties import Party

SITES = ["site-a", "site-b", "site-c"]


def broker_table(broker, user: str = "aggregator") -> str:
    return (
        f'[broker]\nurl = "{broker.url}"\nusername = "{user}"\npassword = "{broker.password(user)}"\n'
        f'client_id = "agg-test"\nbackoff_min_s = 0.05\nbackoff_max_s = 0.5\nmax_chunk = 4096\n'
    )


def Site(fed, broker, site: str) -> Party:
    """A minimal sending site of the test federation."""
    return Party(broker, site, fed.agg.public().sign_pub, "test", 4096, keys=fed.sites[site])


async def read_manifest(
    broker, fed, min_version: int, timeout: float = 20.0
) -> tuple[dict, dict[str, np.ndarray], bytes]:
    """What an edge does: its key grant, the sealed manifest, then the chunks it names, decrypted and verified."""
    return await read_model(
        broker, Topics("test"), fed.sites["site-a"], fed.agg.public().sign_pub, min_version, timeout
    )


async def retained_versions(broker) -> set[int]:
    """Versions that still have retained chunks on the broker (what a new subscriber gets)."""
    topics = Topics("test")
    seen = set()
    async with MqttClient(settings_for(broker, "observer", clean_start=True)) as c:
        await c.subscribe(topics.model_filter())
        await c.wait_connected(10)
        while True:
            try:
                m = await asyncio.wait_for(c.messages().__anext__(), 1.0)
            except TimeoutError:
                return seen
            info = topics.parse(m.topic)
            if info.kind in ("weights", "onnx") and m.payload:
                seen.add(info.version)


async def test_fedasync_over_mosquitto_stale_poison_and_publish(mosquitto, tmp_path):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(
        # the per-site rate limit off: this checks α f(s) alone (the limit: tests/aggregator/test_site_rate.py)
        strategy='kind = "fedasync"\nalpha = 0.5\nstaleness = "polynomial"\na = 1.0\nmax_staleness = 2\nsite_interval_s = 0',
        extra="[validation]\nmax_norm = 10.0\n[publish]\nretain_versions = 2",
        broker=broker_table(mosquitto),
    )
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        await eventually(lambda: agg.published_version == 0, 30)
        manifest, w0, _onnx0 = await read_manifest(mosquitto, fed, 0)
        assert manifest["version"] == 0 and manifest["spec"] == cfg.model.to_dict()
        assert set(w0) == {"body.0.weight", "body.0.bias"}  # personal head never published as shared
        rng = np.random.default_rng(1)
        ref = agg.core.model
        expected = {k: v.copy() for k, v in ref.items()}
        ref0 = {k: v.copy().astype(np.float64) for k, v in ref.items()}
        async with (
            Site(fed, mosquitto, "site-a") as a,
            Site(fed, mosquitto, "site-b") as b,
            Site(fed, mosquitto, "site-c") as c,
        ):
            # three fresh updates, in sequence: each applied with alpha * f(s)
            deltas = []
            for i, site in enumerate([a, b, a]):
                d = random_delta(ref, rng, 0.1)
                blob, h = fed.seal(site.site, d, base_version=0)
                await site.send(blob, h.msg_id)
                await eventually(lambda: site.receipt(h.counter), 20)
                r = site.receipt(h.counter)
                s = i  # versions 0, 1, 2 exist when the i-th update (base 0) arrives
                assert r["verdict"] == "applied" and r["version"] == i + 1 and r["staleness"] == s
                assert r["weight"] == pytest.approx(0.5 * (s + 1) ** -1.0)
                a_t = 0.5 * (s + 1) ** -1.0
                for k in expected:  # Xie et al.: (1 - a_t) x + a_t (x_0 + delta), every update trained on version 0
                    expected[k] = (1 - a_t) * expected[k] + a_t * (ref0[k] + d[k])
                deltas.append(d)
            # garbage: a chunk that is not a chunk, and a well-chunked message that is not a sealed update
            await c.client.publish(c.topics.update_chunk("site-c", "junk1", 0), b"\x00not a chunk")
            await c.send(b"FLE\x01" + bytes(200), "junk2")
            await eventually(lambda: c.receipts and c.receipts[-1]["msg_id"] == "junk2", 20)
            assert (c.receipts[-1]["verdict"], c.receipts[-1]["reason"], c.receipts[-1]["counter"]) == (
                "rejected",
                "decrypt",
                -1,
            )
            assert agg.metrics.value("fedline_aggregator_chunk_errors_total") == 1
            # too stale (s = 3 > 2): dropped with a receipt, model unchanged
            blob, h = fed.seal("site-c", random_delta(ref, rng), base_version=0)
            await c.send(blob, h.msg_id)
            await eventually(lambda: c.receipt(h.counter), 20)
            assert c.receipt(h.counter)["verdict"] == "stale" and c.receipt(h.counter)["reason"] == "too_stale"
            # poison: huge norm, NaN, wrong shape: rejected; a good one after them is applied
            huge = {k: np.full(v.shape, 1e3, np.float32) for k, v in ref.items()}
            nan = {k: v.copy() for k, v in random_delta(ref, rng).items()}
            nan["body.0.bias"][0] = np.nan
            wrong = {"body.0.weight": np.zeros((3, 3), np.float32), "body.0.bias": np.zeros(8, np.float32)}
            for d, reason in ((huge, "norm"), (nan, "nonfinite"), (wrong, "shape")):
                blob, h = fed.seal("site-b", d, base_version=3)
                await b.send(blob, h.msg_id)
                await eventually(lambda: b.receipt(h.counter), 20)
                assert (b.receipt(h.counter)["verdict"], b.receipt(h.counter)["reason"]) == ("rejected", reason)
            good = random_delta(ref, rng, 0.1)
            blob, h = fed.seal("site-c", good, base_version=3)
            await c.send(blob, h.msg_id)
            await eventually(lambda: c.receipt(h.counter), 20)
            assert c.receipt(h.counter)["verdict"] == "applied" and c.receipt(h.counter)["version"] == 4
            for k in expected:
                expected[k] = expected[k] + np.float32(0.5) * good[k]
            # a resent duplicate gets its original verdict again, not "replay"
            n_before = len(c.receipts)
            await c.send(blob, h.msg_id + "r")
            await eventually(lambda: len(c.receipts) > n_before, 20)
            assert c.receipts[-1]["verdict"] == "applied" and c.receipts[-1]["version"] == 4
        for k in expected:
            np.testing.assert_allclose(agg.core.model[k], expected[k], rtol=1e-5, atol=1e-6)
        await eventually(lambda: agg.published_version == 4, 60)
        manifest, w4, onnx4 = await read_manifest(mosquitto, fed, 4)
        assert manifest["version"] == 4 and "lineage" not in manifest  # the lineage stays in the store
        assert agg.core.lineage(4)["updates"][0]["site"] == "site-a" or len(agg.core.lineage(4)["updates"]) == 1
        for k in expected:
            np.testing.assert_allclose(w4[k], expected[k], rtol=1e-5, atol=1e-6)
        # the ONNX runs and uses the new body
        import onnxruntime as ort
        import torch

        from models import Scorer, build_model, load_shared_state

        sess = ort.InferenceSession(onnx4)
        x = np.random.default_rng(9).standard_normal((5, 4)).astype(np.float32)
        y = sess.run(None, {"x": x})[0]
        model = build_model(cfg.model, seed=7)  # the seed's head, the published body
        load_shared_state(model, cfg.model, {k: np.array(v) for k, v in w4.items()})
        with torch.no_grad():
            want = Scorer(model, cfg.model).eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        # superseded versions were cleared from the broker: retained chunks only of the last two published
        await eventually(lambda: len(agg.core.store.published_versions()) <= 2, 20)
        assert await retained_versions(mosquitto) == {v for v, _, _ in agg.core.store.published_versions()}
        assert max(await retained_versions(mosquitto)) == 4
        assert agg.metrics.value("fedline_aggregator_rejections_total", {"reason": "norm"}) == 1
        assert agg.metrics.value("fedline_aggregator_updates_total", {"verdict": "stale"}) == 1
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))


async def test_evaluation_metric_goes_into_checkpoint_and_manifest(mosquitto, tmp_path):
    """An [evaluation] CSV gives each published version a server-side metric (here: accuracy)."""
    fed = make_federation(tmp_path / "fed", SITES)
    rng = np.random.default_rng(0)
    rows = ["a,b,c,d,label"] + [",".join(f"{v:.3f}" for v in rng.uniform(0, 1, 4)) + f",{i % 2}" for i in range(60)]
    (fed.root / "holdout.csv").write_text("\n".join(rows) + "\n")
    features = ", ".join(f'{{ tag = "{t}", range = [0.0, 1.0] }}' for t in "abcd")
    cfg = fed.config(
        strategy='kind = "fedasync"',
        extra=f'[evaluation]\ncsv = "holdout.csv"\nmetric = "accuracy"\n'
        f'[evaluation.rows]\nlabel = "label"\nfeatures = [{features}]\n',
        broker=broker_table(mosquitto),
    )
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await eventually(lambda: agg.published_version == 0, 30)
        async with Site(fed, mosquitto, "site-a") as a:
            blob, h = fed.seal("site-a", random_delta(agg.core.model, rng, 0.5), 0)
            await a.send(blob, h.msg_id)
            await eventually(lambda: agg.published_version == 1, 30)
        manifest, _, _ = await read_manifest(mosquitto, fed, 1)
        expected = agg.core.evaluator(agg.core.model)
        assert 0.0 <= manifest["metric"] <= 1.0 and manifest["metric"] == pytest.approx(expected)
        assert agg.core.store.checkpoint(1, blobs=False).metric == pytest.approx(expected)
        assert agg.core.evaluator.x.shape == (60, 4)
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))


async def test_broker_restart_is_survived_and_updates_sent_meanwhile_are_decided(mosquitto, tmp_path):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(strategy='kind = "fedasync"', broker=broker_table(mosquitto), extra="[publish]\nonnx = false")
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await eventually(lambda: agg.published_version == 0, 30)
        mosquitto.restart()  # persistence on: sessions and retained messages survive
        rng = np.random.default_rng(3)
        async with Site(fed, mosquitto, "site-a") as a:
            blob, h = fed.seal("site-a", random_delta(agg.core.model, rng), 0)
            await a.send(blob, h.msg_id)
            await eventually(lambda: a.receipt(h.counter), 30)
            assert a.receipt(h.counter)["verdict"] == "applied"
            # two sites pick the same message id and their chunks interleave: both still arrive intact
            async with Site(fed, mosquitto, "site-b") as b:
                ba, ha = fed.seal("site-a", random_delta(agg.core.model, rng), 1)
                bb, hb = fed.seal("site-b", random_delta(agg.core.model, rng), 1)
                pa, pb = chunking.split(ba, "same", 1024), chunking.split(bb, "same", 1024)
                for i in range(max(len(pa), len(pb))):
                    if i < len(pa):
                        await a.client.publish(a.topics.update_chunk("site-a", "same", i), pa[i])
                    if i < len(pb):
                        await b.client.publish(b.topics.update_chunk("site-b", "same", i), pb[i])
                await eventually(lambda: a.receipt(ha.counter) and b.receipt(hb.counter), 30)
                assert a.receipt(ha.counter)["verdict"] == b.receipt(hb.counter)["verdict"] == "applied"
        await eventually(lambda: agg.published_version == 3, 30)
        manifest, _weights, _ = await read_manifest(mosquitto, fed, 3)
        assert manifest["onnx"]["size"] == 0 and manifest["weights"]["chunks"] >= 1
        assert agg.client is not None and agg.client.stats.connects >= 2
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))


async def test_buffer_timeout_makes_a_version_when_the_other_sites_are_away(mosquitto, tmp_path):
    """FedBuff, three sites enrolled (MDA, the default: all three awaited, K = 2 summed), one site online: after
    buffer_timeout_s its update is applied and published anyway, at its fair share f(s)/K = 1/2."""
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(
        strategy='kind = "fedbuff"\nbuffer_size = 3\nbuffer_timeout_s = 0.5',
        broker=broker_table(mosquitto),
        extra="[publish]\nonnx = false",
    )
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    rng = np.random.default_rng(5)
    try:
        await eventually(lambda: agg.published_version == 0, 30)
        async with Site(fed, mosquitto, "site-a") as a:
            delta = random_delta(agg.core.model, rng, 0.5)
            before = {k: v.copy() for k, v in agg.core.model.items()}
            blob, h = fed.seal("site-a", delta, 0)
            await a.send(blob, h.msg_id)
            await eventually(lambda: [r["verdict"] for r in a.receipts] == ["buffered", "applied"], 30)
            await eventually(lambda: agg.published_version == 1, 30)
        _, weights, _ = await read_manifest(mosquitto, fed, 1)
        for k, v in delta.items():  # FedBuff divides by K (= 2), not by the updates present (issue 14)
            np.testing.assert_allclose(weights[k], before[k] + v / 2, atol=1e-6)
        assert agg.core.metrics.value("fedline_aggregator_buffer_timeouts_total") == 1
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))


async def test_total_reassembly_cap_over_mosquitto_the_flooder_pays_and_the_honest_update_is_applied(
    mosquitto, tmp_path
):
    """A site floods first chunks up to its own cap; an honest site's chunked update then pushes the total over
    reassembly_total_max_bytes: the flooder's half-sent messages are evicted (counted), the honest one applied."""
    from tests.aggregator.helpers import SPEC_TOML

    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(
        strategy='kind = "fedasync"',
        broker=broker_table(mosquitto),
        extra="[publish]\nonnx = false",
        spec="reassembly_max_bytes = 40000\nreassembly_total_max_bytes = 40000\n" + SPEC_TOML,
    )
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await eventually(lambda: agg.published_version == 0, 30)
        async with Site(fed, mosquitto, "site-b") as flooder:
            flood = [chunking.split(bytes(400), f"f{i}", 270)[0] for i in range(300)]
            await flooder.client.publish_many(
                [(flooder.topics.update_chunk("site-b", f"f{i}", 0), c) for i, c in enumerate(flood)]
            )
            await eventually(
                lambda: "site-b" in agg.reassemblers and agg.reassemblers["site-b"].held_bytes > 39_700, 30
            )
        async with Site(fed, mosquitto, "site-a") as honest:
            blob, h = fed.seal("site-a", random_delta(agg.core.model, np.random.default_rng(2)), 0)
            small = chunking.split(blob, h.msg_id, 200)  # small chunks: held half-sent while the rest arrive
            assert len(small) >= 3
            await honest.client.publish_many(
                [(honest.topics.update_chunk("site-a", h.msg_id, i), c) for i, c in enumerate(small)]
            )
            await eventually(lambda: [r["verdict"] for r in honest.receipts] == ["applied"], 30)
        assert agg.core.metrics.value("fedline_aggregator_reassembly_evicted_total") >= 1
        assert sum(r.held_bytes for r in agg.reassemblers.values()) <= 40000
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))
